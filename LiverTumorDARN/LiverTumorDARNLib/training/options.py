"""What a training run is told: :class:`TrainConfig`, each stage's defaults, and the ``train`` options.

Torch-free, so that ``livertumordarn`` starts without PyTorch for every other command.

Every default is declared once, in :data:`STAGE_DEFAULTS`; the command line shows the defaults of
the stage it is given (``livertumordarn train --stage refine --help``), and a :class:`TrainConfig`
built in Python takes the same ones. A setting that belongs to another stage is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import InputError

DARN_STAGES = ("liver", "tumor")
STAGE_NAMES = (*DARN_STAGES, "refine")

_COMMON = {
    "iterations": 2000, "learning_rate": 1e-3, "weight_decay": 1e-4, "pool_size": 8, "val_every": 200,
    "randomize_fraction": 0.5, "phantom_fraction": 0.2, "phantom_seed_start": 0, "seed": 0, "device": "auto",
}
_DARN = {
    **_COMMON,
    # 64^3 patches of a 1.5 M-parameter network: two fill a small GPU's memory and a CPU's patience.
    "batch_size": 2,
    # Prepared cases are cheap to swap (small phantoms, crops of the liver), so they change often.
    "refresh_every": 10,
    "val_cases": 2,
    "model": {"encoder_widths": (8, 16, 32, 64, 128), "pyramid_width": 16, "order": "spa_sem"},
}
_REFINE = {
    **_COMMON,
    # 32^3 patches: eight cost what two DARN patches cost.
    "batch_size": 8,
    # A scan is a full-size phantom, a quarter of them segmented by DARN: seconds to make each.
    "refresh_every": 100,
    # Validation scores patches of these scans, 16 per scan.
    "val_cases": 3,
    "darn_fraction": 0.25,
    # Image and coarse mask, then the positive and negative clicks' maps (2: no clicks).
    "model": {"widths": (12, 24, 48, 96), "in_channels": 4},
}
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {"liver": _DARN, "tumor": _DARN, "refine": _REFINE}
"""Each stage's default settings (TrainConfig fields)."""

_DARN_ONLY = ("phantom_small", "patch_size")
_REFINE_ONLY = ("models_dir", "darn_fraction")
_FRACTIONS = ("phantom_fraction", "randomize_fraction", "darn_fraction")
_AT_LEAST_ONE = ("iterations", "batch_size", "pool_size", "refresh_every", "val_every")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint.

    A setting left at None takes the stage's default from :data:`STAGE_DEFAULTS` where the stage has
    one; ``amp``, ``num_threads`` and ``workers`` at None are chosen for the machine at run time.
    """

    stage: str = "liver"
    """liver (whole CT at 4 mm), tumor (the liver's box at 1.5 mm) or refine (boundary refinement)."""
    out_dir: Path = Path("checkpoints")
    resume: bool = False
    # Data
    data: Path | None = None
    """A folder in the LiTS layout, or None for cases drawn on the fly."""
    anatomy: Path | None = None
    """A folder of real label maps to draw CT on (:mod:`anatomy`); None: phantoms only."""
    phantom_fraction: float | None = None
    """With ``anatomy``: the share of training cases that are phantoms all the same."""
    phantom_small: bool = False
    """DARN stages: 96x96 phantoms at about 4 mm (the liver stage's grid), 30 ms to draw."""
    randomize_fraction: float | None = None
    """The share of training phantoms with domain-randomised intensities (validation: none)."""
    phantom_seed_start: int | None = None
    """First training phantom seed; seeds reaching the validation range are refused."""
    models_dir: Path | None = None
    """Refine: the DARN weights whose predictions are coarse masks; None: the bundled ones."""
    darn_fraction: float | None = None
    """Refine: the share of training scans DARN segments for coarse masks (each costs a DARN run)."""
    # Network
    model: dict | None = None
    """The network's settings (DARN: encoder_widths, pyramid_width, order; refine: widths,
    in_channels), merged over the stage's defaults."""
    patch_size: tuple[int, int, int] | None = None
    """DARN stages: (z, y, x) instead of the stage's patch size (small GPUs, tests)."""
    init_from: Path | None = None
    """A weights folder (as ``export`` writes it) whose network for this stage starts the run."""
    # Schedule
    iterations: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    pool_size: int | None = None
    """Training cases held in memory."""
    refresh_every: int | None = None
    """Iterations between replacing one case of the pool."""
    val_cases: int | None = None
    val_every: int | None = None
    """Iterations between validations (and checkpoints)."""
    # Machine
    device: str | None = None
    amp: bool | None = None
    """Mixed precision; None: on for CUDA only (see ``loop.resolve_amp``)."""
    num_threads: int | None = None
    """CPU threads of this process; None: PyTorch's choice."""
    workers: int | None = None
    """Processes that make training cases; 0: this process; None: one per core (at most the pool
    size), none for small phantoms, which are quicker to draw than to send between processes."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGE_DEFAULTS:
            raise InputError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGE_NAMES)}")
        foreign = _REFINE_ONLY if self.stage in DARN_STAGES else _DARN_ONLY
        for name in foreign:
            if getattr(self, name) is not None and getattr(self, name) is not False:
                raise InputError(f"{name.replace('_', ' ')} is a setting of the "
                                 f"{'refine' if self.stage in DARN_STAGES else 'DARN'} stages, not of {self.stage}")
        defaults = STAGE_DEFAULTS[self.stage]
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.model = {**defaults["model"], **(self.model or {})}
        self._check()

    def _check(self) -> None:
        """Refuse settings that would fail late, in one line each."""
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in _FRACTIONS:
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise InputError(f"{name.replace('_', ' ')} must lie in 0..1, got {value}")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"workers must be 0 (cases made in the training process) or more, got {self.workers}")
        if self.data is not None and self.anatomy is not None:
            raise InputError("train on a LiTS-layout folder or on label maps to draw CT on, not both")
        if self.patch_size is not None and len(self.patch_size) != 3:
            raise InputError(f"the patch size needs three sizes z,y,x, got {tuple(self.patch_size)}")
        widths = self.model.get("encoder_widths", self.model.get("widths", ()))
        if len(widths) < 2:
            raise InputError(f"the network needs at least two levels of widths, got {tuple(widths)}")

    def record(self) -> dict:
        """The settings as plain values (paths as strings), for checkpoints."""
        return {key: str(value) if isinstance(value, Path) else value
                for key, value in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------------------------
# Command line: `livertumordarn train --stage STAGE [options]`


def add_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """The options of ``stage``, with its defaults in their help (argparse defaults stay None:
    :class:`TrainConfig` fills them in, so that the command and Python share one table)."""
    defaults = STAGE_DEFAULTS[stage]
    darn = stage in DARN_STAGES
    widths = defaults["model"]["encoder_widths" if darn else "widths"]
    parser.add_argument("--stage", choices=STAGE_NAMES, default=stage,
                        help="liver (whole CT at 4 mm), tumor (liver box at 1.5 mm) or refine (the "
                             "boundary-refinement network); default liver")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoint folder (last.pt, best.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/last.pt")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="LiTS-layout folder (volume-K / segmentation-K); default: phantoms drawn on the fly")
    parser.add_argument("--anatomy", type=Path, metavar="DIR",
                        help="folder of real label maps to draw training CT on (e.g. ../shared/anatomy); "
                             "every tenth map of each data set is held out for validation")
    parser.add_argument("--phantom-fraction", type=float, metavar="P",
                        help=f"with --anatomy: share of phantoms among the training cases (default {defaults['phantom_fraction']})")
    if darn:
        parser.add_argument("--small-phantoms", action="store_true", help="96x96 phantoms at ~4 mm (suits the liver stage)")
    else:
        parser.add_argument("--models", type=Path, metavar="DIR",
                            help="DARN weights whose predictions are coarse masks (default: the bundled ones)")
        parser.add_argument("--darn-fraction", type=float, metavar="P",
                            help=f"share of training scans DARN segments for coarse masks (default {defaults['darn_fraction']})")
    parser.add_argument("--randomize-fraction", type=float, metavar="P",
                        help=f"share of domain-randomised training phantoms (default {defaults['randomize_fraction']})")
    parser.add_argument("--phantom-seed-start", type=int, metavar="SEED",
                        help=f"first training phantom seed (default {defaults['phantom_seed_start']}; "
                             f"the seeds must stay below the validation range, 800000)")
    parser.add_argument("--init-from", type=Path, metavar="MODELS_DIR",
                        help=f"start from this weights folder's {stage} network (fine-tuning)"
                             f"{'' if darn else '; a refiner without click channels gets zero weights for them'}")
    parser.add_argument("--widths", type=_positive_ints, metavar="W,W,...",
                        help=f"{'encoder ' if darn else ''}widths, one per level (default {_listed(widths)})")
    if darn:
        parser.add_argument("--order", choices=("spa_sem", "sem_spa"),
                            help=f"DARN's refinement order (default {defaults['model']['order']})")
        parser.add_argument("--patch-size", type=_positive_ints, metavar="Z,Y,X", help="z,y,x patch size (default: the stage's, 64,64,64)")
    parser.add_argument("--iterations", type=int, metavar="N", help=f"default {defaults['iterations']}")
    parser.add_argument("--batch-size", type=int, metavar="N", help=f"default {defaults['batch_size']}")
    parser.add_argument("--lr", type=float, metavar="LR", help=f"AdamW peak learning rate (default {defaults['learning_rate']:g})")
    parser.add_argument("--pool-size", type=int, metavar="N", help=f"training cases held in memory (default {defaults['pool_size']})")
    parser.add_argument("--refresh-every", type=int, metavar="N",
                        help=f"iterations between replacing one case of the pool (default {defaults['refresh_every']})")
    parser.add_argument("--val-cases", type=int, metavar="N", help=f"held-out cases for validation (default {defaults['val_cases']})")
    parser.add_argument("--val-every", type=int, metavar="N",
                        help=f"iterations between validations and checkpoints (default {defaults['val_every']})")
    parser.add_argument("--seed", type=int, metavar="SEED", help=f"default {defaults['seed']}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help=f"default {defaults['device']}")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads per process (default: PyTorch's choice)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes that make training cases (default: one per core, at most the pool size"
                             f"{'; none for --small-phantoms' if darn else ''}); 0 makes them in the training process")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction,
                        help="mixed precision: on CUDA, and on CPUs with native bfloat16 (AVX-512 BF16 or AMX), "
                             "where a step is 1.5-2x faster; ignored with a warning on other CPUs, where it would "
                             "be many times slower (default: on for CUDA only)")


_OPTION_FIELDS = {
    "out": "out_dir", "resume": "resume", "data": "data", "anatomy": "anatomy", "phantom_fraction": "phantom_fraction",
    "small_phantoms": "phantom_small", "models": "models_dir", "darn_fraction": "darn_fraction",
    "randomize_fraction": "randomize_fraction", "phantom_seed_start": "phantom_seed_start", "init_from": "init_from",
    "patch_size": "patch_size", "iterations": "iterations", "batch_size": "batch_size", "lr": "learning_rate",
    "pool_size": "pool_size", "refresh_every": "refresh_every", "val_cases": "val_cases", "val_every": "val_every",
    "seed": "seed", "device": "device", "threads": "num_threads", "workers": "workers", "amp": "amp",
}
"""Option (argparse dest) -> TrainConfig field, for the options that map one to one."""


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``livertumordarn train`` options; options left out keep the stage's defaults."""
    settings = {field: getattr(args, option) for option, field in _OPTION_FIELDS.items() if hasattr(args, option)}
    model = {key: value for key, value in (("encoder_widths" if args.stage in DARN_STAGES else "widths", args.widths),
                                          ("order", getattr(args, "order", None))) if value is not None}
    return TrainConfig(stage=args.stage, model=model, **settings)


def _listed(values) -> str:
    return ",".join(str(value) for value in values)


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values

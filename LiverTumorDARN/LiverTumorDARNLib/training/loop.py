"""The one training loop, for every stage: the stage's task says what to train on, the loop how.

    TrainConfig -> the stage's task (darn_task: liver, tumor; refine_task: refine)
      -> a pool of its cases (data.py), a batch from the pool each iteration
      -> the network under autocast -> the task's loss -> AdamW, poly LR, gradient clipping
      -> validation every ``val_every`` iterations -> best.pt (on the task's score) and last.pt

Choices and why (nnU-Net, Isensee et al. 2021, unless said otherwise):

- Optimiser: AdamW with nnU-Net's poly schedule (exponent 0.9), not nnU-Net's SGD + Nesterov:
  SGD at lr 0.01 needs nnU-Net's ~250k iterations, while the runs here are thousands of
  iterations on a CPU or one GPU, where Adam converges faster and is less sensitive to the
  learning rate with small batches. The LR is a pure function of the iteration, so a resumed run
  is at the same schedule position. Gradients are clipped to norm 12 (nnU-Net).
- Mixed precision (``amp``): autocast in the task's precision, on by default on CUDA only.
  float16 needs loss scaling (GradScaler), bfloat16 has float32's range and does not. On a CPU
  only where it has native bfloat16 (see :func:`resolve_amp`).
- Distributed: under ``torchrun`` (WORLD_SIZE > 1) each process trains a DistributedDataParallel
  replica with its own cases (rank offset) and the same batch size and learning rate; only rank
  0 validates, shows progress and writes files. At the end the ranks compare a checksum of their
  weights and the checkpoint records them.
- A run never replaces another run's checkpoints; ``resume`` continues one exactly where it
  stopped (weights, optimiser, loss scale, iteration, best score), and only with the same stage
  and network; ``init_from`` starts from exported weights of the same stage and network, or of
  one that takes fewer input channels (a refiner trained before the click channels), whose
  missing channels start at zero weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError
from ..pipeline import resolve_device
from ..weights import load_model
from .checkpoints import plain, refuse_to_overwrite, resume_checkpoint, save_checkpoint, weights_checksum
from .data import CasePool, Prepared, RawCase, case_workers, make_cases, raw_sources
from .options import DARN_STAGES, TrainConfig

MAX_GRADIENT_NORM = 12.0
POLY_EXPONENT = 0.9


class Task(Protocol):
    """What the loop needs to know of a stage (:class:`darn_task.DarnTask`, :class:`refine_task.RefineTask`)."""

    name: str
    """The stage's name; also its entry in a weights manifest."""
    stage_record: dict
    """What the checkpoint records as its ``stage`` (export copies it into the manifest)."""
    architecture: dict
    """The network's constructor arguments (``models.build_model``), the checkpoint's ``model_config``."""
    exported_architecture: dict
    """The same as ``export`` writes it to a manifest (``init_from`` compares it)."""
    score: str
    """The validation score ``best.pt`` is chosen on."""
    validation_seed_start: int

    def build(self) -> nn.Module: ...
    def training_network(self, model: nn.Module) -> nn.Module: ...
    def autocast_dtype(self, device: torch.device) -> torch.dtype: ...
    def prepare(self) -> Callable[[RawCase], Any]: ...
    def batch(self, cases: Sequence, size: int, rng: np.random.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]: ...
    def loss(self, outputs, targets: torch.Tensor) -> torch.Tensor: ...
    def validation_set(self, cases: Sequence) -> Any: ...
    def validate(self, model: nn.Module, validation_set: Any, device: torch.device, amp: bool) -> dict[str, float]: ...


def make_task(config: TrainConfig) -> Task:
    """The task of ``config.stage``."""
    if config.stage in DARN_STAGES:
        from .darn_task import DarnTask

        return DarnTask(config)
    from .refine_task import RefineTask

    return RefineTask(config)


def train(config: TrainConfig) -> Path:
    """Train (or resume) one stage; returns the path of ``last.pt`` in ``config.out_dir``."""
    if not config.resume:
        refuse_to_overwrite(Path(config.out_dir))
    task = make_task(config)
    device = resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    world = _start_world(device)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    try:
        return _train(config, task, device, world)
    finally:
        if world.size > 1:
            dist.barrier()
            dist.destroy_process_group()


def _train(config: TrainConfig, task: Task, device: torch.device, world: _World) -> Path:
    from tqdm import tqdm

    out_dir = Path(config.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    trainer = Trainer(config, task, device, world)
    if config.resume:
        trainer.restore(last_path)
    elif config.init_from is not None:
        trainer.start_from(Path(config.init_from))
    start = trainer.iteration
    rng = np.random.default_rng([config.seed, world.rank, start])
    torch.manual_seed(config.seed + 1 + world.rank + start)  # augmentation noise
    train_raw, val_raw = raw_sources(config, world.rank, world.size, task.validation_seed_start)
    with case_workers(config) as executor:
        # A resumed run goes on with the cases after those it has already been given.
        pool = CasePool(Prepared(train_raw, task.prepare()), config.pool_size, start // config.refresh_every, executor, rng)
        val_cases = make_cases(Prepared(val_raw, task.prepare(validation=True)), range(config.val_cases), executor) \
            if world.is_main else []
        validation_set = task.validation_set(val_cases)
        with tqdm(total=config.iterations, initial=start, desc=f"train {task.name}", unit="it",
                  disable=not world.is_main, dynamic_ncols=True) as progress, \
                _checkpoint_when_interrupted(trainer, last_path, start):
            while trainer.iteration < config.iterations:
                loss = trainer.step(pool.cases, rng)
                if trainer.iteration % config.refresh_every == 0:
                    pool.refresh()
                finished = trainer.iteration == config.iterations
                if world.is_main and (trainer.iteration % config.val_every == 0 or finished):
                    trainer.validate(validation_set, best_path)
                    if not finished:
                        save_checkpoint(trainer.checkpoint(), last_path)
                progress.set_postfix(loss=f"{loss:.3f}", **{f"val_{k}": f"{v:.3f}" for k, v in trainer.scores.items()})
                progress.update()
    checksums = _gather_checksums(trainer.model, world, device)
    if world.is_main:
        save_checkpoint({**trainer.checkpoint(), "replica_checksums": checksums}, last_path)
    return last_path


@contextlib.contextmanager
def _checkpoint_when_interrupted(trainer: Trainer, last_path: Path, start: int) -> Iterator[None]:
    """Whatever stops the run (Ctrl-C, a bad case, a full disk), the steps made since the last
    checkpoint are kept: ``last.pt`` is written at the iteration reached, and ``--resume`` goes on
    from there. A DDP rank other than the first writes nothing, as in a run that finishes."""
    try:
        yield
    except BaseException:
        if trainer.world.is_main and trainer.iteration > start:
            save_checkpoint(trainer.checkpoint(), last_path)
            print(f"training stopped at iteration {trainer.iteration}; {last_path} holds it, "
                  f"--resume goes on from there", file=sys.stderr)
        raise


class Trainer:
    """One process's network, optimiser and progress through the run."""

    def __init__(self, config: TrainConfig, task: Task, device: torch.device, world: _World):
        self.config, self.task, self.device, self.world = config, task, device, world
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = task.build().to(device)
        self.amp = resolve_amp(config.amp, device)
        self.precision = task.autocast_dtype(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and self.precision == torch.float16)
        self.iteration, self.best_score, self.scores = 0, None, {}
        self.network = task.training_network(self.model)
        if world.size > 1:
            self.network = nn.parallel.DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None)

    def start_from(self, models_dir: Path) -> None:
        """Start from exported weights of this stage and network. A DARN's deep-supervision heads,
        which export drops, start afresh; a network that takes fewer input channels than this one
        (a refiner exported before the click channels) gets zero weights for the others, so the run
        starts by computing exactly what that network computed."""
        module, entry = load_model(Path(models_dir), self.task.name)
        if _apart_from_inputs(entry["model"]) != _apart_from_inputs(self.task.exported_architecture):
            raise InputError(f"{models_dir}: its {self.task.name} network is {entry['model']}; "
                             f"this run builds {self.task.exported_architecture}")
        ours = self.model.state_dict()
        weights = {key: _with_input_channels(value, ours[key], models_dir) if key in ours else value
                   for key, value in module.state_dict().items()}
        missing = self.model.load_state_dict(weights, strict=False).missing_keys
        if any(not key.startswith("auxiliary_heads.") for key in missing):
            raise InputError(f"{models_dir}: its {self.task.name} network lacks {missing[0]}")

    def restore(self, path: Path) -> None:
        """Continue from a ``last.pt`` of the same stage and network."""
        checkpoint = resume_checkpoint(path, self.task.name, self.task.architecture)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):  # empty when written without loss scaling
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.iteration, self.best_score = checkpoint["iteration"], checkpoint["best_val_dice"]
        self.scores = checkpoint["val_scores"] or {}

    def step(self, cases: Sequence, rng: np.random.Generator) -> float:
        """One optimiser step on a fresh batch from ``cases``; returns the loss."""
        inputs, targets = self.task.batch(cases, self.config.batch_size, rng, self.device)
        return self.optimise(inputs, targets)

    def optimise(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimiser step on a batch already on the device, at the schedule's learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = poly_learning_rate(self.config.learning_rate, self.iteration, self.config.iterations)
        self.network.train()
        with torch.autocast(self.device.type, dtype=self.precision, enabled=self.amp):
            loss = self.task.loss(self.network(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.network.parameters(), MAX_GRADIENT_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        return float(loss.detach())

    def validate(self, validation_set: Any, best_path: Path) -> None:
        """Score the held-out cases and write ``best_path`` when the task's score improved."""
        if not validation_set:
            return
        self.scores = self.task.validate(self.model, validation_set, self.device, self.amp)
        if self.best_score is None or self.scores[self.task.score] > self.best_score:
            self.best_score = self.scores[self.task.score]
            save_checkpoint(self.checkpoint(), best_path)

    def checkpoint(self) -> dict:
        return {"model": self.model.state_dict(), "model_config": self.task.architecture,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "config": self.config.record(), "stage": self.task.stage_record,
                "best_val_dice": self.best_score, "val_scores": self.scores}


def _apart_from_inputs(architecture: dict) -> dict:
    return {key: value for key, value in plain(architecture).items() if key != "in_channels"}


def _with_input_channels(given: torch.Tensor, wanted: torch.Tensor, models_dir: Path) -> torch.Tensor:
    """``given`` as a weight of ``wanted``'s shape: a first convolution that reads fewer input
    channels (dimension 1) is padded with zeros; a wider one is refused."""
    if given.shape == wanted.shape:
        return given
    if given.dim() != 5 or given.shape[0] != wanted.shape[0] or given.shape[2:] != wanted.shape[2:] \
            or given.shape[1] > wanted.shape[1]:
        raise InputError(f"{models_dir}: its network takes {given.shape[1]} input channels; "
                         f"this run builds one that takes {wanted.shape[1]}")
    widened = torch.zeros_like(wanted)
    widened[:, :given.shape[1]] = given
    return widened


def resolve_amp(requested: bool | None, device: torch.device) -> bool:
    """Whether to train under autocast: by default on CUDA only; on a CPU only where it has native
    bfloat16 (AVX-512 BF16 or AMX), because elsewhere bfloat16 convolutions are emulated and a
    training step takes many times longer than in float32."""
    if requested is None:
        return device.type == "cuda"
    if requested and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        warnings.warn("--amp ignored: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), "
                      "where mixed precision is many times slower than float32")
        return False
    return requested


def poly_learning_rate(base: float, iteration: int, total: int) -> float:
    return base * (1 - iteration / max(total, 1)) ** POLY_EXPONENT


# --------------------------------------------------------------------------------------------
# Distributed


@dataclasses.dataclass(frozen=True)
class _World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


WORLD_OF_ONE = _World(0, 1, 0)


def _start_world(device: torch.device) -> _World:
    """Join the torchrun process group when there is one (WORLD_SIZE > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return WORLD_OF_ONE
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _World(dist.get_rank(), size, int(os.environ.get("LOCAL_RANK", "0")))


def _gather_checksums(model: nn.Module, world: _World, device: torch.device) -> list[str]:
    """Every rank's :func:`weights_checksum` (DDP replicas must agree; a mismatch is a bug)."""
    checksum = weights_checksum(model)
    if world.size == 1:
        return [checksum]
    mine = torch.tensor(list(bytes.fromhex(checksum)), dtype=torch.uint8, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(everyone, mine)
    return [bytes(t.cpu().tolist()).hex() for t in everyone]


def run(args) -> int:
    """``livertumordarn train``: train from parsed options and print the final checkpoint's path
    (rank 0 only)."""
    from .options import config_from_args

    last = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(last)
    return 0

"""Training DARN for one stage of the cascade, on LiTS files or on phantoms drawn on the fly.

    cases (LiTS folder, or phantoms)  -> prepare_case for the stage (the same code as inference)
      -> a pool of prepared cases in memory, one case replaced every ``refresh_every`` iterations
      -> patches with foreground oversampling -> cheap augmentation on the device
      -> DARN (deep supervision) -> Dice + cross-entropy -> AdamW, poly LR, gradient clipping
      -> validation Dice on held-out cases -> last.pt / best.pt

Choices and why (nnU-Net, Isensee et al. 2021, unless said otherwise):

- Data: cases go through :func:`pipeline.prepare_case`, so training sees exactly the grids and
  intensities inference sees. A pool of ``pool_size`` cases stays in memory (a full-size phantom
  costs ~5 s to draw, a LiTS volume seconds to read), and one case is swapped for a new one
  every ``refresh_every`` iterations, drawn in a background process when cases are slow to
  make, so training sees many cases without waiting for them.
- Phantom seeds: training uses ``phantom_seed_start`` upwards (interleaved over DDP ranks),
  validation phantoms :data:`VALIDATION_SEED_START` upwards, and the benchmark owns
  :data:`BENCHMARK_SEED_START` upwards; a run whose seeds would reach the validation range is
  refused, so no benchmark case is ever trained on. A share ``randomize_fraction`` of the
  training phantoms is domain-randomised (SynthSeg-style); validation phantoms never are, because
  the target is realistic CT.
- LiTS folders: ``volume-K.nii[.gz]`` with ``segmentation-K.nii[.gz]``; ``val_cases`` pairs are
  held out by a permutation seeded with ``seed`` (the same on every rank and on resume), not the
  last K, because LiTS case numbers group the contributing hospitals.
- Patches: a quarter centred anywhere, a quarter on a liver voxel, half on a voxel of the highest
  foreground class present (tumor in the tumor stage when the case has one, else liver), as
  nnU-Net's foreground oversampling. Half, not nnU-Net's third: most phantom and LiTS tumors are
  small (a 1 cm tumor fills 0.3 % of a 48^3 patch at 1.5 mm), and with a third the first CPU
  runs still predicted no tumor after 1000 iterations. Where a patch leaves the volume it is
  filled with normalised air (labels: background), as inference pads.
- Augmentation, on the device, per sample: scaling 0.85-1.25 and rotation up to 15 degrees
  about the cranio-caudal axis (one ``grid_sample``), intensity scale and shift, gamma, gaussian
  noise. No mirroring on any axis: nnU-Net mirrors, but the canonical orientation puts the liver
  on the patient's right (low x), below the diaphragm and in front of the spine; a mirrored patch
  shows anatomy that never occurs and teaches the network to look for liver on the wrong side.
  Elastic deformation is left out: it costs more than the network on a CPU.
- Loss: cross-entropy plus soft Dice over the foreground classes, computed over the whole batch
  ("batch Dice"); with deep supervision the auxiliary outputs get weights halving per level
  (normalised to sum 1) against labels reduced by max-pooling, which keeps a tumor visible at
  coarse levels (labels are nested: tumor 2 > liver 1 > background 0).
- Optimiser: AdamW with nnU-Net's poly schedule (exponent 0.9), not nnU-Net's SGD + Nesterov:
  SGD at lr 0.01 needs nnU-Net's ~250k iterations, while the runs here are thousands of
  iterations on a CPU or one GPU, where Adam converges faster and is less sensitive to the
  learning rate with batches of 2. The LR is a pure function of the iteration, so a resumed run
  is at the same schedule position. Gradients are clipped to norm 12 (nnU-Net).
- Mixed precision (autocast + GradScaler) on CUDA only; CPU autocast would be slower.
- Distributed: under ``torchrun`` (WORLD_SIZE > 1) each process trains a DistributedDataParallel
  replica with its own data seed (rank offset) and the same batch size and learning rate; only
  rank 0 validates, shows progress and writes files. At the end the ranks compare a checksum of
  their weights and the checkpoint records them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import math
import multiprocessing
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .io import read_ct, read_image
from .models import DARN, build_model
from .phantom import BENCHMARK_SEED_START, VALIDATION_SEED_START, generate_case
from .weights import load_model, read_checkpoint
from .pipeline import AIR_VALUE, STAGES, StageSpec, normalize_hu, prepare_case, resolve_device

NORMALISED_AIR = float(normalize_hu(np.array(AIR_VALUE)))
"""The network-input value of air, used wherever a patch or a volume is padded."""

MAX_GRADIENT_NORM = 12.0
POLY_EXPONENT = 0.9
MAX_CENTRES_PER_CLASS = 10_000
"""Voxel positions kept per class for centring patches (a random subset, as nnU-Net)."""

VALIDATION_VOXEL_BUDGET = 6_000_000
"""Largest volume validated in one forward pass; bigger ones are cropped around their centre."""

LITS_NAME = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint."""

    stage: str = "liver"
    data: Path | None = None
    """A folder in the LiTS layout, or None for cases drawn on the fly."""
    anatomy: Path | None = None
    """A folder of real label maps to draw CT on (:mod:`anatomy`); None: phantoms only."""
    phantom_fraction: float = 0.2
    """With ``anatomy``: the share of training cases that are phantoms all the same."""
    init_from: Path | None = None
    """A weights folder (as ``export`` writes it) whose network for this stage starts the run."""
    phantom_seed_start: int = 0
    """First training phantom seed; seeds from VALIDATION_SEED_START (benchmark: 900000) are refused."""
    randomize_fraction: float = 0.5
    phantom_small: bool = False
    pool_size: int = 8
    refresh_every: int = 10
    iterations: int = 2000
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    model: dict = dataclasses.field(default_factory=lambda: {
        "encoder_widths": (8, 16, 32, 64, 128), "pyramid_width": 16, "order": "spa_sem"})
    deep_supervision: bool = True
    val_cases: int = 2
    val_every: int = 200
    out_dir: Path = Path("checkpoints")
    resume: bool = False
    device: str = "auto"
    amp: bool | None = None
    """None: on for CUDA, off otherwise."""
    num_threads: int | None = None
    seed: int = 0
    patch_size: tuple[int, int, int] | None = None
    """(z, y, x) override of the stage's patch size (small GPUs, tests)."""


# --------------------------------------------------------------------------------------------
# Cases: where they come from and how they are held


@dataclasses.dataclass
class PoolCase:
    """A prepared case plus a random subset of the positions of each foreground class."""

    image: np.ndarray  # float32 [z, y, x], normalised
    labels: np.ndarray  # uint8 [z, y, x], the stage's classes
    class_voxels: dict[int, np.ndarray]  # class -> [n, 3] (z, y, x) indices, n may be 0

    @classmethod
    def from_arrays(cls, image: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0) -> "PoolCase":
        rng = np.random.default_rng(seed)
        class_voxels = {}
        for label in range(1, num_classes):
            positions = np.argwhere(labels == label)
            if len(positions) > MAX_CENTRES_PER_CLASS:
                positions = positions[rng.choice(len(positions), MAX_CENTRES_PER_CLASS, replace=False)]
            class_voxels[label] = positions
        return cls(image.astype(np.float32, copy=False), labels.astype(np.uint8, copy=False), class_voxels)


def _prepared(image, labels, stage: StageSpec, seed: int) -> PoolCase:
    prepared = prepare_case(image, labels, stage)
    return PoolCase.from_arrays(prepared.image, prepared.labels, stage.num_classes, seed)


@dataclasses.dataclass(frozen=True)
class PhantomSource:
    """Case ``index`` is the phantom with seed ``first_seed + index * stride`` (picklable for workers)."""

    stage: StageSpec
    first_seed: int
    stride: int
    small: bool
    randomize_fraction: float

    def seed(self, index: int) -> int:
        return self.first_seed + index * self.stride

    def __call__(self, index: int) -> PoolCase:
        seed = self.seed(index)
        randomize = bool(np.random.default_rng([seed, 2]).random() < self.randomize_fraction)
        case = generate_case(seed, small=self.small, randomize=randomize)
        return _prepared(case.image, case.labels, self.stage, seed)


@dataclasses.dataclass(frozen=True)
class AnatomySource:
    """Case ``index`` is CT drawn on one of ``maps`` (picked by the case's seed, or taken in turn
    with ``in_turn``), or with probability ``phantom_fraction`` a phantom of that seed."""

    stage: StageSpec
    maps: tuple[Path, ...]
    first_seed: int
    stride: int
    randomize_fraction: float
    phantom_fraction: float
    in_turn: bool = False

    def __call__(self, index: int) -> PoolCase:
        from .anatomy import draw_case

        seed = self.first_seed + index * self.stride
        rng = np.random.default_rng([seed, 3])
        randomize = bool(rng.random() < self.randomize_fraction)
        if rng.random() < self.phantom_fraction:
            case = generate_case(seed, randomize=randomize)
        else:
            first = index if self.in_turn else int(rng.integers(len(self.maps)))
            case = _first_drawable(self.maps, first, seed, randomize, draw_case)
        return _prepared(case.image, case.labels, self.stage, seed)


def _first_drawable(maps: Sequence[Path], first: int, seed: int, randomize: bool, draw: Callable):
    """The case drawn on ``maps[first]``, or on the next map that can be drawn, with a warning:
    one odd map must not stop a run of hours."""
    for offset in range(len(maps)):
        path = maps[(first + offset) % len(maps)]
        try:
            return draw(path, seed, randomize=randomize)
        except InputError as error:
            warnings.warn(f"skipped a label map while drawing training cases: {error}")
    raise InputError(f"no label map among {len(maps)} could be drawn on")


@dataclasses.dataclass(frozen=True)
class LitsSource:
    """Case ``index`` is pair ``index mod n`` of a fixed list of (volume, segmentation) files."""

    stage: StageSpec
    pairs: tuple[tuple[Path, Path], ...]

    def __call__(self, index: int) -> PoolCase:
        volume, segmentation = self.pairs[index % len(self.pairs)]
        return _prepared(read_ct(volume), read_image(segmentation), self.stage, index)


def find_lits_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(volume, segmentation) files of a LiTS-layout folder, paired by case number, sorted by it."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; --data needs a folder of volume-K.nii[.gz] and segmentation-K.nii[.gz] files")
    found: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for path in folder.iterdir():
        match = LITS_NAME.match(path.name)
        if match:
            found[match.group(1)][int(match.group(2))] = path
    numbers = sorted(found["volume"].keys() & found["segmentation"].keys())
    if not numbers:
        raise InputError(f"{folder}: no volume-K.nii[.gz] with a matching segmentation-K.nii[.gz]; expected the LiTS layout")
    return [(found["volume"][k], found["segmentation"][k]) for k in numbers]


def split_lits_pairs(pairs: Sequence[tuple[Path, Path]], val_cases: int, seed: int) -> tuple[list, list]:
    """(training, validation) pairs; the held-out ones are chosen by a permutation seeded with ``seed``."""
    if len(pairs) <= val_cases:
        raise InputError(f"{len(pairs)} case(s) in the data folder, {val_cases} held out for validation: none left to train on; lower --val-cases")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order[val_cases:]], [pairs[i] for i in order[:val_cases]]


def make_cases(source: Callable[[int], PoolCase], indices: Sequence[int],
               executor: concurrent.futures.Executor | None) -> list[PoolCase]:
    """Cases ``indices`` of ``source``, in worker processes when there is an executor."""
    if executor is None:
        return [source(i) for i in indices]
    return list(executor.map(source, indices))


class CasePool:
    """Prepared cases held in memory; :meth:`refresh` swaps one for the next case of the source.

    With an executor the cases are made in worker processes and a refresh never waits: it swaps
    in the case made in the background since the last refresh, if it is ready.
    """

    def __init__(self, source: Callable[[int], PoolCase], size: int, first_index: int,
                 executor: concurrent.futures.Executor | None, rng: np.random.Generator):
        self._source, self._executor, self._rng = source, executor, rng
        self.cases = make_cases(source, range(first_index, first_index + size), executor)
        self._next_index = first_index + size
        self._pending: concurrent.futures.Future | None = None

    def refresh(self) -> None:
        if self._executor is None:
            self._replace_one(self._source(self._next_index))
            self._next_index += 1
            return
        if self._pending is not None and self._pending.done():
            self._replace_one(self._pending.result())
            self._pending = None
        if self._pending is None:
            self._pending = self._executor.submit(self._source, self._next_index)
            self._next_index += 1

    def _replace_one(self, case: PoolCase) -> None:
        self.cases[int(self._rng.integers(len(self.cases)))] = case


@contextlib.contextmanager
def _case_workers(config: TrainConfig) -> Iterator[concurrent.futures.Executor | None]:
    """Worker processes for making cases, or None for small phantoms (30 ms each, not worth it).

    Spawned, not forked: a fork of a process running torch's thread pools can deadlock. On exit
    a case still being made is abandoned rather than waited for.
    """
    if config.data is None and config.phantom_small:
        yield None
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = max(1, min(config.pool_size, (os.cpu_count() or 1) // local_ranks))
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield executor
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Patches


def choose_focus(case: PoolCase, rng: np.random.Generator) -> int | None:
    """The class a patch is centred on (None: anywhere); see the module docstring for the shares."""
    present = [label for label, voxels in case.class_voxels.items() if len(voxels)]
    draw = rng.random()
    if draw < 0.25 or not present:
        return None
    return min(present) if draw < 0.5 else max(present)


def sample_patch(case: PoolCase, patch_size: Sequence[int], focus: int | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An (image, labels) patch of exactly ``patch_size`` centred on a voxel of class ``focus``
    (or anywhere), padded with normalised air and background where it leaves the volume."""
    if focus is None or not len(case.class_voxels.get(focus, ())):
        centre = np.array([rng.integers(n) for n in case.image.shape])
    else:
        voxels = case.class_voxels[focus]
        centre = voxels[rng.integers(len(voxels))]
    start = [int(c) - p // 2 for c, p in zip(centre, patch_size)]
    return (crop_with_padding(case.image, start, patch_size, NORMALISED_AIR),
            crop_with_padding(case.labels, start, patch_size, 0))


def crop_with_padding(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``array[start:start + size]`` along every axis, with ``fill`` where that lies outside."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    source = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, array.shape))
    target = tuple(slice(src.start - s, src.stop - s) for src, s in zip(source, start))
    if all(src.stop > src.start for src in source):
        out[target] = array[source]
    return out


def sample_batch(cases: Sequence[PoolCase], batch_size: int, patch_size: Sequence[int],
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 1, z, y, x] float32 and labels [B, z, y, x] int64 from random pool cases."""
    images, labels = [], []
    for _ in range(batch_size):
        case = cases[int(rng.integers(len(cases)))]
        image, label = sample_patch(case, patch_size, choose_focus(case, rng), rng)
        images.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(labels).astype(np.int64))


# --------------------------------------------------------------------------------------------
# Augmentation (no mirroring: see the module docstring)


def augment(images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly scaled/rotated (in the axial plane), intensity-jittered copies of a batch.

    images [B, 1, z, y, x], labels [B, z, y, x]; returns new tensors of the same shapes.
    """
    images, labels = images.clone(), labels.clone()
    for b in range(images.shape[0]):
        if rng.random() < 0.3:
            images[b], labels[b] = _scale_and_rotate(images[b], labels[b], rng.uniform(0.85, 1.25),
                                                     math.radians(rng.uniform(-15, 15)))
        images[b] = _jitter_intensity(images[b], rng)
    return images, labels


def _scale_and_rotate(image: torch.Tensor, labels: torch.Tensor, scale: float, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom by ``scale`` about the patch centre and rotate by ``angle`` about z (a proper rotation:
    left stays left). image [1, z, y, x], labels [z, y, x]."""
    depth, height, width = labels.shape
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # Output -> input voxel offsets (x, y, z order), mapped into grid_sample's [-1, 1] coordinates.
    voxel = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0 / scale]], dtype=torch.float32)
    to_unit = torch.diag(torch.tensor([2.0 / width, 2.0 / height, 2.0 / depth]))
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = to_unit @ voxel @ torch.linalg.inv(to_unit)
    grid = F.affine_grid(theta.to(image.device), [1, 1, depth, height, width], align_corners=False)
    # grid_sample pads with zeros: shift so that zero is air, and background for the labels.
    moved = F.grid_sample((image - NORMALISED_AIR)[None], grid, mode="bilinear", align_corners=False)[0] + NORMALISED_AIR
    moved_labels = F.grid_sample(labels[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0]
    return moved, moved_labels.to(labels.dtype)


def _jitter_intensity(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """nnU-Net's intensity augmentations with its probabilities; sizes relative to the patch's std."""
    spread = float(image.std()) + 1e-6
    if rng.random() < 0.15:
        image = image * rng.uniform(0.75, 1.25)
    if rng.random() < 0.15:
        image = image + rng.uniform(-0.1, 0.1) * spread
    if rng.random() < 0.3:
        low, high = image.min(), image.max()
        unit = (image - low) / (high - low + 1e-6)
        image = unit ** rng.uniform(0.7, 1.5) * (high - low) + low
    if rng.random() < 0.15:
        image = image + torch.randn_like(image) * rng.uniform(0.0, 0.1) * spread
    return image


# --------------------------------------------------------------------------------------------
# Loss


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Cross-entropy + (1 - batch soft Dice averaged over the foreground classes); 0 when perfect.

    logits [B, C, z, y, x], target [B, z, y, x] class indices.
    """
    logits = logits.float()
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probabilities.dtype)
    axes = (0, 2, 3, 4)  # batch Dice: sums over the batch too, so a patch without tumor is no 0/0
    intersection = (probabilities * one_hot).sum(axes)
    total = probabilities.sum(axes) + one_hot.sum(axes)
    dice = (2 * intersection + smooth) / (total + smooth)
    return F.cross_entropy(logits, target) + (1 - dice[1:].mean())


def deep_supervision_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Weighted :func:`dice_ce_loss` over the main and auxiliary outputs (weights 1, 1/2, 1/4 ...
    normalised to sum 1), labels max-pooled to each auxiliary resolution."""
    weights = [0.5 ** level for level in range(len(outputs))]
    total = 0.0
    for weight, output in zip(weights, outputs):
        level_target = target
        if output.shape[2:] != target.shape[1:]:
            level_target = F.adaptive_max_pool3d(target[:, None].float(), output.shape[2:])[:, 0].long()
        total = total + weight * dice_ce_loss(output, level_target)
    return total / sum(weights)


class _AllOutputs(nn.Module):
    """Routes ``forward`` to ``forward_with_auxiliary``, so DistributedDataParallel sees the
    call that computes the deep-supervision heads (DDP synchronises only through ``forward``)."""

    def __init__(self, model: DARN):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_with_auxiliary(x)


def resolve_amp(requested: bool | None, device: torch.device) -> bool:
    """Whether to train under autocast: by default on CUDA only; on a CPU only where it has native
    bfloat16 (AVX-512 BF16 or AMX), because elsewhere bfloat16 convolutions are emulated and a
    training step takes 10-20 times longer than in float32 (measured on an AVX2-only CPU)."""
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
# Validation


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of each foreground class; 1.0 where both are empty (LiTS per-case convention)."""
    scores = {}
    for label in range(1, num_classes):
        predicted, true = prediction == label, truth == label
        denominator = int(predicted.sum()) + int(true.sum())
        scores[label] = 1.0 if denominator == 0 else 2.0 * int((predicted & true).sum()) / denominator
    return scores


def _centred_window(shape: Sequence[int], multiple: int, budget: int) -> tuple[slice, ...]:
    """A centred crop, shrunk along its longest axis by ``multiple`` until it fits ``budget`` voxels."""
    size = [max(multiple, math.ceil(n / multiple) * multiple) for n in shape]
    while math.prod(size) > budget and max(size) > multiple:
        size[int(np.argmax(size))] -= multiple
    starts = [(n - s) // 2 for n, s in zip(shape, size)]
    return tuple(slice(a, a + s) for a, s in zip(starts, size))


@torch.no_grad()
def validate(model: DARN, cases: Sequence[PoolCase], num_classes: int, device: torch.device,
             amp: bool, voxel_budget: int = VALIDATION_VOXEL_BUDGET) -> dict[str, float]:
    """Mean Dice over the held-out cases: one forward pass on each whole case (padded to the
    model's size multiple with air) or on its centred crop when over ``voxel_budget``."""
    was_training = model.training
    model.eval()
    scores: dict[int, list[float]] = {label: [] for label in range(1, num_classes)}
    for case in cases:
        window = _centred_window(case.image.shape, model.size_multiple, voxel_budget)
        start = [w.start for w in window]
        size = [w.stop - w.start for w in window]
        image = crop_with_padding(case.image, start, size, NORMALISED_AIR)
        truth = crop_with_padding(case.labels, start, size, 0)
        with torch.autocast(device.type, enabled=amp):
            logits = model(torch.from_numpy(image)[None, None].to(device))
        prediction = logits.argmax(1)[0].cpu().numpy()
        for label, score in dice_per_class(prediction, truth, num_classes).items():
            scores[label].append(score)
    model.train(was_training)
    names = {1: "liver", 2: "tumor"}
    result = {names[label]: float(np.mean(values)) for label, values in scores.items()}
    result["mean"] = float(np.mean(list(result.values())))
    return result


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(payload: dict, path: Path) -> Path:
    """torch.save to a temp file next to ``path``, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.partial-{secrets.token_hex(6)}")
    try:
        with open(temp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    return path


def _config_record(config: TrainConfig) -> dict:
    """The config as plain values (paths as strings), for checkpoints."""
    record = dataclasses.asdict(config)
    for key in ("data", "out_dir", "anatomy", "init_from"):
        record[key] = None if record[key] is None else str(record[key])
    return record


def model_config(config: TrainConfig, stage: StageSpec) -> dict:
    """Constructor arguments of :class:`DARN` for this run (stored in checkpoints and manifests)."""
    merged = {**config.model, "in_channels": 1, "num_classes": stage.num_classes,
              "deep_supervision": config.deep_supervision}
    merged["encoder_widths"] = tuple(merged.get("encoder_widths", (8, 16, 32, 64, 128)))
    return merged


def _load_resume_checkpoint(path: Path, config: TrainConfig, architecture: dict) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint to resume from; train without --resume first")
    checkpoint = read_checkpoint(path)
    if checkpoint["config"]["stage"] != config.stage or checkpoint["model_config"] != architecture:
        raise InputError(f"{path}: checkpoint was trained for stage {checkpoint['config']['stage']!r} with model "
                         f"{checkpoint['model_config']}; this run asks for stage {config.stage!r} with {architecture}")
    return checkpoint


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 of the parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def _start_world(device: torch.device) -> _World:
    """Join the torchrun process group when there is one (WORLD_SIZE > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _World(0, 1, 0)
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


# --------------------------------------------------------------------------------------------
# The training loop


def _resolve_stage(config: TrainConfig) -> StageSpec:
    if config.stage not in STAGES:
        raise InputError(f"unknown stage {config.stage!r}; choose one of {', '.join(STAGES)}")
    stage = STAGES[config.stage]
    if config.patch_size is not None:
        stage = dataclasses.replace(stage, patch_size=tuple(int(n) for n in config.patch_size))
    return stage


def _check_config(config: TrainConfig, stage: StageSpec, multiple: int, world: _World) -> None:
    """Refuse settings that would fail late or train on validation/benchmark phantoms."""
    if any(n % multiple for n in stage.patch_size):
        raise InputError(f"patch size {stage.patch_size} must be divisible by {multiple} for a model with "
                         f"{int(math.log2(multiple)) + 1} levels")
    for name in ("iterations", "batch_size", "pool_size", "refresh_every", "val_every"):
        if getattr(config, name) < 1:
            raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.data is not None and config.anatomy is not None:
        raise InputError("train on a LiTS-layout folder or on label maps to draw CT on, not both")
    if not 0 <= config.phantom_fraction <= 1:
        raise InputError(f"the phantom share must lie in 0..1, got {config.phantom_fraction}")
    if config.data is None:
        cases_per_rank = config.pool_size + config.iterations // config.refresh_every + 1
        last_seed = config.phantom_seed_start + cases_per_rank * world.size
        if config.phantom_seed_start < 0 or last_seed >= VALIDATION_SEED_START:
            raise InputError(f"training phantom seeds {config.phantom_seed_start}..{last_seed} must lie in "
                             f"0..{VALIDATION_SEED_START - 1}: validation phantoms start at {VALIDATION_SEED_START}, "
                             f"benchmark phantoms at {BENCHMARK_SEED_START}")


def _sources(config: TrainConfig, stage: StageSpec, world: _World) -> tuple[Callable, Callable]:
    """(training source for this rank, validation source)."""
    if config.anatomy is not None:
        from .anatomy import split_maps, usable_label_maps

        train_maps, val_maps = split_maps(usable_label_maps(Path(config.anatomy)))
        if not val_maps or not train_maps:
            raise InputError(f"{config.anatomy}: too few usable label maps to hold some out for validation")
        train = AnatomySource(stage, tuple(train_maps), config.phantom_seed_start + world.rank, world.size,
                              config.randomize_fraction, config.phantom_fraction)
        return train, AnatomySource(stage, tuple(val_maps), VALIDATION_SEED_START, 1, 0.0, 0.0, in_turn=True)
    if config.data is None:
        train = PhantomSource(stage, config.phantom_seed_start + world.rank, world.size,
                              config.phantom_small, config.randomize_fraction)
        return train, PhantomSource(stage, VALIDATION_SEED_START, 1, config.phantom_small, 0.0)
    train_pairs, val_pairs = split_lits_pairs(find_lits_pairs(Path(config.data)), config.val_cases, config.seed)
    rank_order = np.random.default_rng([config.seed, world.rank]).permutation(len(train_pairs))
    return (LitsSource(stage, tuple(train_pairs[i] for i in rank_order)),
            LitsSource(stage, tuple(val_pairs)))


def train(config: TrainConfig) -> Path:
    """Train (or resume) one stage; returns the path of ``last.pt`` in ``config.out_dir``."""
    stage = _resolve_stage(config)
    device = resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    world = _start_world(device)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    try:
        return _train(config, stage, device, world)
    finally:
        if world.size > 1:
            dist.barrier()
            dist.destroy_process_group()


class _Trainer:
    """One process's model, optimiser and progress through the run."""

    def __init__(self, config: TrainConfig, stage: StageSpec, device: torch.device, world: _World):
        self.config, self.stage, self.device, self.world = config, stage, device, world
        self.architecture = model_config(config, stage)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = build_model(self.architecture).to(device)
        _check_config(config, stage, self.model.size_multiple, world)
        self.amp = resolve_amp(config.amp, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        self.iteration, self.best_dice, self.scores = 0, None, {}
        self.network: nn.Module = _AllOutputs(self.model)
        if world.size > 1:
            self.network = nn.parallel.DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None)

    def start_from(self, models_dir: Path) -> None:
        """Start from exported weights of this stage and architecture (their deep-supervision
        heads, which export drops, start afresh)."""
        module, entry = load_model(Path(models_dir), self.stage.name)
        exported = {**self.architecture, "deep_supervision": False}
        if {k: tuple(v) if isinstance(v, list) else v for k, v in entry["model"].items()} != exported:
            raise InputError(f"{models_dir}: its {self.stage.name} network is {entry['model']}; this run builds {exported}")
        missing = self.model.load_state_dict(module.state_dict(), strict=False).missing_keys
        if any(not key.startswith("auxiliary_heads.") for key in missing):
            raise InputError(f"{models_dir}: its {self.stage.name} network lacks {missing[0]}")

    def restore(self, path: Path) -> None:
        """Continue from a ``last.pt`` of the same stage and architecture."""
        checkpoint = _load_resume_checkpoint(path, self.config, self.architecture)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.iteration, self.best_dice = checkpoint["iteration"], checkpoint["best_val_dice"]
        self.scores = checkpoint["val_scores"]

    def step(self, cases: Sequence[PoolCase], rng: np.random.Generator) -> float:
        """One optimiser step on a fresh augmented batch; returns the loss."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = poly_learning_rate(config.learning_rate, self.iteration, config.iterations)
        images, labels = sample_batch(cases, config.batch_size, self.stage.patch_size, rng)
        images, labels = augment(images.to(self.device), labels.to(self.device), rng)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss = deep_supervision_loss(self.network(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.network.parameters(), MAX_GRADIENT_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        return float(loss.detach())

    def validate(self, cases: Sequence[PoolCase], best_path: Path) -> None:
        """Score the held-out cases and write ``best_path`` when the mean Dice improved."""
        if not cases:
            return
        self.scores = validate(self.model, cases, self.stage.num_classes, self.device, self.amp)
        if self.best_dice is None or self.scores["mean"] > self.best_dice:
            self.best_dice = self.scores["mean"]
            save_checkpoint(self.checkpoint(), best_path)

    def checkpoint(self) -> dict:
        return {"model": self.model.state_dict(), "model_config": self.architecture,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "config": _config_record(self.config),
                "stage": dataclasses.asdict(self.stage), "best_val_dice": self.best_dice,
                "val_scores": self.scores}


def _train(config: TrainConfig, stage: StageSpec, device: torch.device, world: _World) -> Path:
    from tqdm import tqdm

    out_dir = Path(config.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if last_path.exists() and not config.resume:
        raise InputError(f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose another --out")
    trainer = _Trainer(config, stage, device, world)
    if config.resume:
        trainer.restore(last_path)
    elif config.init_from is not None:
        trainer.start_from(Path(config.init_from))
    start = trainer.iteration
    rng = np.random.default_rng([config.seed, world.rank, start])
    torch.manual_seed(config.seed + 1 + world.rank + start)  # augmentation noise
    train_source, val_source = _sources(config, stage, world)
    with _case_workers(config) as executor:
        # A resumed run goes on with the cases after those it has already been given.
        pool = CasePool(train_source, config.pool_size, start // config.refresh_every, executor, rng)
        val_cases = make_cases(val_source, range(config.val_cases), executor) if world.is_main else []
        with tqdm(total=config.iterations, initial=start, desc=f"train {stage.name}", unit="it",
                  disable=not world.is_main, dynamic_ncols=True) as progress:
            while trainer.iteration < config.iterations:
                loss = trainer.step(pool.cases, rng)
                if trainer.iteration % config.refresh_every == 0:
                    pool.refresh()
                finished = trainer.iteration == config.iterations
                if world.is_main and (trainer.iteration % config.val_every == 0 or finished):
                    trainer.validate(val_cases, best_path)
                    if not finished:
                        save_checkpoint(trainer.checkpoint(), last_path)
                progress.set_postfix(loss=f"{loss:.3f}", **{f"val_{k}": f"{v:.3f}" for k, v in trainer.scores.items()})
                progress.update()
    checksums = _gather_checksums(trainer.model, world, device)
    if world.is_main:
        save_checkpoint({**trainer.checkpoint(), "replica_checksums": checksums}, last_path)
    return last_path


# --------------------------------------------------------------------------------------------
# Command line (the options themselves are declared in cli.py, which must start without torch)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from ``livertumordarn train`` options; options left out keep its defaults."""
    if args.patch_size is not None and len(args.patch_size) != 3:
        raise InputError(f"--patch-size needs three sizes z,y,x, got {args.patch_size}")
    for option in ("models", "darn_fraction"):
        if getattr(args, option, None) is not None:
            raise InputError(f"--{option.replace('_', '-')} is an option of --stage refine (the DARN masks it refines)")
    if args.widths is not None and len(args.widths) < 2:
        raise InputError(f"--widths needs at least two levels, got {args.widths}")
    defaults = TrainConfig()
    given = {field: getattr(args, option) for option, field in _OPTION_FIELDS.items()
             if getattr(args, option) is not None}
    model = {**defaults.model, **{key: value for key, value in
                                  (("encoder_widths", args.widths), ("order", args.order)) if value is not None}}
    return dataclasses.replace(defaults, **given, model=model, resume=args.resume,
                               phantom_small=args.small_phantoms)


_OPTION_FIELDS = {
    "stage": "stage", "data": "data", "out": "out_dir", "iterations": "iterations",
    "batch_size": "batch_size", "lr": "learning_rate", "device": "device", "val_cases": "val_cases",
    "val_every": "val_every", "pool_size": "pool_size", "refresh_every": "refresh_every",
    "randomize_fraction": "randomize_fraction", "phantom_seed_start": "phantom_seed_start",
    "patch_size": "patch_size", "seed": "seed", "threads": "num_threads", "amp": "amp",
    "anatomy": "anatomy", "phantom_fraction": "phantom_fraction", "init_from": "init_from",
}


def run(args: argparse.Namespace) -> int:
    """Train from parsed arguments and print the final checkpoint's path (rank 0 only)."""
    last = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(last)
    return 0

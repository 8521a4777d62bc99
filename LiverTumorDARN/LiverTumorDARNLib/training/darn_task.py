"""Training one DARN stage of the cascade (liver at 4 mm, tumor in the liver's box at 1.5 mm).

    RawCase -> pipeline.prepare_case for the stage (the same code as inference) -> PoolCase
      -> patches with foreground oversampling -> augmentation on the device (augmentation.py)
      -> DARN with deep supervision -> Dice + cross-entropy (losses.py)
      -> validation: Dice per class on whole held-out cases

- Cases go through :func:`pipeline.prepare_case`, so training sees exactly the grids and
  intensities inference sees.
- Patches: a quarter centred anywhere, a quarter on a liver voxel, half on a voxel of the highest
  foreground class present (tumor in the tumor stage when the case has one, else liver), as
  nnU-Net's foreground oversampling. Half, not nnU-Net's third: most phantom and LiTS tumors are
  small (a 1 cm tumor fills 0.3 % of a 48^3 patch at 1.5 mm), and with a third the first CPU
  runs still predicted no tumor after 1000 iterations. Where a patch leaves the volume it is
  filled with normalised air (labels: background), as inference pads.
- Deep supervision: the refined coarser levels get their own heads during training (see
  :mod:`losses`); export drops them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models import DARN, build_model
from ..phantom import VALIDATION_SEED_START
from ..pipeline import STAGES, StageSpec, prepare_case
from .augmentation import NORMALISED_AIR, augment
from .data import RawCase
from .losses import deep_supervision_loss
from .options import TrainConfig

MAX_CENTRES_PER_CLASS = 10_000
"""Voxel positions kept per class for centring patches (a random subset, as nnU-Net)."""

VALIDATION_VOXEL_BUDGET = 6_000_000
"""Largest volume validated in one forward pass; bigger ones are cropped around their centre."""

CLASS_NAMES = {1: "liver", 2: "tumor"}


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


@dataclasses.dataclass(frozen=True)
class PrepareForStage:
    """A raw case on the stage's working grid, as inference prepares it (picklable, for workers)."""

    stage: StageSpec

    def __call__(self, raw: RawCase) -> PoolCase:
        prepared = prepare_case(raw.image, raw.labels, self.stage)
        return PoolCase.from_arrays(prepared.image, prepared.labels, self.stage.num_classes, raw.seed)


class DarnTask:
    """The liver or tumor stage (see the module docstring); the loop's :class:`loop.Task`."""

    score = "mean"
    validation_seed_start = VALIDATION_SEED_START

    def __init__(self, config: TrainConfig):
        stage = STAGES[config.stage]
        if config.patch_size is not None:
            stage = dataclasses.replace(stage, patch_size=tuple(int(n) for n in config.patch_size))
        self.stage, self.name, self.stage_record = stage, stage.name, dataclasses.asdict(stage)
        self.architecture = {**config.model, "in_channels": 1, "num_classes": stage.num_classes,
                             "deep_supervision": True}
        self.architecture["encoder_widths"] = tuple(self.architecture["encoder_widths"])
        self.exported_architecture = {**self.architecture, "deep_supervision": False}

    def build(self) -> DARN:
        model = build_model(self.architecture)
        multiple = model.size_multiple
        if any(n % multiple for n in self.stage.patch_size):
            raise InputError(f"patch size {self.stage.patch_size} must be divisible by {multiple} for a model with "
                             f"{int(math.log2(multiple)) + 1} levels")
        return model

    def training_network(self, model: DARN) -> nn.Module:
        return _AllOutputs(model)

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        """The device's autocast default: float16 (with loss scaling) on CUDA, bfloat16 on a CPU."""
        return torch.float16 if device.type == "cuda" else torch.bfloat16

    def prepare(self, validation: bool = False) -> PrepareForStage:
        return PrepareForStage(self.stage)

    def batch(self, cases: Sequence[PoolCase], size: int, rng: np.random.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = sample_batch(cases, size, self.stage.patch_size, rng)
        return augment(images.to(device), labels.to(device), rng)

    def loss(self, outputs: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        return deep_supervision_loss(outputs, targets)

    def validation_set(self, cases: Sequence[PoolCase]) -> Sequence[PoolCase]:
        return cases

    def validate(self, model: DARN, cases: Sequence[PoolCase], device: torch.device, amp: bool) -> dict[str, float]:
        return validate(model, cases, self.stage.num_classes, device, amp)


class _AllOutputs(nn.Module):
    """Routes ``forward`` to ``forward_with_auxiliary``, so DistributedDataParallel sees the
    call that computes the deep-supervision heads (DDP synchronises only through ``forward``)."""

    def __init__(self, model: DARN):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_with_auxiliary(x)


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
    result = {CLASS_NAMES[label]: float(np.mean(values)) for label, values in scores.items()}
    result["mean"] = float(np.mean(list(result.values())))
    return result

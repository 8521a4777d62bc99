"""Training the boundary-refinement network: (image patch, coarse-mask patch, clicks) in, true tumor out.

The coarse masks are what the network will be given in use:
- DARN's own predictions on the training scans (the bundled weights, or ``models_dir``), and
- synthetic corruptions of each true tumor (``CORRUPTIONS``): eroded, dilated, shifted, smoothed,
  a missing piece, an extra piece, merged with a neighbouring blob, the seed of a click on the
  tumor as if it were missed (``lesion_seeds.lesion_seed`` at a point inside it: "click"), the seed ball
  (such a click where the contrast gives no seed: "seed"), a blob in tumor-free liver (a false
  positive, target: nothing), and the truth itself (a good mask must stay good).
Patches are cut by the same ``patches.patch_around`` / ``patch_inputs`` as inference, around the
coarse mask, so training sees exactly the geometry a click produces. The target is every true
tumor voxel in the patch. The loss is DARN's Dice + cross-entropy over two classes.

A network with click channels (``in_channels`` 4, the default) is trained on simulated click
sequences, as interactive segmentation networks are (:func:`simulated_clicks`): up to
``MAX_SIMULATED_CLICKS`` clicks on the coarse mask's errors, each at the error's deepest point or
at another deep point (people do not click on the exact centre), positive on missed tumor and
negative on false tumor, the largest error last (the newest click, on which inference centres
the patch), and at times a click on a part already right (an earlier click that was followed).
A good mask mostly gets no click, so good masks stay good. ``init_from`` may start such a network
from a 2-channel one (trained before the clicks): the click channels start at zero weights
(``loop.Trainer.start_from``), so the run starts from exactly that network.

Scans are full-size phantoms, CT drawn on real label maps (``anatomy``, a ``phantom_fraction`` of
phantoms among them) or LiTS-layout ``data``, from the loop's pool (``data.py``). Many
scans matter more than many steps: on a pool replaced slowly the network learned the pool's
tumors by heart (training loss falling, held-out Dice falling with it). A DARN run costs twice
the drawing of a phantom, so only ``darn_fraction`` of the training scans get DARN's masks.
Validation: a fixed set of samples from held-out scans, scored by mean patch Dice; ``best.pt``
keeps the best. ``export`` turns a checkpoint into ``refine.pt`` in the weights manifest.

The network runs in channels-last memory and, with ``amp``, under bfloat16 autocast: both are
oneDNN's fast path on the CPU, and bfloat16 needs no loss scaling.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from ..labels import LIVER, TUMOR
from ..metrics import dice
from ..models import build_model
from ..phantom import VALIDATION_SEED_START
from ..pipeline import load_stages, segment
from ..errors import InputError
from ..label_edits import paste_tumor
from ..lesion_seeds import SEED_RADIUS_MM, lesion_seed
from ..patches import (CLICK_CHANNELS, IMAGE_CHANNELS, PATCH_SIZE, Click, index_bounds, labels_to_patch, liver_hu,
                       patch_around, patch_inputs)
from ..regions import Box, ball, deepest_voxel, on_region, widened_mm
from .data import RawCase
from .losses import dice_ce_loss
from .options import TrainConfig

CORRUPTIONS = ("darn", "erode", "dilate", "shift", "smooth", "missing", "extra", "merged", "click", "seed", "good",
               "false")
MAX_SIMULATED_CLICKS = 4
CLICK_CONTEXT_MM = 12.0
"""Clicks are simulated on the errors within this margin of the coarse tumor's box."""
MIN_CLICKED_ERROR_VOXELS = 8
"""Error regions smaller than this get no click: nobody clicks on a voxel or two."""
RIGHT_CLICK_SHARE = 0.25
"""Samples that get a click on a part the mask has right besides."""


@dataclasses.dataclass(eq=False)
class Scan:
    """A training scan and what sampling needs of it, computed once (a scan has ~80 M voxels;
    a sample touches only a patch of them)."""

    ct: sitk.Image
    truth: np.ndarray
    organ: np.ndarray  # liver and tumor, true
    tumors: np.ndarray  # 26-connected components of the true tumor
    tumor_boxes: list
    darn: np.ndarray | None  # 26-connected components of DARN's tumor; None: not segmented by DARN
    darn_boxes: list
    liver_points: np.ndarray  # a sample of tumor-free liver voxels, for false positives
    liver_hu: float  # the image channel's reference
    spacing_zyx: tuple[float, float, float]


def make_scan(ct: sitk.Image, truth: sitk.Image, stages) -> Scan:
    """The scan, with DARN's coarse tumors when ``stages`` (liver, tumor) are given."""
    truth_array = sitk.GetArrayFromImage(truth)
    tumors = cc3d.connected_components(truth_array == TUMOR, connectivity=26)
    darn = None
    if stages is not None:
        coarse = sitk.GetArrayFromImage(segment(ct, *stages, torch.device("cpu")).labels)
        darn = cc3d.connected_components(coarse == TUMOR, connectivity=26)
    liver_points = np.argwhere(truth_array == LIVER)
    liver_points = liver_points[np.random.default_rng(0).permutation(len(liver_points))[:1000]]
    return Scan(ct, truth_array, truth_array > 0, tumors, ndimage.find_objects(tumors), darn,
                [] if darn is None else ndimage.find_objects(darn), liver_points, liver_hu(ct, truth_array),
                tuple(ct.GetSpacing()[::-1]))


# --------------------------------------------------------------------------------------------
# Coarse masks


def corrupt(truth: np.ndarray, organ: np.ndarray, kind: str, spacing_zyx, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong mask made from the true tumor ``truth`` (bool, on a crop with room around it)."""
    spacing = np.asarray(spacing_zyx)
    if kind == "good":
        return truth
    if kind == "erode":
        eroded = ndimage.distance_transform_edt(truth, sampling=spacing) > rng.uniform(0.8, 3.0)
        return eroded if eroded.any() else truth
    if kind == "dilate":
        return (ndimage.distance_transform_edt(~truth, sampling=spacing) <= rng.uniform(0.8, 4.0)) & organ
    if kind == "shift":
        offset = rng.normal(size=3)
        offset *= rng.uniform(1.0, 4.0) / np.linalg.norm(offset) / spacing
        return ndimage.shift(truth, offset, order=0) & organ
    if kind == "smooth":
        sigma = rng.uniform(1.0, 3.0) / spacing
        return (ndimage.gaussian_filter(truth.astype(np.float32), sigma) > rng.uniform(0.3, 0.7)) & organ
    if kind == "missing":
        points = np.argwhere(truth)
        normal = rng.normal(size=3)
        side = (np.indices(truth.shape).reshape(3, -1).T - points[rng.integers(len(points))]) * spacing @ normal
        kept = truth & (side.reshape(truth.shape) < 0)
        return kept if kept.any() else truth
    if kind in ("extra", "merged"):
        points = np.argwhere(truth)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        distance = rng.uniform(2.0, 6.0) if kind == "extra" else rng.uniform(6.0, 12.0)
        centre = np.clip(np.round(points.mean(0) + direction * (distance + _radius_mm(truth, spacing)) / spacing),
                         0, np.array(truth.shape) - 1).astype(int)
        blob, box = ball(tuple(centre), rng.uniform(2.0, 5.0), spacing, truth.shape)
        added = np.zeros_like(truth)
        added[box] = blob
        if kind == "merged":  # a bridge: the blob and the tumor grown into each other
            added |= ndimage.binary_dilation(added | truth, iterations=2) & ~truth & _segment_mask(truth, centre)
        return (truth | added) & organ
    if kind == "seed":
        sphere, box = ball(_inner_point(truth, spacing, rng), SEED_RADIUS_MM, spacing, truth.shape)
        seeded = np.zeros_like(truth)
        seeded[box] = sphere
        return seeded & organ
    raise ValueError(f"unknown corruption {kind!r}")


def _inner_point(mask: np.ndarray, spacing_zyx, rng: np.random.Generator) -> tuple[int, int, int]:
    """A voxel of ``mask`` at 30-90 % of its greatest depth: where a radiologist clicks a lesion."""
    depth = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    inner = np.argwhere(depth >= depth.max() * rng.uniform(0.3, 0.9))
    return tuple(int(i) for i in inner[rng.integers(len(inner))])


def corrupted_map(truth: np.ndarray, region: tuple, true_tumor: np.ndarray, kind: str, spacing_zyx,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The label map ``truth`` with one true tumor (``true_tumor``, bool on ``region``) replaced by
    its corruption ``kind``: (the map, the corrupted tumor on ``region``). What the tumor loses
    becomes liver."""
    coarse_tumor = corrupt(true_tumor, truth[region] > 0, kind, spacing_zyx, rng)
    return paste_tumor(truth, region, true_tumor, coarse_tumor, kind).labels, coarse_tumor


def _radius_mm(mask: np.ndarray, spacing: np.ndarray) -> float:
    return float((mask.sum() * np.prod(spacing) * 3 / (4 * np.pi)) ** (1 / 3))


def _segment_mask(mask: np.ndarray, point) -> np.ndarray:
    """The voxels near the straight line from ``mask``'s centre to ``point`` (a bridge's path)."""
    start = np.argwhere(mask).mean(0)
    grid = np.indices(mask.shape).reshape(3, -1).T
    direction = np.asarray(point) - start
    t = np.clip((grid - start) @ direction / max(direction @ direction, 1e-6), 0, 1)
    return (np.linalg.norm(grid - (start + t[:, None] * direction), axis=1) <= 2.0).reshape(mask.shape)


# --------------------------------------------------------------------------------------------
# Samples


def draw_sample(scan: Scan, rng: np.random.Generator, with_clicks: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(inputs [2, P, P, P], or [4, P, P, P] ``with_clicks``; target [P, P, P]) for one corrupted
    tumor of ``scan``, or None when the scan offers none of the drawn kind."""
    kind = CORRUPTIONS[rng.integers(len(CORRUPTIONS))]
    clicked: list[Click] = []
    if kind == "false":
        drawn = _false_positive(scan, rng)
    elif not scan.tumor_boxes:
        return None
    else:
        number = int(rng.integers(1, len(scan.tumor_boxes) + 1))
        if kind == "darn":
            drawn = _darn_component(scan, number)
        elif kind == "click":
            *drawn, point = _click_seed(scan, number, rng)
            clicked = [Click(point, True)]
        else:
            box = widened_mm(scan.tumor_boxes[number - 1], 12.0, scan.spacing_zyx, scan.truth.shape)
            drawn = corrupt(scan.tumors[box] == number, scan.organ[box], kind, scan.spacing_zyx, rng), box
    if drawn is None or not drawn[0].any():
        return None
    coarse, box = drawn
    clicks = (simulated_clicks(scan, coarse, box, rng) + clicked) if with_clicks else None
    focus = [clicks[-1].point] if clicks else []
    patch = patch_around(scan.ct, *index_bounds(coarse, box, focus), context=rng.uniform(1.3, 1.8))
    inputs = patch_inputs(scan.ct, on_region(coarse, box, patch.region), patch, scan.liver_hu, clicks)
    target = (labels_to_patch(scan.truth, scan.ct, patch) == TUMOR).astype(np.int64)
    return inputs, target


def simulated_clicks(scan: Scan, coarse: np.ndarray, box: Box, rng: np.random.Generator) -> list[Click]:
    """The clicks a person might have made on ``coarse`` (bool on ``box``) so far: up to
    ``MAX_SIMULATED_CLICKS`` on its errors against the truth, the largest error last, and at times
    one on a part it has right (see the module's docstring)."""
    region = widened_mm(box, CLICK_CONTEXT_MM, scan.spacing_zyx, scan.truth.shape)
    mask, true = on_region(coarse, box, region), scan.truth[region] == TUMOR
    errors = []
    for positive, error in ((True, true & ~mask), (False, mask & ~true)):
        components = cc3d.connected_components(error, connectivity=26)
        sizes = np.bincount(components.ravel())
        errors += [(int(sizes[n]), positive, components == n) for n in range(1, len(sizes))
                   if sizes[n] >= MIN_CLICKED_ERROR_VOXELS]
    errors.sort(key=lambda error: error[0])
    count = int(rng.integers(0, MAX_SIMULATED_CLICKS + 1))
    clicks = [Click(_global(_click_point(part, scan.spacing_zyx, rng), region), positive)
              for _, positive, part in errors[len(errors) - min(count, len(errors)):]]
    right = mask & true
    if right.any() and rng.random() < RIGHT_CLICK_SHARE:
        clicks.insert(0, Click(_global(_click_point(right, scan.spacing_zyx, rng), region), True))
    return clicks


def _click_point(mask: np.ndarray, spacing_zyx, rng: np.random.Generator) -> tuple[int, int, int]:
    """Where a click on ``mask`` lands: half the time its deepest point (the benchmark's
    protocol), else another deep point (:func:`_inner_point`)."""
    if rng.random() < 0.5:
        return deepest_voxel(mask, spacing_zyx)
    return _inner_point(mask, spacing_zyx, rng)


def _global(point: tuple[int, int, int], region: Box) -> tuple[int, int, int]:
    return tuple(int(p + r.start) for p, r in zip(point, region))


def _darn_component(scan: Scan, number: int) -> tuple[np.ndarray, tuple] | None:
    """DARN's tumor that overlaps true tumor ``number`` most, on its box."""
    if scan.darn is None:
        return None
    box = scan.tumor_boxes[number - 1]
    overlap = np.bincount(scan.darn[box][scan.tumors[box] == number], minlength=1)
    overlap[0] = 0
    if overlap.max() == 0:
        return None
    found = int(np.argmax(overlap))
    darn_box = scan.darn_boxes[found - 1]
    return scan.darn[darn_box] == found, darn_box


def _click_seed(scan: Scan, number: int, rng) -> tuple[np.ndarray, tuple, tuple[int, int, int]]:
    """What a click inside true tumor ``number`` starts from were the tumor missed (the seed, its
    box), and the click: the seed reads only the CT and where the liver is, so the true map serves."""
    box = scan.tumor_boxes[number - 1]
    point = _global(_inner_point(scan.tumors[box] == number, scan.spacing_zyx, rng), box)
    return (*lesion_seed(scan.ct, scan.truth, point, scan.liver_hu), point)


def _false_positive(scan: Scan, rng) -> tuple[np.ndarray, tuple] | None:
    if len(scan.liver_points) == 0:
        return None
    sphere, box = ball(tuple(scan.liver_points[rng.integers(len(scan.liver_points))]), rng.uniform(3.0, 8.0),
                       scan.spacing_zyx, scan.truth.shape)
    return sphere & scan.organ[box], box


def draw_batch(scans: list[Scan], size: int, rng: np.random.Generator,
               with_clicks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = [], []
    while len(inputs) < size:
        sample = draw_sample(scans[rng.integers(len(scans))], rng, with_clicks)
        if sample is None:
            continue
        image, target = sample
        for axis in range(3):  # the volume's own flips are in the phantoms; these add the patch's
            if rng.random() < 0.5:
                image, target = np.flip(image, axis + 1), np.flip(target, axis)
        inputs.append(np.ascontiguousarray(image))
        targets.append(np.ascontiguousarray(target))
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))


# --------------------------------------------------------------------------------------------
# The task the training loop runs


class RefineTask:
    """The refinement stage (see the module docstring); the loop's :class:`loop.Task`."""

    name = "refine"
    stage_record = {"name": "refine", "patch_size": [PATCH_SIZE] * 3, "num_classes": 2}
    score = "refined"
    validation_seed_start = VALIDATION_SEED_START + 500

    def __init__(self, config: TrainConfig):
        from ..weights import bundled_models_dir

        self.models_dir = Path(config.models_dir or bundled_models_dir())
        self.darn_fraction = config.darn_fraction
        in_channels = config.model["in_channels"]
        if in_channels not in (IMAGE_CHANNELS, IMAGE_CHANNELS + CLICK_CHANNELS):
            raise InputError(f"a refinement network takes {IMAGE_CHANNELS} (image, coarse mask) or "
                             f"{IMAGE_CHANNELS + CLICK_CHANNELS} (and the clicks) input channels, not {in_channels}")
        self.with_clicks = in_channels == IMAGE_CHANNELS + CLICK_CHANNELS
        self.architecture = {"architecture": "refine", "widths": list(config.model["widths"]), "in_channels": in_channels}
        self.exported_architecture = self.architecture
        darn_stages(self.models_dir)  # a wrong weights folder is refused now, not in a worker later

    def build(self) -> torch.nn.Module:
        return build_model(self.architecture).to(memory_format=torch.channels_last_3d)

    def training_network(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        return torch.bfloat16

    def prepare(self, validation: bool = False) -> MakeScan:
        """Validation scans always carry DARN's masks: they are scored every validation."""
        return MakeScan(self.models_dir, 1.0 if validation else self.darn_fraction)

    def batch(self, scans: Sequence[Scan], size: int, rng: np.random.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = draw_batch(scans, size, rng, self.with_clicks)
        return inputs.to(device, memory_format=torch.channels_last_3d), targets.to(device)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(logits, targets)

    def validation_set(self, scans: Sequence[Scan]) -> list[tuple[np.ndarray, np.ndarray]]:
        return _validation_samples(list(scans), self.with_clicks)

    def validate(self, model: torch.nn.Module, samples, device: torch.device, amp: bool) -> dict[str, float]:
        return _validate(model, samples, device)


@dataclasses.dataclass(frozen=True)
class MakeScan:
    """A raw case as a training :class:`Scan`, segmented by DARN for a share ``darn_fraction`` of
    the cases (chosen by the case's seed; picklable, for worker processes)."""

    models_dir: Path
    darn_fraction: float

    def __call__(self, raw: RawCase) -> Scan:
        segmented = np.random.default_rng([raw.seed, 4]).random() < self.darn_fraction
        return make_scan(raw.image, raw.labels, darn_stages(self.models_dir) if segmented else None)


@functools.lru_cache(maxsize=1)
def darn_stages(models_dir: Path):
    """Both DARN stages of ``models_dir`` on the CPU, loaded once per process."""
    return load_stages(models_dir, torch.device("cpu"))


def _validation_samples(scans: list[Scan], with_clicks: bool, per_scan: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(12345)  # the same samples every validation and every run
    samples = []
    for number, scan in enumerate(scans, start=1):
        for _ in range(50 * per_scan):  # a scan without tumors offers only false positives
            if len(samples) == per_scan * number:
                break
            sample = draw_sample(scan, rng, with_clicks)
            if sample is not None:
                samples.append(sample)
    return samples


def _validate(model: torch.nn.Module, samples, device) -> dict[str, float]:
    """Mean patch Dice of the coarse masks and of their refinements."""
    model.eval()
    coarse, refined = [], []
    with torch.inference_mode():
        for inputs, target in samples:
            probability = torch.softmax(model(torch.from_numpy(inputs)[None].to(device)).float(), 1)[0, 1].cpu().numpy()
            truth = target.astype(bool)
            coarse.append(dice(inputs[1] > 0.5, truth))
            refined.append(dice(probability > 0.5, truth))
    return {"coarse": float(np.mean(coarse)), "refined": float(np.mean(refined))}

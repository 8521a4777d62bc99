"""The segmentation pipeline: CT in Hounsfield units in, label map and per-tumor report out.

    CT -> canonical orientation
       -> stage "liver": whole volume at 4 mm, liver probability, main component, its box
       -> stage "tumor": the liver box plus a margin at 1.5 mm, background / liver / tumor
       -> probabilities back to the original voxels, argmax, post-processing
       -> label map on the input's exact grid, report

Choices and why:
- Two stages (a cascade, as in Christ et al. 2016 and most LiTS entries): the liver occupies a
  few per cent of an abdominal CT, so the tumor network spends its voxels where tumors can be.
- Isotropic 4 mm and 1.5 mm working grids: the CPU budget (about 60 s for a 512x512x200 scan on
  two cores) rules out the 0.8 mm grids GPU pipelines use; 1.5 mm still resolves a 3 mm lesion.
  Downsampling first averages whole blocks of voxels (BinShrink), which keeps CT noise from
  aliasing into the coarse grid, then resamples linearly onto the exact working grid.
- Intensities are clipped to a soft-tissue window and scaled to about [-2, 2]: air, fat and bone
  carry no information the liver stages need beyond "not liver".
- Sliding windows with Gaussian weights (nnU-Net's importance map, sigma = patch / 8) where the
  crop exceeds the network's patch, batched, under autocast on CUDA.
- Probabilities, not labels, are resampled back to the original voxels, so boundaries are
  smooth at the input's resolution instead of 1.5 mm staircases.
- Stage 2 may mark liver only near stage 1's liver (within ``ORGAN_GATE_MM``): stage 1 sees the
  whole abdomen and knows which organ is the liver; stage 2 sees only the box, where the stomach
  and spleen beside the left lobe can look like liver to it, and a stage-2 "liver" joined to the
  true one survives the largest-component rule below. Tumors are not gated: stage 2 is the
  tumor specialist, and a lesion bulging from the surface is where the 4 mm stage 1 stops short.
- Post-processing: the largest connected liver (with its tumors) is kept, tumors exist only in
  it, and tumor specks under ``MIN_TUMOR_MM3`` are given back to the liver.
- Tumors the network is unsure of are given back to the liver: a tumor component whose mean
  tumor probability is under the weights' ``min_tumor_confidence`` (false-positive reduction as in
  the LiTS entries; nnU-Net likewise chooses its post-processing on validation cases). The value
  belongs to the weights, not to the code: a sharper network needs another one, so it is chosen on
  validation cases by ``tools/calibrate_tumor_confidence.py`` and kept in their manifest, and
  weights without it keep every component.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import cc3d
import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .io import array_to_reference, to_canonical
from .labels import BACKGROUND, LIVER, TUMOR

HU_WINDOW = (-150.0, 250.0)
"""Soft-tissue window: liver (60-180 HU in contrast phases) and its tumors (0-250 HU) inside it."""

AIR_VALUE = -1024.0
MIN_TUMOR_MM3 = 20.0
"""Smaller tumor pieces (under a 3.4 mm sphere) are noise at 1.5 mm working resolution."""

LIVER_BOX_MARGIN_MM = 12.0
STAGE1_EXTRA_MARGIN_MM = 8.0
"""The 4 mm liver mask can fall short of the true surface by about a voxel: crop wider."""
ORGAN_GATE_MM = 12.0
"""How far from stage 1's liver stage 2 may mark liver: three voxels of stage 1's 4 mm
grid: a voxel its surface may be off by, partial volume, and room to spare, as the gate is there
to keep out whole neighbouring organs, not to trim the liver's surface."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    spacing_mm: tuple[float, float, float]  # x, y, z
    num_classes: int
    patch_size: tuple[int, int, int]  # z, y, x


STAGES = {
    "liver": StageSpec("liver", (4.0, 4.0, 4.0), 2, (64, 64, 64)),
    "tumor": StageSpec("tumor", (1.5, 1.5, 1.5), 3, (64, 64, 64)),
}


@dataclasses.dataclass
class PreparedCase:
    """A case on a stage's working grid: network input, labels (training), and that grid."""

    image: np.ndarray  # float32 [z, y, x], normalised
    labels: np.ndarray | None  # uint8 [z, y, x], the stage's classes
    grid: sitk.Image  # the working grid (canonical, stage spacing), for mapping back


# --------------------------------------------------------------------------------------------
# Preparing a case for a stage (shared by training and inference)


def normalize_hu(hu: np.ndarray) -> np.ndarray:
    low, high = HU_WINDOW
    center, half_width = (low + high) / 2, (high - low) / 4
    return ((np.clip(hu, low, high) - center) / half_width).astype(np.float32)


def physical_box(mask: np.ndarray, grid: sitk.Image, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The mask's bounding box in physical mm (canonical grid: index axes = physical axes)."""
    points = np.argwhere(mask)[:, ::-1]  # (x, y, z) indices
    low = np.array(grid.TransformContinuousIndexToPhysicalPoint(points.min(0).astype(float).tolist()))
    high = np.array(grid.TransformContinuousIndexToPhysicalPoint(points.max(0).astype(float).tolist()))
    return low - margin_mm, high + margin_mm


def crop_to_box(canonical: sitk.Image, box: tuple[np.ndarray, np.ndarray]) -> tuple[sitk.Image, tuple[slice, ...]]:
    """The part of a canonical image inside a physical box, and its [z, y, x] slices."""
    low = canonical.TransformPhysicalPointToContinuousIndex(box[0].tolist())
    high = canonical.TransformPhysicalPointToContinuousIndex(box[1].tolist())
    size = canonical.GetSize()
    start = [max(0, int(math.floor(v))) for v in low]
    stop = [min(n, int(math.ceil(v)) + 1) for v, n in zip(high, size)]
    region = sitk.RegionOfInterest(canonical, [b - a for a, b in zip(start, stop)], start)
    return region, tuple(slice(a, b) for a, b in zip(start[::-1], stop[::-1]))


def working_grid(image: sitk.Image, spacing_mm) -> sitk.Image:
    """An empty canonical grid at ``spacing_mm`` covering the same physical extent as ``image``."""
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = np.maximum(1, np.round(extent / np.array(spacing_mm))).astype(int)
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing_mm])
    grid.SetDirection(image.GetDirection())
    # Same outer corner: the first voxel's outer face stays where the input's was.
    corner = np.array(image.GetOrigin()) - 0.5 * np.array(image.GetSpacing()) @ np.array(image.GetDirection()).reshape(3, 3).T
    grid.SetOrigin((corner + 0.5 * np.array(spacing_mm) @ np.array(image.GetDirection()).reshape(3, 3).T).tolist())
    return grid


def resample_ct(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """Block-average down to about the grid's spacing, then interpolate onto it exactly."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    factors = [max(1, int(target // source)) for target, source in zip(grid.GetSpacing(), image.GetSpacing())]
    if any(f > 1 for f in factors):
        image = sitk.BinShrink(image, factors)
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, AIR_VALUE, sitk.sitkFloat32)


def prepare_case(image: sitk.Image, labels: sitk.Image | None, stage: StageSpec,
                 liver_box_margin_mm: float = LIVER_BOX_MARGIN_MM,
                 box: tuple[np.ndarray, np.ndarray] | None = None) -> PreparedCase:
    """Bring a CT (and its labels) onto a stage's working grid.

    For the tumor stage the volume is first cropped to ``box`` (physical mm), or, in training,
    to the true liver's box plus ``liver_box_margin_mm``.
    """
    canonical = to_canonical(image)
    canonical_labels = to_canonical(labels) if labels is not None else None
    if stage.name == "tumor":
        if box is None:
            if canonical_labels is None:
                raise ValueError("the tumor stage needs a box or labels to find the liver")
            box = physical_box(sitk.GetArrayViewFromImage(canonical_labels) > 0, canonical_labels, liver_box_margin_mm)
        canonical, _ = crop_to_box(canonical, box)
        if canonical_labels is not None:
            canonical_labels, _ = crop_to_box(canonical_labels, box)
    prepared = on_working_grid(canonical, stage)
    if canonical_labels is not None:
        resampled = sitk.Resample(canonical_labels, prepared.grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        prepared.labels = sitk.GetArrayFromImage(resampled).astype(np.uint8)
        if stage.num_classes == 2:
            prepared.labels = (prepared.labels > 0).astype(np.uint8)
    return prepared


def on_working_grid(canonical: sitk.Image, stage: StageSpec) -> PreparedCase:
    """A canonical CT resampled to the stage's spacing and normalised, without labels."""
    grid = working_grid(canonical, stage.spacing_mm)
    return PreparedCase(normalize_hu(sitk.GetArrayFromImage(resample_ct(canonical, grid))), None, grid)


# --------------------------------------------------------------------------------------------
# Sliding-window inference


def gaussian_importance(patch_size, sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net's window weights: the centre of a window is trusted more than its edges."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n * sigma_scale)) ** 2) for n in patch_size]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)  # never zero: every voxel gets a vote


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, patch_size,
                   num_classes: int, device: torch.device, overlap: float = 0.5, batch_size: int = 2,
                   progress: Callable[[float], None] = lambda _: None) -> np.ndarray:
    """Class probabilities [C, z, y, x] of a whole image from overlapping patch predictions."""
    pad = [(0, max(0, p - n)) for n, p in zip(image.shape, patch_size)]
    padded = np.pad(image, pad, constant_values=float(image.min()))
    importance = torch.from_numpy(gaussian_importance(patch_size)).to(device)
    total = torch.zeros((num_classes, *padded.shape), dtype=torch.float32, device=device)
    weight = torch.zeros(padded.shape, dtype=torch.float32, device=device)
    starts = [(z, y, x) for z in window_starts(padded.shape[0], patch_size[0], overlap)
              for y in window_starts(padded.shape[1], patch_size[1], overlap)
              for x in window_starts(padded.shape[2], patch_size[2], overlap)]
    source = torch.from_numpy(padded).to(device)
    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first:first + batch_size]
        windows = [tuple(slice(s, s + p) for s, p in zip(start, patch_size)) for start in batch_starts]
        batch = torch.stack([source[w] for w in windows])[:, None]
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            probabilities = torch.softmax(predict(batch).float(), dim=1)
        for window, probability in zip(windows, probabilities):
            total[(slice(None), *window)] += probability * importance
            weight[window] += importance
        progress(min(1.0, (first + batch_size) / len(starts)))
    crop = tuple(slice(0, n) for n in image.shape)
    return (total[(slice(None), *crop)] / weight[crop]).cpu().numpy()


# --------------------------------------------------------------------------------------------
# The cascade


@dataclasses.dataclass
class Stage:
    """A loaded network, the grid it works on and (tumor stage) its calibrated confidence floor."""

    model: torch.jit.ScriptModule
    spec: StageSpec
    min_tumor_confidence: float = 0.0


def resolve_device(name: str) -> torch.device:
    """auto / cpu / cuda to a device; under torchrun each process takes its own GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("the CUDA device was asked for, but PyTorch sees no CUDA GPU here; use the CPU", option="device")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(name)


def _predict(stage: Stage, prepared: PreparedCase, device, progress) -> np.ndarray:
    with torch.inference_mode():
        return sliding_window(stage.model, prepared.image, stage.spec.patch_size, stage.spec.num_classes,
                              device, progress=progress)


def largest_component(mask: np.ndarray) -> np.ndarray:
    components = cc3d.connected_components(mask, connectivity=26)
    if components.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == np.argmax(sizes)


@dataclasses.dataclass(frozen=True)
class LiverLocation:
    """What stage 1 tells stage 2: the physical box to segment, and where the liver may be
    (``reach``: 1 within ``ORGAN_GATE_MM`` of stage 1's main liver component, on its grid)."""

    box: tuple[np.ndarray, np.ndarray]
    reach: sitk.Image

    def reach_on(self, region: sitk.Image) -> np.ndarray:
        """``reach`` on the voxels of ``region`` (bool [z, y, x])."""
        resampled = sitk.Resample(self.reach, region, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return sitk.GetArrayViewFromImage(resampled) > 0


def locate_liver(canonical: sitk.Image, liver: Stage, device, progress) -> LiverLocation | None:
    """Stage 1: where the main liver component is, or None when there is none."""
    prepared = on_working_grid(canonical, liver.spec)
    probabilities = _predict(liver, prepared, device, progress)
    mask = largest_component(np.argmax(probabilities, axis=0) == LIVER)
    if not mask.any():
        return None
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(prepared.grid)
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    reach = sitk.Cast(distance <= ORGAN_GATE_MM, sitk.sitkUInt8)
    return LiverLocation(physical_box(mask, prepared.grid, LIVER_BOX_MARGIN_MM + STAGE1_EXTRA_MARGIN_MM), reach)


def liver_box_probabilities(region: sitk.Image, tumor: Stage, device, progress) -> np.ndarray:
    """Stage 2's class probabilities [C, z, y, x] on the voxels of ``region`` (the canonical CT's box)."""
    prepared = on_working_grid(region, tumor.spec)
    probabilities = _predict(tumor, prepared, device, progress)
    return _resample_probabilities(probabilities, prepared.grid, region)


def _resample_probabilities(probabilities: np.ndarray, grid: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Each class probability interpolated linearly from the working grid onto ``target``'s voxels."""
    channels = []
    for channel in probabilities:
        image = sitk.GetImageFromArray(channel)
        image.CopyInformation(grid)
        channels.append(sitk.GetArrayFromImage(
            sitk.Resample(image, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)))
    return np.stack(channels)


def tumor_confidences(labels: np.ndarray, tumor_probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tumor components (26-connected, numbered from 1) and each one's mean tumor probability
    (index 0 unused)."""
    components = cc3d.connected_components(labels == TUMOR, connectivity=26)
    sizes = np.bincount(components.ravel())
    sums = np.bincount(components.ravel(), weights=tumor_probability.ravel(), minlength=len(sizes))
    return components, sums / np.maximum(sizes, 1)


def drop_unconfident_tumors(labels: np.ndarray, tumor_probability: np.ndarray, min_confidence: float) -> None:
    """Give tumor components whose mean tumor probability is under ``min_confidence`` to the liver,
    in place. Whole components go: a threshold on voxels would only shave every tumor's rim."""
    if min_confidence <= 0:
        return
    components, confidence = tumor_confidences(labels, tumor_probability)
    unsure = np.flatnonzero(confidence < min_confidence)
    labels[np.isin(components, unsure[unsure > 0])] = LIVER


def postprocess(labels: np.ndarray, spacing_xyz) -> np.ndarray:
    """Keep the main liver with its tumors; give tumor specks back to the liver."""
    organ = largest_component(labels > 0)
    labels = np.where(organ, labels, BACKGROUND).astype(np.uint8)
    voxel_mm3 = float(np.prod(spacing_xyz))
    tumors = cc3d.connected_components(labels == TUMOR, connectivity=26)
    if tumors.max() > 0:
        sizes = np.bincount(tumors.ravel()) * voxel_mm3
        specks = np.flatnonzero(sizes < MIN_TUMOR_MM3)
        labels[np.isin(tumors, specks[specks > 0])] = LIVER
    return labels


PEAK_BASE_BYTES = 500e6
PEAK_BYTES_PER_VOXEL = 32.0
"""Peak memory of :func:`segment`, including PyTorch and the networks: calibrated on the measured
2.2 GB peak for a 512x512x200 CT on CPU (benchmarks/segmentation.py); the tumor stage's share
grows with the liver, not the scan, so this overestimates for long scans."""


def estimated_peak_bytes(size_xyz) -> float:
    return PEAK_BASE_BYTES + PEAK_BYTES_PER_VOXEL * math.prod(size_xyz)


def available_memory_bytes() -> float | None:
    """Memory the system can give without swapping (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(size_xyz) -> None:
    """Refuse, before any work, a volume the pipeline would run out of memory on."""
    needed, available = estimated_peak_bytes(size_xyz), available_memory_bytes()
    if available is not None and needed > available:
        raise InputError(f"a volume of {'x'.join(map(str, size_xyz))} voxels needs about {needed / 1e9:.1f} GB of "
                         f"memory and {available / 1e9:.1f} GB are available; crop the scan to the abdomen "
                         f"or free memory")


@dataclasses.dataclass
class Segmentation:
    labels: sitk.Image  # on the input's grid: 0 background, 1 liver, 2 tumor
    liver_found: bool
    tumor_probability: sitk.Image | None = None
    """Only when asked for: the tumor stage's tumor probability on the input's grid (0 outside the
    liver box), what each tumor's confidence is the mean of (``tools/calibrate_tumor_confidence.py``)."""


def segment(image: sitk.Image, liver: Stage, tumor: Stage, device: torch.device,
            progress: Callable[[str, float], None] = lambda stage, fraction: None,
            keep_tumor_probability: bool = False) -> Segmentation:
    """Segment liver and tumors of a CT in HU; the label map comes back on the input's grid."""
    check_memory(image.GetSize())
    canonical = to_canonical(image)
    labels = np.zeros(sitk.GetArrayViewFromImage(canonical).shape, np.uint8)
    tumor_probability = np.zeros(labels.shape, np.float32) if keep_tumor_probability else None
    location = locate_liver(canonical, liver, device, lambda f: progress("liver", f))
    if location is not None:
        region, slices = crop_to_box(canonical, location.box)
        probabilities = liver_box_probabilities(region, tumor, device, lambda f: progress("tumor", f))
        box_labels = np.argmax(probabilities, axis=0).astype(np.uint8)
        box_labels[(box_labels == LIVER) & ~location.reach_on(region)] = BACKGROUND
        drop_unconfident_tumors(box_labels, probabilities[TUMOR], tumor.min_tumor_confidence)
        labels[slices] = box_labels
        if tumor_probability is not None:
            tumor_probability[slices] = probabilities[TUMOR]
        labels = postprocess(labels, canonical.GetSpacing())
    progress("done", 1.0)
    return Segmentation(array_to_reference(labels, image), bool(labels.any()),
                        None if tumor_probability is None else array_to_reference(tumor_probability, image))


# --------------------------------------------------------------------------------------------
# From files to files


def load_stages(models_dir: Path, device: torch.device,
                min_tumor_confidence: float | None = None) -> tuple[Stage, Stage]:
    """Both networks from a weights folder (TorchScript, checksums verified by ``weights``), with
    the tumor confidence floor calibrated for them unless ``min_tumor_confidence`` replaces it."""
    from .weights import load_model

    stages = []
    for name in ("liver", "tumor"):
        module, entry = load_model(models_dir, name, str(device))
        if not isinstance(entry.get("stage"), dict):
            raise InputError(f"{Path(models_dir) / 'manifest.json'}: the {name!r} entry has no \"stage\" (its grid "
                             f"and patch); export the weights again (livertumordarn export)")
        spec = StageSpec(**{key: tuple(value) if isinstance(value, list) else value
                            for key, value in entry["stage"].items()})
        floor = (entry.get("postprocessing") or {}).get("min_tumor_confidence", 0.0)
        stages.append(Stage(module, spec, _checked_floor(
            floor, f"{Path(models_dir) / 'manifest.json'}: the {name} model's min_tumor_confidence",
            "; calibrate the weights again (tools/calibrate_tumor_confidence.py)")))
    if min_tumor_confidence is not None:
        stages[1].min_tumor_confidence = _checked_floor(min_tumor_confidence, "min_tumor_confidence")
    return stages[0], stages[1]


def _checked_floor(value, what: str, remedy: str = "") -> float:
    """A confidence floor from a manifest or a caller, refused in one line unless it is in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(f"{what} {value!r} is not a probability in [0, 1){remedy}")
    return float(value)

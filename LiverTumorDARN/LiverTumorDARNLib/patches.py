"""The refinement network's view: a cube resampled around one tumor, and its input channels.

    CT + coarse tumor (+ clicks) -> patch around the tumor -> [image, coarse mask(, positive clicks,
    negative clicks)] on the patch grid -> network -> its correction -> back onto the volume's voxels

Choices and why:
- The patch is a cube of ``PATCH_SIZE`` samples on the volume's own axes (flips and oblique
  directions included) with isotropic spacing: the tumor's box, enlarged by ``CONTEXT`` and
  ``MARGIN_MM``, decides the spacing, never finer than ``MIN_SPACING_MM``. A 3 mm and a 60 mm tumor
  both fill the network's view, and anisotropic scans (5 mm slices) are seen as the network was
  trained: isotropic.
- Only the network's correction of the coarse mask is brought back to the volume's voxels (see
  ``refine.Refiner``); this module resamples in both directions, and the two directions share
  one definition of which voxels a patch covers (:func:`patch_around`).
- The image channel is the CT relative to the liver: (HU - the liver's median HU) / ``RELATIVE_HU_SCALE``,
  clipped to +/- ``RELATIVE_HU_LIMIT``. A lesion is seen against the parenchyma around it, as a
  radiologist reads it; absolute HU shift by tens of HU between scanners, contrast phases and
  patients (and between our domain-randomised phantoms) while tumor contrast is often no larger,
  and a network keyed to absolute HU failed on scans whose liver was brighter than in training.
  The liver's median comes from the label map being edited (every ``LIVER_SAMPLE_STRIDE``-th
  voxel along each axis, so it costs a few milliseconds of a click).
- Clicks, for a network that takes them, are two more channels, positive and negative, as in
  interactive segmentation networks (DeepEdit, nnInteractive): a Gaussian of
  ``CLICK_SIGMA_SAMPLES`` patch samples around each click, the maximum where clicks overlap. The
  width is counted in patch samples, not millimetres, so a click looks the same to the network
  on a 5 mm and on a 50 mm tumor, as the tumor itself does.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .labels import LIVER
from .pipeline import AIR_VALUE
from .regions import Box, bounding_box, widened

PATCH_SIZE = 32
"""Samples along each side of the cube the network sees."""
MIN_SPACING_MM = 0.8
CONTEXT = 1.5
"""The patch side is the tumor box's longest side times this, plus 2 * MARGIN_MM."""
MARGIN_MM = 4.0
RELATIVE_HU_SCALE = 50.0
RELATIVE_HU_LIMIT = 4.0
LIVER_SAMPLE_STRIDE = 3
DEFAULT_LIVER_HU = 100.0
"""The reference of a map without liver voxels: a portal-venous liver."""
CLICK_SIGMA_SAMPLES = 1.5
"""Width (standard deviation, in patch samples) of a click's Gaussian in the click channels."""
IMAGE_CHANNELS = 2
"""Image and coarse mask: what every refinement network takes."""
CLICK_CHANNELS = 2
"""Positive and negative clicks: what a click-aware network takes besides."""


@dataclasses.dataclass(frozen=True)
class Click:
    """A click of the person refining: a voxel ([z, y, x] of the volume) and its sign."""

    point: tuple[int, int, int]
    positive: bool


@dataclasses.dataclass(frozen=True)
class Patch:
    """The network's cube (``grid``) and the voxels of the volume it covers (``region``)."""

    grid: sitk.Image
    region: Box


def patch_around(image: sitk.Image, low_xyz: Sequence[float], high_xyz: Sequence[float],
                 context: float = CONTEXT, margin_mm: float = MARGIN_MM) -> Patch:
    """The patch centred on the index box [low, high] (x, y, z, inclusive) of ``image``."""
    spacing = np.array(image.GetSpacing())
    low, high = np.asarray(low_xyz, float), np.asarray(high_xyz, float)
    longest_mm = float(((high - low + 1) * spacing).max())
    step = max(MIN_SPACING_MM, (longest_mm * context + 2 * margin_mm) / PATCH_SIZE)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((low + high) / 2).tolist()))
    grid = sitk.Image([PATCH_SIZE] * 3, sitk.sitkFloat32)
    grid.SetSpacing([step] * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin((centre - direction @ np.full(3, (PATCH_SIZE - 1) / 2 * step)).tolist())
    return Patch(grid, _covered_voxels(image, grid))


def _covered_voxels(image: sitk.Image, grid: sitk.Image, low_xyz=(0, 0, 0), high_xyz=(PATCH_SIZE - 1,) * 3) -> Box:
    """Voxels of ``image`` whose centres lie inside the box of ``grid``'s sample centres from
    ``low_xyz`` to ``high_xyz`` (sample indices; default the whole cube)."""
    corners = [grid.TransformContinuousIndexToPhysicalPoint([float((low, high)[c]) for c, low, high in zip(corner, low_xyz, high_xyz)])
               for corner in np.ndindex(2, 2, 2)]
    indices = np.array([image.TransformPhysicalPointToContinuousIndex(corner) for corner in corners])
    start = np.maximum(0, np.ceil(indices.min(0) - 1e-6)).astype(int)
    stop = np.minimum(image.GetSize(), np.floor(indices.max(0) + 1e-6).astype(int) + 1)
    stop = np.maximum(stop, start)
    return tuple(slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))


def index_bounds(mask: np.ndarray, box: Box, points: Sequence[tuple[int, int, int]] = ()) -> tuple[list[float], list[float]]:
    """The (x, y, z) index box of ``mask`` (given on ``box``) in the volume, grown to hold
    ``points`` ([z, y, x] voxels of the volume) too."""
    inner = bounding_box(mask)
    low = np.array([b.start + i.start for b, i in zip(box, inner)], float)
    high = np.array([b.start + i.stop - 1 for b, i in zip(box, inner)], float)
    if points:
        low = np.minimum(low, np.min(points, axis=0))
        high = np.maximum(high, np.max(points, axis=0))
    return low[::-1].tolist(), high[::-1].tolist()


def crop(image: sitk.Image, region: Box, pad: int = 1) -> sitk.Image:
    """``image`` cut to ``region`` widened by ``pad`` voxels (for interpolation at its edge)."""
    z, y, x = widened(region, image.GetSize()[::-1], pad)
    return image[x.start:x.stop, y.start:y.stop, z.start:z.stop]


def _as_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def liver_hu(ct: sitk.Image, labels: np.ndarray) -> float:
    """The median HU of the liver (label 1) of ``labels``: the reference of the image channel."""
    step = (slice(None, None, LIVER_SAMPLE_STRIDE),) * 3
    liver = sitk.GetArrayViewFromImage(ct)[step][labels[step] == LIVER]
    return float(np.median(liver)) if liver.size else DEFAULT_LIVER_HU


def relative_hu(hu: np.ndarray, reference_hu: float) -> np.ndarray:
    return np.clip((hu - reference_hu) / RELATIVE_HU_SCALE, -RELATIVE_HU_LIMIT, RELATIVE_HU_LIMIT).astype(np.float32)


def patch_inputs(ct: sitk.Image, mask: np.ndarray, patch: Patch, reference_hu: float,
                 clicks: Sequence[Click] | None = None) -> np.ndarray:
    """The network's input on the patch: [2, P, P, P] (the CT relative to ``reference_hu``, the
    liver's (see :func:`liver_hu`), and the coarse mask), or with ``clicks`` (None: a network
    that takes no clicks) [4, P, P, P], the positive and negative clicks' maps after them.

    ``mask`` is the coarse tumor on ``patch.region`` of the volume.
    """
    image = sitk.Resample(crop(ct, patch.region, pad=1), patch.grid, sitk.Transform(), sitk.sitkLinear, AIR_VALUE,
                          sitk.sitkFloat32)
    coarse = sitk.Resample(_as_image(mask.astype(np.float32), region_grid(ct, patch.region)), patch.grid,
                           sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    channels = [relative_hu(sitk.GetArrayFromImage(image), reference_hu), sitk.GetArrayFromImage(coarse)]
    if clicks is not None:
        channels += list(click_maps(ct, patch, clicks))
    return np.stack(channels)


def click_maps(ct: sitk.Image, patch: Patch, clicks: Sequence[Click]) -> np.ndarray:
    """[2, P, P, P]: the positive and the negative clicks as Gaussians on the patch grid."""
    maps = np.zeros((CLICK_CHANNELS,) + (PATCH_SIZE,) * 3, np.float32)
    samples = np.arange(PATCH_SIZE, dtype=np.float32)
    for click in clicks:
        physical = ct.TransformIndexToPhysicalPoint([int(p) for p in click.point[::-1]])
        x, y, z = patch.grid.TransformPhysicalPointToContinuousIndex(physical)
        along = [np.exp(-((samples - c) ** 2) / (2 * CLICK_SIGMA_SAMPLES ** 2)) for c in (z, y, x)]
        gaussian = along[0][:, None, None] * along[1][None, :, None] * along[2][None, None, :]
        channel = maps[0 if click.positive else 1]
        np.maximum(channel, gaussian, out=channel)
    return maps


def patch_to_region(values: np.ndarray, ct: sitk.Image, patch: Patch, box: Box | None = None) -> np.ndarray:
    """Values on the patch grid interpolated onto the volume's voxels of ``patch.region``, or of
    ``box`` within it (given relative to the region)."""
    region = patch.region if box is None else tuple(slice(r.start + b.start, r.start + b.stop) for r, b in zip(patch.region, box))
    return sitk.GetArrayFromImage(sitk.Resample(_as_image(values.astype(np.float32), patch.grid),
                                                region_grid(ct, region), sitk.Transform(),
                                                sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def voxels_above(values: np.ndarray, threshold: float, ct: sitk.Image, patch: Patch) -> Box | None:
    """The box of ``patch.region`` (relative to it) outside which ``values`` on the patch grid,
    interpolated onto the volume's voxels, stay at or below ``threshold``: the cells around the
    samples above it (a linear interpolation never exceeds its eight samples). None where no
    sample is above it."""
    above = ndimage.binary_dilation(values > threshold, np.ones((3, 3, 3), bool))
    if not above.any():
        return None
    samples = bounding_box(above)
    covered = _covered_voxels(ct, patch.grid, [s.start for s in samples[::-1]], [s.stop - 1 for s in samples[::-1]])
    starts = [max(c.start, r.start) for c, r in zip(covered, patch.region)]
    return tuple(slice(start - r.start, max(start, min(c.stop, r.stop)) - r.start)
                 for start, c, r in zip(starts, covered, patch.region))


def region_grid(ct: sitk.Image, region: Box) -> sitk.Image:
    """An empty image on the voxels of ``region`` of the CT: the grid a resampling writes to, at
    one byte a voxel and without copying the CT's."""
    grid = sitk.Image([r.stop - r.start for r in region[::-1]], sitk.sitkUInt8)
    grid.SetOrigin(ct.TransformIndexToPhysicalPoint([r.start for r in region[::-1]]))
    grid.SetSpacing(ct.GetSpacing())
    grid.SetDirection(ct.GetDirection())
    return grid


def labels_to_patch(labels: np.ndarray, ct: sitk.Image, patch: Patch) -> np.ndarray:
    """A label map of the volume on the patch grid (nearest neighbour): training targets."""
    region = widened(patch.region, labels.shape, pad=1)
    return sitk.GetArrayFromImage(sitk.Resample(_as_image(labels[region], crop(ct, patch.region, pad=1)), patch.grid,
                                                sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))

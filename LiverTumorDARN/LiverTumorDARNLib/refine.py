"""Boundary refinement of one tumor at a time, and the clicks a radiologist corrects with.

    label map + CT -> one coarse tumor -> patch around it (image, coarse mask)
                   -> refinement network -> its correction of the coarse mask on the patch
                   -> onto the volume's voxels inside the patch, added to the full-resolution coarse mask
                   -> updated label map, changed box

The method is the boundary-optimisation network of the second paper (``models.BoundaryRefinementNet``):
the coarse mask is an input channel, so the network attends to the boundary and may shrink or grow it.

Choices and why:
- The patch is a cube of ``PATCH_SIZE`` samples on the volume's own axes (flips and oblique
  directions included) with isotropic spacing: the tumor's box, enlarged by ``CONTEXT`` and
  ``MARGIN_MM``, decides the spacing, never finer than ``MIN_SPACING_MM``. A 3 mm and a 60 mm tumor
  both fill the network's view, and anisotropic scans (5 mm slices) are seen as the network was
  trained: isotropic.
- The network adds the coarse mask to its logits (``models.BoundaryRefinementNet``: +/- its
  ``mask_prior``), so its own output is a correction of the mask. Only the correction is brought
  back to the volume's voxels; the mask term is added there, at full resolution. Resampling the
  whole answer from the patch grid (up to 3 mm for a large tumor) blurs every boundary and loses
  tumors of a few voxels even where the network changes nothing (docs/click-to-refine.md).
- Paste-back writes only the voxels whose centres lie inside the patch, so nothing outside the
  patch changes; tumor may only grow into liver, as everywhere else in the pipeline, and the other
  tumors inside the patch are kept as they were.
- The patch grows with the result: when the refined tumor touches the patch's edge, the patch is
  extracted again around the result (at most ``MAX_GROWTH_STEPS`` times). A click on a missed
  lesion starts from a small seed and ends with a patch that fits the lesion.
- The image channel is the CT relative to the liver: (HU - the liver's median HU) / ``RELATIVE_HU_SCALE``,
  clipped to +/- ``RELATIVE_HU_LIMIT``. A lesion is seen against the parenchyma around it, as a
  radiologist reads it; absolute HU shift by tens of HU between scanners, contrast phases and
  patients (and between our domain-randomised phantoms) while tumor contrast is often no larger,
  and a network keyed to absolute HU failed on scans whose liver was brighter than in training.
  The liver's median comes from the label map being edited (every ``LIVER_SAMPLE_STRIDE``-th
  voxel along each axis, so it costs a few milliseconds of a click).
- A click on a missed lesion starts from the voxels around it that are nearer the click's HU
  than the liver's (the half-way threshold of the CT smoothed by ``SEED_SMOOTHING_MM``), inside
  the liver, connected to the click: a lesion is defined by its contrast against the parenchyma,
  whichever sign it has. Where that region leaks (it reaches ``SEED_REACH_MM`` from the click,
  for instance into a vessel of like HU or along the liver's partial-volume rim) it is opened
  with growing radii, fractions (``SEED_OPENING_FRACTIONS``) of the click's depth inside it,
  until the click's piece is enclosed: what is thinner than the lesion is cut off. Holes (noise
  below the threshold inside the lesion) are filled first, else the click looks shallow. Where
  there is no contrast or no enclosed piece, a ``SEED_RADIUS_MM`` ball is the seed: from the ball
  alone the network grows no lesion beyond a few mL (docs/click-to-refine.md).
- A negative click is an edit, not a network call: on the body of a tumor it removes the tumor;
  on a thin offshoot (a leak) it removes the offshoot only. The offshoot is what separates from
  the body when the tumor is eroded (a distance-transform threshold), which keeps the result
  predictable for the person clicking.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .errors import InputError
from .labels import LIVER, TUMOR
from .pipeline import AIR_VALUE, MIN_TUMOR_MM3

PATCH_SIZE = 32
"""Samples along each side of the cube the network sees."""
MIN_SPACING_MM = 0.8
CONTEXT = 1.5
"""The patch side is the tumor box's longest side times this, plus 2 * MARGIN_MM."""
MARGIN_MM = 4.0
NEAR_MM = 10.0
"""A click this close to a tumor refers to it; farther away it starts a new lesion."""
SEED_RADIUS_MM = 4.0
"""The coarse mask of a new lesion where its contrast gives none: a ball around the click."""
SEED_REACH_MM = 50.0
"""A new lesion's seed grows at most this far from the click; reaching it counts as a leak."""
SEED_SMOOTHING_MM = 1.0
SEED_MIN_CONTRAST_HU = 15.0
"""A click nearer the liver's HU than this seeds the ball: at 10 HU, clicks on plain parenchyma
grew noise across the liver and cost up to 0.6 s to cut it back."""
SEED_OPENING_FRACTIONS = (0.25, 0.5, 0.75)
"""Opening radii tried on a leaking seed, as fractions of the click's depth inside it."""
MAX_GROWTH_STEPS = 3
TRIM_STEPS = 12
"""Opening radii tried by a negative click (quantiles of the tumor's depth)."""
RELATIVE_HU_SCALE = 50.0
RELATIVE_HU_LIMIT = 4.0
LIVER_SAMPLE_STRIDE = 3
DEFAULT_LIVER_HU = 100.0
"""The reference of a map without liver voxels: a portal-venous liver."""

Box = tuple[slice, slice, slice]
"""A region of a [z, y, x] array."""


# --------------------------------------------------------------------------------------------
# Patch geometry


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


def _covered_voxels(image: sitk.Image, grid: sitk.Image) -> Box:
    """Voxels of ``image`` whose centres lie inside the cube of ``grid``'s sample centres."""
    last = float(PATCH_SIZE - 1)
    corners = [grid.TransformContinuousIndexToPhysicalPoint([last * c for c in corner]) for corner in np.ndindex(2, 2, 2)]
    indices = np.array([image.TransformPhysicalPointToContinuousIndex(corner) for corner in corners])
    start = np.maximum(0, np.ceil(indices.min(0) - 1e-6)).astype(int)
    stop = np.minimum(image.GetSize(), np.floor(indices.max(0) + 1e-6).astype(int) + 1)
    stop = np.maximum(stop, start)
    return tuple(slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))


def _widened(region: Box, shape, pad: int) -> Box:
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(region, shape))


def widened_mm(region: Box, margin_mm: float, spacing_zyx, shape) -> Box:
    """``region`` grown by ``margin_mm`` on every side, within the volume."""
    return tuple(slice(max(0, s.start - math.ceil(margin_mm / d)), min(n, s.stop + math.ceil(margin_mm / d)))
                 for s, d, n in zip(region, spacing_zyx, shape))


def _crop(image: sitk.Image, region: Box, pad: int = 1) -> sitk.Image:
    """``image`` cut to ``region`` widened by ``pad`` voxels (for interpolation at its edge)."""
    z, y, x = _widened(region, image.GetSize()[::-1], pad)
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


def patch_inputs(ct: sitk.Image, mask: np.ndarray, patch: Patch, reference_hu: float) -> np.ndarray:
    """[2, P, P, P] network input: the CT relative to ``reference_hu`` (the liver's, see
    :func:`liver_hu`) and the coarse mask, resampled to the patch.

    ``mask`` is the coarse tumor on ``patch.region`` of the volume.
    """
    region_ct = _crop(ct, patch.region, pad=1)
    image = sitk.Resample(sitk.Cast(region_ct, sitk.sitkFloat32), patch.grid, sitk.Transform(),
                          sitk.sitkLinear, AIR_VALUE, sitk.sitkFloat32)
    coarse = sitk.Resample(_as_image(mask.astype(np.float32), _crop(ct, patch.region, pad=0)), patch.grid,
                           sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.stack([relative_hu(sitk.GetArrayFromImage(image), reference_hu), sitk.GetArrayFromImage(coarse)])


def patch_to_region(values: np.ndarray, ct: sitk.Image, patch: Patch) -> np.ndarray:
    """Values on the patch grid interpolated onto the volume's voxels of ``patch.region``."""
    return sitk.GetArrayFromImage(sitk.Resample(_as_image(values.astype(np.float32), patch.grid),
                                                _crop(ct, patch.region, pad=0), sitk.Transform(),
                                                sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def labels_to_patch(labels: np.ndarray, ct: sitk.Image, patch: Patch) -> np.ndarray:
    """A label map of the volume on the patch grid (nearest neighbour): training targets."""
    crop = _crop(ct, patch.region, pad=1)
    widened = _widened(patch.region, labels.shape, pad=1)
    return sitk.GetArrayFromImage(sitk.Resample(_as_image(labels[widened], crop), patch.grid, sitk.Transform(),
                                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


# --------------------------------------------------------------------------------------------
# Refinement


@dataclasses.dataclass(frozen=True)
class Change:
    """The label map after an edit, the region that differs from before (None: nothing changed),
    and what happened, in words for the person who clicked."""

    labels: np.ndarray
    box: Box | None
    message: str


class Refiner:
    """The refinement network and the edits made with it. ``labels`` arrays are [z, y, x] on the
    CT's grid (0 background, 1 liver, 2 tumor) and are never modified in place: each edit returns
    a new map, so the caller keeps the old one for undo."""

    def __init__(self, model: torch.jit.ScriptModule, device: torch.device):
        self.model, self.device = model, device
        self.mask_prior = float(torch.as_tensor(model.mask_prior).detach())

    @classmethod
    def load(cls, models_dir=None, device: str | torch.device = "auto") -> Refiner:
        """The refinement network of a weights folder (default: the bundled weights) on ``device``
        ("auto", "cpu", "cuda" or a torch.device)."""
        from .pipeline import resolve_device
        from .weights import bundled_models_dir, load_model

        device = device if isinstance(device, torch.device) else resolve_device(device)
        module, _ = load_model(models_dir if models_dir is not None else bundled_models_dir(), "refine", str(device))
        return cls(module, device)

    def correction(self, inputs: np.ndarray) -> np.ndarray:
        """What the network adds to the coarse mask's vote, on the patch grid, from the [2, P, P, P]
        inputs: its tumor-minus-background logit without the ``mask_prior`` term."""
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = self.model(torch.from_numpy(inputs)[None].to(self.device))[0].float()
        return (logits[1] - logits[0]).cpu().numpy() - self.mask_vote(inputs[1])

    def mask_vote(self, mask: np.ndarray) -> np.ndarray:
        """The logit the coarse mask alone contributes: +mask_prior inside, -mask_prior outside."""
        return self.mask_prior * (2 * mask.astype(np.float32) - 1)

    def refine_mask(self, ct: sitk.Image, labels: np.ndarray, coarse: np.ndarray, coarse_box: Box,
                    reference_hu: float | None = None) -> tuple[np.ndarray, Box]:
        """The refined tumor (bool, on the returned region) for one coarse tumor given on ``coarse_box``.

        The patch is re-centred on the result while the result touches the patch's edge.
        ``reference_hu`` is the liver's HU (:func:`liver_hu` of ``labels`` when not given).
        """
        mask, box = coarse, coarse_box
        reference_hu = liver_hu(ct, labels) if reference_hu is None else reference_hu
        for _ in range(MAX_GROWTH_STEPS):
            patch = patch_around(ct, *index_bounds(mask, box))
            coarse_here = on_region(mask, box, patch.region)
            correction = patch_to_region(self.correction(patch_inputs(ct, coarse_here, patch, reference_hu)), ct, patch)
            refined = correction + self.mask_vote(coarse_here) > 0
            refined &= labels[patch.region] > 0  # tumors grow into liver only
            refined = _without_new_specks(refined, coarse_here, ct.GetSpacing())
            if not refined.any() or not _touches_edge(refined, patch.region, labels.shape):
                return refined, patch.region
            mask, box = refined, patch.region
        return refined, patch.region

    def refine_tumor(self, ct: sitk.Image, labels: np.ndarray, component: np.ndarray, box: Box,
                     reference_hu: float | None = None) -> Change:
        """Refine the tumor ``component`` (bool on ``box``) and paste it back."""
        refined, region = self.refine_mask(ct, labels, component, box, reference_hu)
        return paste_tumor(labels, region, on_region(component, box, region), refined, "tumor refined")

    def click(self, ct: sitk.Image, labels: np.ndarray, point_ijk: Sequence[int], positive: bool = True) -> Change:
        """One click at voxel (i, j, k) of the CT: refine the tumor under or near it, add a lesion
        where none is near, or (negative) remove the tumor or trim its offshoot."""
        point = _check_point(ct, point_ijk)
        tumors = find_tumor_near(labels, point, ct.GetSpacing())
        if tumors is None:
            if not positive:
                return Change(labels, None, "no tumor at the click: nothing to remove")
            return self.add_lesion(ct, labels, point)
        component, box = tumors
        if positive:
            return self.refine_tumor(ct, labels, component, box)
        kept = trim_at(component, tuple(p - s.start for p, s in zip(point, box)), _spacing_zyx(ct))
        message = "tumor removed" if not kept.any() else "offshoot trimmed"
        return paste_tumor(labels, box, component, kept, message)

    def add_lesion(self, ct: sitk.Image, labels: np.ndarray, point: tuple[int, int, int]) -> Change:
        """A new lesion grown by the network from :func:`lesion_seed` at ``point`` ([z, y, x])."""
        if labels[point] == 0:
            return Change(labels, None, "the click is outside the liver: no lesion added")
        reference_hu = liver_hu(ct, labels)
        seed, box = lesion_seed(ct, labels, point, reference_hu)
        refined, region = self.refine_mask(ct, labels, seed, box, reference_hu)
        refined = _components_touching(refined, on_region(seed, box, region))
        if not refined.any():
            return Change(labels, None, "no lesion found at the click")
        return paste_tumor(labels, region, np.zeros_like(refined), refined, "lesion added")

    def refine_all(self, ct: sitk.Image, labels: np.ndarray) -> Change:
        """Every tumor of the map refined in turn; the box covers all changes."""
        components = cc3d.connected_components(labels == TUMOR, connectivity=26)
        reference_hu = liver_hu(ct, labels)  # once: each tumor moves the liver's median by a hair
        changed: list[Box] = []
        for number, component_box in enumerate(ndimage.find_objects(components), start=1):
            change = self.refine_tumor(ct, labels, components[component_box] == number, component_box, reference_hu)
            labels = change.labels
            if change.box is not None:
                changed.append(change.box)
        box = _union(changed)
        count = int(components.max())
        return Change(labels, box, f"{count} tumor{'s' if count != 1 else ''} refined")


# --------------------------------------------------------------------------------------------
# Editing the label map


def paste_tumor(labels: np.ndarray, region: Box, old: np.ndarray, new: np.ndarray, message: str) -> Change:
    """Replace tumor ``old`` by ``new`` (bool arrays on ``region``): what leaves the tumor becomes
    liver, other tumors in the region stay; nothing outside the region is touched."""
    updated = labels.copy()
    before = labels[region]
    after = before.copy()
    after[old & (before == TUMOR) & ~new] = LIVER
    after[new] = TUMOR
    updated[region] = after
    differs = after != before
    if not differs.any():
        return Change(labels, None, message + " (no change)")
    inner = _bounding_box(differs)
    return Change(updated, tuple(slice(r.start + i.start, r.start + i.stop) for r, i in zip(region, inner)), message)


def find_tumor_near(labels: np.ndarray, point: tuple[int, int, int], spacing_xyz) -> tuple[np.ndarray, Box] | None:
    """The tumor under ``point`` ([z, y, x]) or the nearest one within ``NEAR_MM``: its mask on its
    bounding box, and that box; None when there is none."""
    spacing = np.array(spacing_xyz[::-1])
    reach = np.ceil(NEAR_MM / spacing).astype(int)
    window = tuple(slice(max(0, p - r), min(n, p + r + 1)) for p, r, n in zip(point, reach, labels.shape))
    nearby = np.argwhere(labels[window] == TUMOR)
    if len(nearby) == 0:
        return None
    offsets = (nearby + [w.start for w in window] - point) * spacing
    distances = np.sqrt((offsets ** 2).sum(1))
    if distances.min() > NEAR_MM:
        return None
    seed = tuple(int(v) for v in nearby[np.argmin(distances)] + [w.start for w in window])
    return _component_at(labels, seed)


def _component_at(labels: np.ndarray, seed: tuple[int, int, int]) -> tuple[np.ndarray, Box]:
    """The 26-connected tumor containing ``seed``, found in a window that grows until it holds it
    whole (a full-volume labelling of a 512x512x400 scan would cost most of a click's budget)."""
    half = 16
    while True:
        window = tuple(slice(max(0, p - half), min(n, p + half + 1)) for p, n in zip(seed, labels.shape))
        components = cc3d.connected_components(labels[window] == TUMOR, connectivity=26)
        mask = components == components[tuple(p - w.start for p, w in zip(seed, window))]
        inner = _bounding_box(mask)
        at_edge = any((i.start == 0 and w.start > 0) or (i.stop == w.stop - w.start and w.stop < n)
                      for i, w, n in zip(inner, window, labels.shape))
        if not at_edge:
            box = tuple(slice(w.start + i.start, w.start + i.stop) for w, i in zip(window, inner))
            return mask[inner], box
        half *= 2


def trim_at(component: np.ndarray, point: tuple[int, int, int], spacing_zyx) -> np.ndarray:
    """What a negative click at ``point`` leaves of ``component``: nothing when it is on the body,
    the rest when it is on an offshoot.

    The component is opened (eroded, then dilated) by balls of growing radius. The first opening
    that drops the clicked voxel shows the offshoot: the part dropped there. When the eroded core
    splits first, the clicked piece is the offshoot unless it is the largest. When the core
    vanishes with the click still inside, the click was on the body.
    """
    if not component[point]:  # a click beside the tumor means its nearest voxel
        inside = np.argwhere(component)
        point = tuple(inside[np.argmin((((inside - point) * spacing_zyx) ** 2).sum(1))])
    padded = np.pad(component, 1)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing_zyx)
    reach = max(spacing_zyx)
    at = tuple(int(p) + 1 for p in point)
    for radius in np.unique(np.quantile(depth[padded], np.linspace(0.05, 0.95, TRIM_STEPS))):
        core = depth > radius
        if not core.any():
            break
        opened = padded & (ndimage.distance_transform_edt(~core, sampling=spacing_zyx) <= radius + reach)
        if not opened[at]:
            dropped = cc3d.connected_components(padded & ~opened, connectivity=26)
            return (padded & (dropped != dropped[at]))[1:-1, 1:-1, 1:-1]
        cores = cc3d.connected_components(core, connectivity=26)
        if cores.max() >= 2:
            _, nearest = ndimage.distance_transform_edt(cores == 0, sampling=spacing_zyx, return_indices=True)
            owner = cores[tuple(nearest)] * padded
            sizes = np.bincount(owner.ravel())
            sizes[0] = 0
            if owner[at] == np.argmax(sizes):
                break
            return (padded & (owner != owner[at]))[1:-1, 1:-1, 1:-1]
    return np.zeros_like(component)


# --------------------------------------------------------------------------------------------
# Small helpers


def _check_point(ct: sitk.Image, point_ijk: Sequence[int]) -> tuple[int, int, int]:
    size = ct.GetSize()
    if len(point_ijk) != 3 or not all(0 <= int(p) < n for p, n in zip(point_ijk, size)):
        raise InputError(f"click {','.join(map(str, point_ijk))} is outside the volume (0..{size[0] - 1}, "
                         f"0..{size[1] - 1}, 0..{size[2] - 1})")
    i, j, k = (int(p) for p in point_ijk)
    return k, j, i


def _spacing_zyx(ct: sitk.Image) -> tuple[float, float, float]:
    return tuple(ct.GetSpacing()[::-1])


def index_bounds(mask: np.ndarray, box: Box) -> tuple[list[float], list[float]]:
    """The (x, y, z) index box of ``mask`` (given on ``box``) in the volume."""
    inner = _bounding_box(mask)
    low = [b.start + i.start for b, i in zip(box, inner)]
    high = [b.start + i.stop - 1 for b, i in zip(box, inner)]
    return [float(v) for v in low[::-1]], [float(v) for v in high[::-1]]


def on_region(mask: np.ndarray, box: Box, region: Box) -> np.ndarray:
    """``mask`` given on ``box`` redrawn on ``region`` (the parts outside it are dropped)."""
    out = np.zeros([r.stop - r.start for r in region], bool)
    low = [max(b.start, r.start) for b, r in zip(box, region)]
    high = [min(b.stop, r.stop) for b, r in zip(box, region)]
    if all(h > l for l, h in zip(low, high)):
        out[tuple(slice(l - r.start, h - r.start) for l, h, r in zip(low, high, region))] = \
            mask[tuple(slice(l - b.start, h - b.start) for l, h, b in zip(low, high, box))]
    return out


def _bounding_box(mask: np.ndarray) -> Box:
    slices = ndimage.find_objects(mask.astype(np.uint8))
    return slices[0] if slices else tuple(slice(0, 0) for _ in mask.shape)


def _union(boxes: list[Box]) -> Box | None:
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))


def _touches_edge(mask: np.ndarray, region: Box, shape) -> bool:
    """Whether ``mask`` reaches a face of its region that is not the volume's own border."""
    for axis, (r, n) in enumerate(zip(region, shape)):
        first = np.take(mask, 0, axis=axis).any() and r.start > 0
        last = np.take(mask, mask.shape[axis] - 1, axis=axis).any() and r.stop < n
        if first or last:
            return True
    return False


def _without_new_specks(mask: np.ndarray, coarse: np.ndarray, spacing_xyz) -> np.ndarray:
    """``mask`` without the pieces smaller than the pipeline's smallest tumor that the coarse mask
    did not have: a small tumor someone drew stays unless the network votes it away."""
    components = cc3d.connected_components(mask, connectivity=26)
    if components.max() == 0:
        return mask
    sizes = np.bincount(components.ravel()) * float(np.prod(spacing_xyz))
    keep = sizes >= MIN_TUMOR_MM3
    keep[np.unique(components[coarse])] = True
    keep[0] = False
    return keep[components]


def _components_touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    components = cc3d.connected_components(mask, connectivity=26)
    touched = np.unique(components[seed & mask])
    return np.isin(components, touched[touched > 0])


def lesion_seed(ct: sitk.Image, labels: np.ndarray, point: tuple[int, int, int],
                reference_hu: float) -> tuple[np.ndarray, Box]:
    """The coarse mask (bool, on the returned box) of a new lesion at ``point`` ([z, y, x]): the
    region of the click's contrast (see the module's docstring), else a ball."""
    spacing = _spacing_zyx(ct)
    region = widened_mm(_voxel_box(point), SEED_REACH_MM, spacing, labels.shape)
    local = tuple(p - r.start for p, r in zip(point, region))
    grown = _contrast_region(_crop(ct, region, pad=0), labels[region] > 0, local, reference_hu)
    enclosed = None if grown is None else _enclosed_piece(grown, local, region, labels.shape, spacing)
    if enclosed is None:
        return ball(point, SEED_RADIUS_MM, spacing, labels.shape)
    return enclosed, region


def _contrast_region(ct: sitk.Image, liver: np.ndarray, local: tuple[int, int, int],
                     reference_hu: float) -> np.ndarray | None:
    """Liver voxels nearer the click's smoothed HU than ``reference_hu``, holes filled; None
    without contrast."""
    hu = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.Cast(ct, sitk.sitkFloat32), SEED_SMOOTHING_MM))
    clicked = float(hu[local])
    if abs(clicked - reference_hu) < SEED_MIN_CONTRAST_HU:
        return None
    half_way = (clicked + reference_hu) / 2
    contrast = (hu < half_way) if clicked < reference_hu else (hu > half_way)
    return ndimage.binary_fill_holes(contrast) & liver  # noise leaves holes that make the click look shallow


def _enclosed_piece(mask: np.ndarray, local: tuple[int, int, int], region: Box, shape,
                    spacing_zyx) -> np.ndarray | None:
    """The piece of ``mask`` at ``local`` that stays inside ``region``, opening ``mask`` with
    growing radii to cut the bridges it leaks through; None where no radius encloses it. The
    opening dilates only the click's part of the eroded mask, in a box within the radius of it,
    which is cheaper than the whole region once the bridges are cut."""
    def enclosed(piece: np.ndarray) -> bool:
        return piece.any() and not _touches_edge(piece, region, shape)

    piece = _component_at_voxel(mask, local)
    if enclosed(piece):
        return piece
    depth = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    for fraction in SEED_OPENING_FRACTIONS:
        radius_mm = fraction * depth[local]
        core = _component_at_voxel(depth > radius_mm, local)
        near = widened_mm(_bounding_box(core), radius_mm, spacing_zyx, mask.shape)  # the dilation's reach
        opened = np.zeros_like(mask)
        opened[near] = (ndimage.distance_transform_edt(~core[near], sampling=spacing_zyx) <= radius_mm) & mask[near]
        piece = _component_at_voxel(opened, local)
        if enclosed(piece):
            return piece
    return None


def _component_at_voxel(mask: np.ndarray, voxel: tuple[int, int, int]) -> np.ndarray:
    """The 6-connected piece of ``mask`` at ``voxel``: a seed must not leak through corners."""
    components = cc3d.connected_components(mask, connectivity=6)
    number = components[voxel]
    return components == number if number else np.zeros_like(mask)


def _voxel_box(point: tuple[int, int, int]) -> Box:
    return tuple(slice(p, p + 1) for p in point)


def ball(point, radius_mm: float, spacing_zyx, shape) -> tuple[np.ndarray, Box]:
    box = widened_mm(_voxel_box(point), radius_mm, spacing_zyx, shape)
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - p) * s for b, p, s in zip(box, point, spacing_zyx)],
                        indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2, box

"""Edits of a label map (0 background, 1 liver, 2 tumor, [z, y, x]): the tumor a click refers to,
a tumor replaced by its correction, and what a negative click cuts away.

Every edit returns a new map and leaves the one it was given as it was, so the caller keeps the
old one for undo.

A negative click says "this is not tumor" about the tissue under it, not about everything
connected to it: a false region grown onto a true tumor (parenchyma or a vessel taken in with a
hypodense metastasis) must go without the metastasis. Where the clicked tumor holds two kinds of
tissue (its smoothed HU split in two classes by Otsu's threshold, their means at least
``SPLIT_MIN_CONTRAST_HU`` apart, and what the click leaves at least ``SPLIT_MIN_DEPTH_MM`` thick),
the click removes the piece of its own kind that it is on; its kind is that of the tumor's voxels
around it (``lesion_seeds.clicked_hu``), as for a positive click, not of the one voxel clicked.
Where that piece holds the tumor's core (its deepest voxel), the click removes only the voxels
nearer to it than to the core, as if the core held a positive click (a click on the core itself
falls to shape): the two classes of a textured tumor run through it, and its bulk is not what a
click at its edge means.
Where it holds one kind, shape decides (:func:`trim_at`): a thin offshoot is cut off, a lobe
joined to others by a neck goes alone, and a compact tumor goes whole.

Clicks are remembered: a click never undoes an earlier click of the other sign. Where what a
click would remove (or add) holds an earlier positive (or negative) click, it is split between
the clicks, each voxel going with the nearer one (:func:`split_between_clicks`); without this a
negative and a positive click on one joined region undo each other, click after click.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .labels import LIVER, TUMOR
from .lesion_seeds import clicked_hu, component_at_voxel
from .pipeline import MIN_TUMOR_MM3
from .regions import Box, bounding_box, deepest_voxel, depth_mm, local, whole

NEAR_MM = 10.0
"""A click this close to a tumor refers to it; farther away it starts a new lesion."""
TRIM_STEPS = 12
"""Opening radii tried by a negative click (quantiles of the tumor's depth)."""
SPLIT_MIN_CONTRAST_HU = 15.0
"""Two tissues in one tumor differ by at least this much (mean smoothed HU of Otsu's classes);
less is noise within one tissue."""
SPLIT_BINS = 64
SPLIT_MIN_DEPTH_MM = 2.0
"""What a split keeps must be this thick somewhere: the rim that smoothing leaves around a tumor
of one tissue (a few voxels of HU between the tumor's and the liver's) is no second tissue."""


@dataclasses.dataclass(frozen=True)
class Change:
    """The label map after an edit, the region that differs from before (None: nothing changed),
    and what happened, in words for the person who clicked."""

    labels: np.ndarray
    box: Box | None
    message: str


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
    inner = bounding_box(differs)
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
    return component_at(labels, seed)


def component_at(labels: np.ndarray, seed: tuple[int, int, int]) -> tuple[np.ndarray, Box]:
    """The 26-connected tumor containing ``seed``, found in a window that grows until it holds it
    whole (a full-volume labelling of a 512x512x400 scan would cost most of a click's budget).
    The window grows on the sides the tumor reaches, by the window's width there: the seed is
    often at the tumor's edge, the voxel nearest a click beside it."""
    window = tuple(slice(max(0, p - 16), min(n, p + 17)) for p, n in zip(seed, labels.shape))
    while True:
        components = cc3d.connected_components(labels[window] == TUMOR, connectivity=26)
        mask = components == components[tuple(p - w.start for p, w in zip(seed, window))]
        inner = bounding_box(mask)
        grown = tuple(slice(max(0, w.start - (w.stop - w.start)) if i.start == 0 else w.start,
                            min(n, w.stop + (w.stop - w.start)) if i.stop == w.stop - w.start else w.stop)
                      for i, w, n in zip(inner, window, labels.shape))
        if grown == window:
            box = tuple(slice(w.start + i.start, w.start + i.stop) for w, i in zip(window, inner))
            return mask[inner], box
        window = grown


def trim_at(component: np.ndarray, point: tuple[int, int, int], spacing_zyx) -> np.ndarray:
    """What a negative click at ``point`` leaves of ``component``: nothing when it is on the body,
    the rest when it is on an offshoot.

    The component is opened (eroded, then dilated) by balls of growing radius. The first opening
    that drops the clicked voxel shows the offshoot: the part dropped there. When the eroded core
    splits first, the clicked piece is the offshoot unless it is the largest. When the core
    vanishes with the click still inside, the click was on the body.
    """
    point = nearest_voxel(component, point, spacing_zyx)  # a click beside the tumor means its nearest voxel
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


def false_part(component: np.ndarray, point: tuple[int, int, int], hu: np.ndarray, spacing_zyx) -> tuple[np.ndarray, str]:
    """What a negative click at ``point`` marks as not tumor in ``component`` (bool on a box;
    ``point`` and ``hu``, the smoothed CT, on the same box), and what that is, in words: the
    piece of the click's tissue it is on, the offshoot, or the whole tumor (see the module's
    docstring). Pieces of the tumor too small to be one (``MIN_TUMOR_MM3``) that the cut leaves
    behind go with it."""
    point = nearest_voxel(component, point, spacing_zyx)
    removed, what = None, ""
    threshold = _two_tissues(component, hu)
    if threshold is not None:
        clicked = clicked_hu(hu, point, spacing_zyx, within=component)
        side = component & ((hu > threshold) == (clicked > threshold))
        piece = component_at_voxel(side, nearest_voxel(side, point, spacing_zyx))
        kept = component & ~piece
        if kept.any() and depth_mm(kept, spacing_zyx).max() >= SPLIT_MIN_DEPTH_MM:
            piece = split_between_clicks(piece, whole(piece), point, [deepest_voxel(component, spacing_zyx)], spacing_zyx)
            if piece.any():
                removed, what = piece, "false part removed"
    if removed is None:
        kept = trim_at(component, point, spacing_zyx)
        removed, what = component & ~kept, ("tumor removed" if not kept.any() else "offshoot trimmed")
    left = cc3d.connected_components(component & ~removed, connectivity=26)
    sizes = np.bincount(left.ravel()) * float(np.prod(spacing_zyx))
    return removed | ((sizes < MIN_TUMOR_MM3)[left] & (left > 0)), what


def split_between_clicks(piece: np.ndarray, region: Box, point: tuple[int, int, int],
                         opposed: Sequence[tuple[int, int, int]], spacing_zyx) -> np.ndarray:
    """The part of ``piece`` (bool on ``region``) that a click at ``point`` may change, given the
    earlier clicks of the other sign at ``opposed`` (voxels of the volume): all of it unless it
    holds one of them; then the voxels nearer (in mm) to ``point`` than to each opposed click
    that it holds."""
    inside = [local(p, region) for p in opposed]
    inside = [p for p in inside if all(0 <= i < n for i, n in zip(p, piece.shape)) and piece[p]]
    if not inside:
        return piece
    grid = np.indices(piece.shape, sparse=True)
    scale = np.asarray(spacing_zyx, float)

    def squared_mm(p):
        return sum(((axis - i) * s) ** 2 for axis, i, s in zip(grid, p, scale))

    own = squared_mm(local(point, region))
    return piece & np.logical_and.reduce([own < squared_mm(p) for p in inside])


def nearest_voxel(mask: np.ndarray, point: tuple[int, int, int], spacing_zyx) -> tuple[int, int, int]:
    """``point`` when it lies in ``mask``, else the voxel of ``mask`` nearest to it (in mm)."""
    if mask[point]:
        return point
    inside = np.argwhere(mask)
    return tuple(int(v) for v in inside[np.argmin((((inside - point) * np.asarray(spacing_zyx)) ** 2).sum(1))])


def _two_tissues(component: np.ndarray, hu: np.ndarray) -> float | None:
    """Otsu's threshold between the two tissues ``component`` holds; None where its voxels are
    one tissue (their classes' means closer than ``SPLIT_MIN_CONTRAST_HU``)."""
    if component.sum() < 2:
        return None
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(SPLIT_BINS)
    otsu.SetMaskValue(1)
    otsu.Execute(sitk.GetImageFromArray(hu.astype(np.float32)), sitk.GetImageFromArray(component.astype(np.uint8)))
    threshold = otsu.GetThreshold()
    values = hu[component]
    low, high = values[values <= threshold], values[values > threshold]
    if not len(low) or not len(high) or high.mean() - low.mean() < SPLIT_MIN_CONTRAST_HU:
        return None
    return threshold

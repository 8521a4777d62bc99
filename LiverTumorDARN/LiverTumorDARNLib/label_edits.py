"""Edits of a label map (0 background, 1 liver, 2 tumor, [z, y, x]): the tumor a click refers to,
a tumor replaced by its correction, and what a negative click cuts away.

Every edit returns a new map and leaves the one it was given as it was, so the caller keeps the
old one for undo.
"""

from __future__ import annotations

import dataclasses

import cc3d
import numpy as np
from scipy import ndimage

from .labels import LIVER, TUMOR
from .regions import Box, bounding_box

NEAR_MM = 10.0
"""A click this close to a tumor refers to it; farther away it starts a new lesion."""
TRIM_STEPS = 12
"""Opening radii tried by a negative click (quantiles of the tumor's depth)."""


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
    whole (a full-volume labelling of a 512x512x400 scan would cost most of a click's budget)."""
    half = 16
    while True:
        window = tuple(slice(max(0, p - half), min(n, p + half + 1)) for p, n in zip(seed, labels.shape))
        components = cc3d.connected_components(labels[window] == TUMOR, connectivity=26)
        mask = components == components[tuple(p - w.start for p, w in zip(seed, window))]
        inner = bounding_box(mask)
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

"""Boxes (regions of a [z, y, x] volume) and masks given on them.

A refinement touches a few thousand voxels of a volume of tens of millions, so every mask it
handles lives on a box of the volume, never on the whole grid.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

Box = tuple[slice, slice, slice]
"""A region of a [z, y, x] array."""


def bounding_box(mask: np.ndarray) -> Box:
    """The smallest box holding every voxel of ``mask`` (empty slices for an empty mask)."""
    slices = ndimage.find_objects(mask.astype(np.uint8))
    return slices[0] if slices else tuple(slice(0, 0) for _ in mask.shape)


def union(boxes: Sequence[Box]) -> Box | None:
    """The smallest box holding every box of ``boxes``; None for none."""
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))


def whole(array: np.ndarray) -> Box:
    """The box of all of ``array``: an array seen as a region of itself."""
    return tuple(slice(0, n) for n in array.shape)


def widened(region: Box, shape, pad: int) -> Box:
    """``region`` grown by ``pad`` voxels on every side, within the volume of ``shape``."""
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(region, shape))


def widened_mm(region: Box, margin_mm: float, spacing_zyx, shape) -> Box:
    """``region`` grown by ``margin_mm`` on every side, within the volume."""
    return tuple(slice(max(0, s.start - math.ceil(margin_mm / d)), min(n, s.stop + math.ceil(margin_mm / d)))
                 for s, d, n in zip(region, spacing_zyx, shape))


def voxel_box(point: tuple[int, int, int]) -> Box:
    """The box of one voxel."""
    return tuple(slice(p, p + 1) for p in point)


def on_region(mask: np.ndarray, box: Box, region: Box) -> np.ndarray:
    """``mask`` given on ``box`` redrawn on ``region`` (the parts outside it are dropped)."""
    out = np.zeros([r.stop - r.start for r in region], bool)
    low = [max(b.start, r.start) for b, r in zip(box, region)]
    high = [min(b.stop, r.stop) for b, r in zip(box, region)]
    if all(h > l for l, h in zip(low, high)):
        out[tuple(slice(l - r.start, h - r.start) for l, h, r in zip(low, high, region))] = \
            mask[tuple(slice(l - b.start, h - b.start) for l, h, b in zip(low, high, box))]
    return out


def touches_edge(mask: np.ndarray, region: Box, shape) -> bool:
    """Whether ``mask`` (given on ``region``) reaches a face of its region that is not the
    volume's own border."""
    return touches_faces(mask, inner_faces(region, shape))


def inner_faces(region: Box, shape) -> list[tuple[int, int]]:
    """The faces of ``region`` that lie inside the volume of ``shape``, as (axis, 0 for the first
    face or -1 for the last): a mask reaching one of them may go on outside the region."""
    return [(axis, side) for axis, (r, n) in enumerate(zip(region, shape))
            for side, inside in ((0, r.start > 0), (-1, r.stop < n)) if inside]


def touches_faces(mask: np.ndarray, faces: list[tuple[int, int]]) -> bool:
    """Whether ``mask`` has a voxel on one of ``faces`` (see :func:`inner_faces`)."""
    return any(np.take(mask, side, axis=axis).any() for axis, side in faces)


def ball(point: tuple[int, int, int], radius_mm: float, spacing_zyx, shape) -> tuple[np.ndarray, Box]:
    """The voxels within ``radius_mm`` of voxel ``point`` ([z, y, x]), on their box."""
    box = widened_mm(voxel_box(point), radius_mm, spacing_zyx, shape)
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - p) * s for b, p, s in zip(box, point, spacing_zyx)],
                        indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2, box


def depth_mm(mask: np.ndarray, spacing_zyx) -> np.ndarray:
    """Each voxel's distance (mm) to the nearest voxel outside ``mask``, the array's edge counting as outside."""
    return ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]


def deepest_voxel(mask: np.ndarray, spacing_zyx) -> tuple[int, int, int]:
    """The voxel of ``mask`` farthest (in mm) from its border: a tumor's core, where a click on it lands."""
    return tuple(int(v) for v in np.unravel_index(np.argmax(depth_mm(mask, spacing_zyx)), mask.shape))


def local(point: tuple[int, int, int], region: Box) -> tuple[int, int, int]:
    """Voxel ``point`` of the volume as an index into an array given on ``region``."""
    return tuple(int(p - r.start) for p, r in zip(point, region))

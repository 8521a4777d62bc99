"""Pictures of CT with the liver and tumor outlines, as PNG, for reports, the README and icons.

SimpleITK writes the PNG, so pictures need no plotting library (Slicer's Python has none).
Slices are shown as a radiologist reads them: axial, patient right on the left of the
picture, anterior at the top, with an abdominal window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .io import to_canonical

ABDOMEN_WINDOW_HU = (40.0, 400.0)  # level, width
OUTLINE_COLORS = {1: (221, 130, 101), 2: (60, 220, 60)}  # Slicer's liver colour; tumor green


def best_axial_slice(labels: np.ndarray) -> int:
    """The slice with the most tumor, else the most liver, else the middle one ([z, y, x])."""
    for label in (2, 1):
        counts = (labels >= label).sum(axis=(1, 2))
        if counts.any():
            return int(np.argmax(counts))
    return labels.shape[0] // 2


def axial_overlay(ct: sitk.Image, labels: sitk.Image, slice_index: int | None = None) -> np.ndarray:
    """One axial slice as RGB uint8 (rows, columns, 3), square pixels, outlines drawn on it."""
    ct_array = sitk.GetArrayFromImage(to_canonical(ct))
    label_array = sitk.GetArrayFromImage(to_canonical(labels))
    k = best_axial_slice(label_array) if slice_index is None else slice_index
    level, width = ABDOMEN_WINDOW_HU
    gray = np.clip((ct_array[k].astype(np.float32) - level + width / 2) / width, 0, 1)
    rgb = np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=2)
    sx, sy = to_canonical(ct).GetSpacing()[:2]
    if abs(sx - sy) > 1e-3:
        rgb = ndimage.zoom(rgb, (sy / sx, 1, 1), order=0)
        label_slice = ndimage.zoom(label_array[k], (sy / sx, 1), order=0)
    else:
        label_slice = label_array[k]
    thickness = max(1, round(max(label_slice.shape) / 256))  # stays visible in thumbnails
    for label, color in OUTLINE_COLORS.items():
        mask = label_slice >= label
        rgb[mask & ~ndimage.binary_erosion(mask, iterations=thickness)] = color
    return rgb


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Square ``size`` x ``size`` thumbnail (smoothly shrunk, then nearest to the exact size)."""
    factor = size / max(rgb.shape[:2])
    return ndimage.zoom(rgb, (factor, factor, 1), order=1)[:size, :size]


def montage(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """Tiles of equal size in a grid, row by row, black where the last row is short."""
    rows = -(-len(tiles) // columns)
    height, width = tiles[0].shape[:2]
    canvas = np.zeros((rows * height, columns * width, 3), np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = tile
    return canvas


def save_png(rgb: np.ndarray, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    return path

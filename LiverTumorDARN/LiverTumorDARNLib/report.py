"""The per-tumor report a radiologist reads: volume, longest axial diameter, position, density.

The longest axial diameter follows RECIST 1.1: the longest in-plane extent of the lesion on the
axial slice where it is longest. It is the distance between the centres of the two farthest
edge pixels plus one pixel spacing (their outer halves), so a lesion one pixel wide measures
one pixel, not zero; pixel corners would overstate a disk's diameter by up to 40 % of a pixel.
Tumors are the 26-connected components of label 2, numbered from the largest down; tumors of equal
size in the order a raster scan of the canonical grid meets them, so that the numbers do not depend
on how a file stores its axes and the Slicer module's segments carry the report's numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import io as text_io
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .errors import InputError
from .io import array_to_reference, source_series_uid, to_canonical, write_json, write_text
from .labels import TUMOR


@dataclasses.dataclass
class TumorMeasurement:
    id: int
    volume_ml: float
    longest_axial_diameter_mm: float
    centroid_mm: tuple[float, float, float]  # physical x, y, z in ITK's LPS frame
    centroid_ijk: tuple[int, int, int]  # voxel index in the input image
    mean_hu: float


@dataclasses.dataclass
class CaseReport:
    liver_volume_ml: float  # liver including its tumors, as LiTS and clinicians count it
    tumor_volume_ml: float
    tumor_burden_percent: float
    tumors: list[TumorMeasurement]
    series_uid: str | None = None  # the DICOM series the CT was read from; None for a volume file

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure(ct: sitk.Image, labels: sitk.Image) -> CaseReport:
    """Measure every tumor of a label map on its CT (both on the same grid, any orientation).

    Only the box around the liver is read (a crop keeps every voxel's physical position and the
    tumors' raster order): the Slicer panel measures the report again after every click."""
    organ = _organ_box(sitk.GetArrayViewFromImage(labels))
    canonical_ct, canonical_labels = to_canonical(ct[organ]), to_canonical(labels[organ])
    hu = sitk.GetArrayViewFromImage(canonical_ct)
    label_array = sitk.GetArrayViewFromImage(canonical_labels)
    spacing = np.array(canonical_labels.GetSpacing())  # x, y, z
    voxel_ml = float(np.prod(spacing)) / 1000
    numbers = _numbered_by_size(label_array)
    sizes = np.bincount(numbers.ravel())[1:]
    tumors = []
    for number, box in enumerate(ndimage.find_objects(numbers), start=1):
        mask = numbers[box] == number
        offset = np.array([s.start for s in box])
        centroid_zyx = np.argwhere(mask).mean(axis=0) + offset
        centroid_mm = canonical_labels.TransformContinuousIndexToPhysicalPoint(centroid_zyx[::-1].tolist())
        tumors.append(TumorMeasurement(
            id=number,
            volume_ml=round(float(sizes[number - 1]) * voxel_ml, 3),
            longest_axial_diameter_mm=round(longest_axial_diameter(mask, spacing[:2]), 1),
            centroid_mm=tuple(round(c, 1) for c in centroid_mm),
            centroid_ijk=tuple(int(i) for i in labels.TransformPhysicalPointToIndex(centroid_mm)),
            mean_hu=round(float(hu[box][mask].mean()), 1),
        ))
    liver_ml = float(np.count_nonzero(label_array)) * voxel_ml
    tumor_ml = float(sizes.sum()) * voxel_ml
    return CaseReport(round(liver_ml, 2), round(tumor_ml, 3),
                      round(100 * tumor_ml / liver_ml, 3) if liver_ml else 0.0, tumors, source_series_uid(ct))


def numbered_tumors(labels: sitk.Image) -> np.ndarray:
    """The tumors of a label map numbered as the report numbers them (1 the largest): an array
    [k, j, i] on the map's own grid, 0 outside the tumors."""
    numbers = _numbered_by_size(sitk.GetArrayFromImage(to_canonical(labels)))  # a copy: a view would outlive its image
    return sitk.GetArrayFromImage(array_to_reference(numbers, labels))


def _numbered_by_size(canonical_labels: np.ndarray) -> np.ndarray:
    """The 26-connected tumors of a canonical [z, y, x] label array numbered 1, 2, ... from the
    largest down. cc3d numbers components in raster order; a stable sort keeps that order among
    tumors of equal size (numpy's default quicksort would not)."""
    components = cc3d.connected_components(canonical_labels == TUMOR, connectivity=26)
    sizes = np.bincount(components.ravel())[1:]
    number_of = np.zeros(len(sizes) + 1, components.dtype)
    number_of[np.argsort(-sizes, kind="stable") + 1] = np.arange(1, len(sizes) + 1)
    return number_of[components]


def _organ_box(labels: np.ndarray) -> tuple[slice, slice, slice]:
    """The (x, y, z) slices of an image around every nonzero voxel of its [z, y, x] array (one voxel for none)."""
    box = []
    for axis in (2, 1, 0):
        present = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1) if len(present) else slice(0, 1))
    return tuple(box)


def longest_axial_diameter(mask: np.ndarray, spacing_xy) -> float:
    """Longest in-plane extent (mm) over the axial slices of a [z, y, x] mask."""
    sx, sy = spacing_xy
    longest = 0.0
    for axial in mask:
        if axial.any():
            rows, cols = np.nonzero(axial & ~ndimage.binary_erosion(axial))
            longest = max(longest, _max_pairwise_distance(np.stack([cols * sx, rows * sy], axis=1)))
    return longest + (sx + sy) / 2 if mask.any() else 0.0


def _max_pairwise_distance(points: np.ndarray) -> float:
    try:
        points = points[ConvexHull(points).vertices]  # the farthest pair lies on the hull
    except QhullError:  # all points on one line
        pass
    differences = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((differences ** 2).sum(-1)).max())


def format_report(report: CaseReport) -> str:
    """A plain-text table for the terminal."""
    lines = [f"Liver volume {report.liver_volume_ml:.1f} mL, tumor volume {report.tumor_volume_ml:.2f} mL, "
             f"tumor burden {report.tumor_burden_percent:.2f} %, {len(report.tumors)} tumor(s)"]
    if report.tumors:
        lines.append(f"{'Tumor':>5}  {'Volume mL':>10}  {'Longest axial mm':>16}  {'Mean HU':>8}  Centroid (x, y, z) mm, LPS")
        for tumor in report.tumors:
            x, y, z = tumor.centroid_mm
            lines.append(f"{tumor.id:>5}  {tumor.volume_ml:>10.2f}  {tumor.longest_axial_diameter_mm:>16.1f}  "
                         f"{tumor.mean_hu:>8.1f}  ({x:.1f}, {y:.1f}, {z:.1f})")
    return "\n".join(lines)


REPORT_SUFFIXES = (".csv", ".json")

TUMOR_COLUMNS = ("tumor_id", "volume_ml", "longest_axial_diameter_mm", "mean_hu",
                 "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "centroid_i", "centroid_j", "centroid_k",
                 "series_uid")


def report_format(path: Path) -> str:
    """The report's format by its file name (checked before the work, not after it)."""
    suffix = Path(path).suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise InputError(f"{path}: a report is written as {' or '.join(REPORT_SUFFIXES)}")
    return suffix


def write_report(report: CaseReport, path: Path, overwrite: bool = False) -> Path:
    """Write the report atomically: JSON holds everything, CSV one row per tumor (for spreadsheets)."""
    path = Path(path)
    if report_format(path) == ".json":
        return write_json(report.as_dict(), path, overwrite)
    text = text_io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(TUMOR_COLUMNS)
    for tumor in report.tumors:
        writer.writerow([tumor.id, tumor.volume_ml, tumor.longest_axial_diameter_mm, tumor.mean_hu,
                         *tumor.centroid_mm, *tumor.centroid_ijk, report.series_uid or ""])
    return write_text(text.getvalue(), path, overwrite)

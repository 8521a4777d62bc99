"""LiTS evaluation (Bilic et al., "The Liver Tumor Segmentation Benchmark (LiTS)", MedIA 2023).

Label maps use 0 background, 1 liver, 2 tumor. Liver Dice is computed on labels 1 or 2, because
LiTS counts tumor as part of the liver.

Axis convention: arrays are numpy in [z, y, x] order (what ``sitk.GetArrayFromImage`` returns),
while ``spacing`` is (sx, sy, sz) in mm (what ``image.GetSpacing()`` returns). The spacing is
reversed internally before it is paired with array axes; getting this wrong silently rescales
every distance on anisotropic CT, where z spacing is often several times the in-plane spacing.

Undefined values are NaN, never a made-up number, so that they cannot bias a mean:
- surface distances (ASSD, MSSD) are NaN when either tumor mask is empty,
- RVD is NaN when the truth has no tumor (division by zero volume),
- tumor burden is NaN when the liver is empty, lesion recall/precision when nothing is counted.
``summarize`` leaves NaN out of its means and writes it as ``None`` so the dict is strict JSON.

Fractions in ``summarize`` are plain fractions (0..1); only ``format_table`` shows percentages.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .io import IMAGE_SUFFIXES, image_stem, is_image_path, read_image
from .labels import LIVER, TUMOR, check_label_values

GEOMETRY_TOLERANCE = 1e-3
DETECTION_IOU = 0.5  # Bilic et al. count a lesion as detected above IoU 0.5.


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; two empty masks agree perfectly, so they score 1."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``a`` to the surface of ``b``, and of ``b`` to ``a``.

    ``spacing`` is (sx, sy, sz) for [z, y, x] arrays. Returns two empty arrays when either mask
    is empty, because a distance to nothing is undefined. The work is done inside the padded
    bounding box of both masks: both surfaces lie in it and Euclidean distance between two points
    does not depend on what lies around them, so the crop is exact and much faster on CT volumes.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        return np.empty(0), np.empty(0)
    box = _bounding_box(a | b)
    surface_a, surface_b = _surface(a[box]), _surface(b[box])
    sampling = tuple(float(s) for s in reversed(spacing))
    a_to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)[surface_a]
    b_to_a = ndimage.distance_transform_edt(~surface_a, sampling=sampling)[surface_b]
    return a_to_b, b_to_a


@dataclasses.dataclass(frozen=True)
class CaseMetrics:
    """Per-case LiTS numbers; raw counts are kept so that ``summarize`` can pool over cases."""

    case_id: str
    tumor_dice: float
    voe: float
    rvd: float
    assd_mm: float
    mssd_mm: float
    liver_dice: float
    tumor_intersection_voxels: int
    truth_tumor_voxels: int
    predicted_tumor_voxels: int
    truth_tumor_ml: float
    predicted_tumor_ml: float
    truth_tumor_burden: float
    predicted_tumor_burden: float
    truth_lesions: int
    predicted_lesions: int
    detected_lesions: int
    true_positive_lesions: int


def evaluate_case(
    truth: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], case_id: str
) -> CaseMetrics:
    """All LiTS metrics of one case; ``truth`` and ``prediction`` are [z, y, x] label maps."""
    if truth.shape != prediction.shape:
        raise InputError(f"Case {case_id}: truth shape {truth.shape} != prediction shape {prediction.shape}.")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    truth_tumor, predicted_tumor = truth == TUMOR, prediction == TUMOR
    truth_liver = truth_tumor | (truth == LIVER)
    predicted_liver = predicted_tumor | (prediction == LIVER)
    # Everything tumor-related happens in the tumors' bounding box: CT volumes are mostly empty.
    box = _bounding_box(truth_tumor | predicted_tumor)
    a, b = truth_tumor[box], predicted_tumor[box]
    n_a, n_b, n_ab = int(a.sum()), int(b.sum()), int((a & b).sum())
    a_to_b, b_to_a = surface_distances(a, b, spacing)
    distances = np.concatenate([a_to_b, b_to_a])
    lesions = _lesion_counts(a, b)
    return CaseMetrics(
        case_id=case_id,
        tumor_dice=dice(a, b),
        voe=1.0 - n_ab / (n_a + n_b - n_ab) if n_a + n_b else 0.0,
        rvd=(n_b - n_a) / n_a if n_a else math.nan,
        assd_mm=float(distances.mean()) if distances.size else math.nan,
        mssd_mm=float(distances.max()) if distances.size else math.nan,
        liver_dice=dice(truth_liver, predicted_liver),
        tumor_intersection_voxels=n_ab,
        truth_tumor_voxels=n_a,
        predicted_tumor_voxels=n_b,
        truth_tumor_ml=n_a * voxel_ml,
        predicted_tumor_ml=n_b * voxel_ml,
        truth_tumor_burden=_ratio(n_a, int(truth_liver.sum())),
        predicted_tumor_burden=_ratio(n_b, int(predicted_liver.sum())),
        **lesions,
    )


def summarize(cases: list[CaseMetrics]) -> dict:
    """Dataset-level LiTS scores plus every case, as a strict-JSON dict (NaN becomes None).

    Both Dice variants are reported because they answer different questions: the per-case mean
    weighs every patient equally (small missed tumors hurt), the global Dice pools voxels and is
    dominated by large tumors. Lesion recall/precision are pooled over lesions for the same reason.
    """
    def column(name: str) -> list:
        return [getattr(case, name) for case in cases]

    pooled = sum(c.truth_tumor_voxels + c.predicted_tumor_voxels for c in cases)
    burden_errors = [abs(c.predicted_tumor_burden - c.truth_tumor_burden) for c in cases]
    summary = {
        "n_cases": len(cases),
        "dice_per_case": _nanmean(column("tumor_dice")),
        "dice_global": 2.0 * sum(column("tumor_intersection_voxels")) / pooled if pooled else 1.0,
        "voe": _nanmean(column("voe")),
        "rvd": _nanmean(column("rvd")),
        "assd_mm": _nanmean(column("assd_mm")),
        "mssd_mm": _nanmean(column("mssd_mm")),
        "liver_dice": _nanmean(column("liver_dice")),
        "lesion_recall": _ratio(sum(column("detected_lesions")), sum(column("truth_lesions"))),
        "lesion_precision": _ratio(sum(column("true_positive_lesions")), sum(column("predicted_lesions"))),
        "tumor_burden_error": _nanmean(burden_errors),
        "cases": [dataclasses.asdict(case) for case in cases],
    }
    return _json_ready(summary)


_TABLE_COLUMNS = (
    # header, summary key, case key, scale, decimals
    ("Dice per case [%]", "dice_per_case", "tumor_dice", 100.0, 1),
    ("Dice global [%]", "dice_global", None, 100.0, 1),
    ("VOE [%]", "voe", "voe", 100.0, 1),
    ("RVD [%]", "rvd", "rvd", 100.0, 1),
    ("ASSD [mm]", "assd_mm", "assd_mm", 1.0, 2),
    ("MSSD [mm]", "mssd_mm", "mssd_mm", 1.0, 2),
    ("Liver Dice [%]", "liver_dice", "liver_dice", 100.0, 1),
    ("Lesion recall [%]", "lesion_recall", "lesion_recall", 100.0, 1),
    ("Lesion precision [%]", "lesion_precision", "lesion_precision", 100.0, 1),
)


def format_table(summary: dict) -> str:
    """Plain-text table laid out like Table III of the DARN paper, then one row per case.

    A single case has no separate global Dice, so that column is "-" in case rows; undefined
    values (None) are "-" as well.
    """
    header = ["Case", *(column[0] for column in _TABLE_COLUMNS)]
    overall = [f"All ({summary['n_cases']} cases)", *(_cell(summary[key], s, d) for _, key, _, s, d in _TABLE_COLUMNS)]
    rows = [_case_row(case) for case in summary["cases"]]
    widths = [max(len(row[i]) for row in [header, overall, *rows]) for i in range(len(header))]
    rule = "  ".join("-" * width for width in widths)
    lines = [_table_line(header, widths), rule, _table_line(overall, widths), rule]
    lines.extend(_table_line(row, widths) for row in rows)
    return "\n".join(lines)


def _case_row(case: dict) -> list[str]:
    values = {
        **case,
        "lesion_recall": _ratio(case["detected_lesions"], case["truth_lesions"]),
        "lesion_precision": _ratio(case["true_positive_lesions"], case["predicted_lesions"]),
    }
    return [case["case_id"], *(_cell(values.get(key), s, d) for _, _, key, s, d in _TABLE_COLUMNS)]


def match_case_files(truth: Path, prediction: Path) -> list[tuple[str, Path, Path]]:
    """Pair truth and prediction files as (case id, truth, prediction), sorted by case number.

    Folders are paired by the last integer in each file name, because the truth and prediction
    naming rarely match (``segmentation-7.nii`` vs ``volume-7.nii.gz`` or ``case_7.nrrd``). Extra
    predictions are ignored (a prediction folder may cover more cases than the truth); a truth
    without a prediction is an error, since silently skipping it would flatter the scores.
    """
    truth, prediction = Path(truth), Path(prediction)
    for path in (truth, prediction):
        if not path.exists():
            raise InputError(f"Path does not exist: {path}")
    if truth.is_file() and prediction.is_file():
        return [(_case_id(truth), truth, prediction)]
    if not (truth.is_dir() and prediction.is_dir()):
        raise InputError(f"Give two files or two folders, not a mix: {truth}, {prediction}")
    truths, predictions = _numbered_images(truth), _numbered_images(prediction)
    if not truths:
        raise InputError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) in {truth}")
    missing = sorted(set(truths) - set(predictions))
    if missing:
        raise InputError(f"No prediction in {prediction} for case number(s) {', '.join(map(str, missing))}")
    return [(_case_id(truths[n]), truths[n], predictions[n]) for n in sorted(truths)]


def evaluate_files(truth: Path, prediction: Path) -> dict:
    """Evaluate label-map files or folders (see ``match_case_files``) and return ``summarize``."""
    cases = [_evaluate_pair(case_id, t, p) for case_id, t, p in match_case_files(truth, prediction)]
    return summarize(cases)


def _evaluate_pair(case_id: str, truth_path: Path, prediction_path: Path) -> CaseMetrics:
    """Read, check and evaluate one pair; the images die with this frame, bounding peak memory."""
    truth_image, prediction_image = read_image(truth_path), read_image(prediction_path)
    _check_same_geometry(case_id, truth_image, prediction_image)
    truth, prediction = sitk.GetArrayFromImage(truth_image), sitk.GetArrayFromImage(prediction_image)
    check_label_values(truth, str(truth_path))
    check_label_values(prediction, str(prediction_path))
    return evaluate_case(truth, prediction, truth_image.GetSpacing(), case_id)


def _check_same_geometry(case_id: str, truth: sitk.Image, prediction: sitk.Image) -> None:
    """Voxelwise metrics are meaningless unless both maps sample the same physical grid."""
    if truth.GetSize() != prediction.GetSize():
        raise InputError(f"Case {case_id}: truth size {truth.GetSize()} != prediction size {prediction.GetSize()}")
    for name in ("Spacing", "Origin", "Direction"):
        t, p = getattr(truth, f"Get{name}")(), getattr(prediction, f"Get{name}")()
        if not np.allclose(t, p, rtol=0.0, atol=GEOMETRY_TOLERANCE):
            raise InputError(f"Case {case_id}: truth {name.lower()} {t} != prediction {name.lower()} {p}")


def _numbered_images(folder: Path) -> dict[int, Path]:
    """Image files of a folder keyed by case number; unnumbered or duplicate numbers are ambiguous."""
    paths = [path for path in sorted(folder.iterdir()) if path.is_file() and is_image_path(path)]
    labels = [path for path in paths if path.name.lower().startswith("segmentation")]
    images: dict[int, Path] = {}
    for path in labels or paths:  # in the LiTS layout, volume-K sits beside segmentation-K
        numbers = re.findall(r"\d+", _case_id(path))
        if not numbers:
            raise InputError(f"No case number in file name: {path}")
        number = int(numbers[-1])
        if number in images:
            raise InputError(f"Two files for case number {number}: {images[number].name}, {path.name}")
        images[number] = path
    return images


def _case_id(path: Path) -> str:
    """File name without its image suffix (``segmentation-3.nii.gz`` -> ``segmentation-3``)."""
    return image_stem(path)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside; voxels on the array border count as surface."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _bounding_box(mask: np.ndarray, pad: int = 2) -> tuple[slice, ...]:
    """Padded bounding box of a mask (whole array if empty); the pad keeps erosion results exact."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(i for i in range(mask.ndim) if i != axis)))
        if hits.size == 0:
            return tuple(slice(None) for _ in range(mask.ndim))
        box.append(slice(max(int(hits[0]) - pad, 0), int(hits[-1]) + pad + 1))
    return tuple(box)


def _lesion_counts(truth: np.ndarray, prediction: np.ndarray) -> dict[str, int]:
    """Lesion-wise detection with IoU > 0.5 against the union of all overlapping components.

    Matching against the union (not the single best component) is what lets a lesion that the
    prediction splits into pieces, or two predicted lesions that merge, still count as found.
    The IoUs come from one contingency table of component labels, so no per-lesion masks are built.
    """
    truth_labels, n_truth = cc3d.connected_components(truth, connectivity=26, return_N=True)
    predicted_labels, n_predicted = cc3d.connected_components(prediction, connectivity=26, return_N=True)
    pairs = truth_labels.astype(np.int64) * (n_predicted + 1) + predicted_labels
    table = np.bincount(pairs.ravel(), minlength=(n_truth + 1) * (n_predicted + 1))
    table = table.reshape(n_truth + 1, n_predicted + 1)
    return {
        "truth_lesions": int(n_truth),
        "predicted_lesions": int(n_predicted),
        "detected_lesions": _count_matched(table),
        "true_positive_lesions": _count_matched(table.T),
    }


def _count_matched(table: np.ndarray) -> int:
    """Rows (components, label >= 1) whose IoU with the union of overlapping columns exceeds 0.5.

    ``table[i, j]`` is the voxel count with row label i and column label j; label 0 is background.
    """
    sizes = table.sum(axis=1)[1:]
    overlaps = table[1:, 1:]
    column_sizes = table.sum(axis=0)[1:]
    intersection = overlaps.sum(axis=1)
    union = sizes + (overlaps > 0) @ column_sizes - intersection
    return int(np.count_nonzero(intersection > DETECTION_IOU * union))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _nanmean(values: list[float]) -> float:
    """Mean of the defined values; NaN only if none is defined (avoids numpy's empty-slice warning)."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def _json_ready(value):
    """Replace NaN by None recursively: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _cell(value: float | None, scale: float, decimals: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * scale:.{decimals}f}"


def _table_line(cells: list[str], widths: list[int]) -> str:
    return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

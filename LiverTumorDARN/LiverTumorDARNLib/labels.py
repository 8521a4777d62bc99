"""What the label values mean: LiTS's numbers, and the names, colours and codes of each segment.

The numbers are LiTS's convention, so LiTS files train and evaluate unchanged. The codes are the
DICOM / SNOMED CT terminology that 3D Slicer's Segment Editor, Segment Statistics and DICOM SEG
export expect, so every output (.seg.nrrd, DICOM SEG, the Slicer segments) describes the same
segment the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import InputError

BACKGROUND, LIVER, TUMOR = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Code:
    """One coded concept: (coding scheme designator, code value, code meaning)."""

    scheme: str
    value: str
    meaning: str


@dataclasses.dataclass(frozen=True)
class Segment:
    label: int
    name: str
    color: tuple[int, int, int]  # RGB 0-255
    category: Code
    type: Code
    anatomic_region: Code | None = None


LIVER_CODE = Code("SCT", "10200004", "Liver")

SEGMENTS = (
    # Liver parenchyma without its tumors, as in the label map; Slicer's colour for the liver.
    Segment(LIVER, "Liver", (221, 130, 101), Code("SCT", "123037004", "Anatomical Structure"), LIVER_CODE),
    Segment(TUMOR, "Liver tumor", (144, 238, 144), Code("SCT", "49755003", "Morphologically Altered Structure"),
            Code("SCT", "108369006", "Neoplasm"), anatomic_region=LIVER_CODE),
)


def check_label_values(voxels: np.ndarray, where: str) -> None:
    """Refuse a map holding values other than 0, 1 and 2 (another program's labels, an interpolated
    map, a CT given by mistake) instead of editing or scoring it as if it were one of ours."""
    if np.issubdtype(voxels.dtype, np.integer):
        valid = voxels.size == 0 or (voxels.min() >= BACKGROUND and voxels.max() <= TUMOR)
    else:
        valid = bool(np.isin(voxels, (BACKGROUND, LIVER, TUMOR)).all())
    if not valid:
        values = np.unique(voxels)
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise InputError(f"{where}: a label map holds {BACKGROUND} background, {LIVER} liver, {TUMOR} tumor; found {shown}")

"""DICOM series in: which series of a folder is the CT to segment, and is its geometry sound.

A folder from a PACS export usually holds several series: the localizer (scout), the axial
diagnostic series, reformats, sometimes a dose report. The axial CT series is chosen unless the
user names one with its Series Instance UID. SimpleITK (GDCM) reads the voxels and applies each
slice's rescale slope and intercept; pydicom reads the headers, because the checks below need
every slice's position and GDCM would otherwise hide the problems they catch:

* a gap in the stack (a missing slice) or uneven spacing: ITK reads the slices at their mean
  spacing with only a printed warning, so every distance and volume would silently be wrong;
* a gantry tilt: ITK stacks sheared slices as if they were straight, which misplaces anatomy by
  centimetres at the ends of the scan;
* two slices at one position (two acquisitions in one series) or mixed orientations.

Each is a one-line :class:`InputError` that says what is wrong and what to do, not a resampling
guess: the label map must lie exactly on the slices the radiologist reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from .errors import InputError

AXIAL_MAX_ANGLE_DEGREES = 30.0
"""A series whose slice normal is within this angle of the body axis counts as axial."""

SPACING_TOLERANCE = 0.1
"""Slice steps may differ from the median step by this fraction (scanners round positions)."""

MAX_TILT_DEGREES = 0.5
"""Smaller shears (rounding of positions) move the last slice by well under a voxel."""


@dataclasses.dataclass(frozen=True)
class Series:
    """One DICOM series of a folder, its files sorted along the slice normal."""

    uid: str
    files: tuple[Path, ...]
    modality: str
    description: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...]  # ImageOrientationPatient: row then column direction cosines

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def is_axial(self) -> bool:
        return abs(float(self.normal[2])) >= math.cos(math.radians(AXIAL_MAX_ANGLE_DEGREES))

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    def summary(self) -> str:
        return f"{self.uid} ({self.modality or 'no modality'}, {len(self.files)} files, '{self.description}')"


def list_series(folder: Path) -> list[Series]:
    """Every DICOM series in ``folder`` (not its subfolders); empty when it holds no DICOM."""
    reader = sitk.ImageSeriesReader()
    with _itk_warnings_muted():  # GDCM warns on a folder without DICOM, an expected case here
        uids = reader.GetGDCMSeriesIDs(str(folder))
        return [_describe(uid, reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids]


def _describe(uid: str, files) -> Series:
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    return Series(uid=uid, files=tuple(Path(f) for f in files),
                  modality=str(header.get("Modality", "")),
                  description=str(header.get("SeriesDescription", "")),
                  image_type=tuple(str(v).upper() for v in header.get("ImageType", [])),
                  orientation=tuple(float(v) for v in header.get("ImageOrientationPatient", (1, 0, 0, 0, 1, 0))))


def choose_series(folder: Path, series: list[Series], uid: str | None = None) -> Series:
    """The series named by ``uid``, else the axial CT series with the most slices."""
    if uid is not None:
        named = [s for s in series if s.uid == uid]
        if not named:
            raise InputError(f"{folder}: no series with UID {uid}; the folder holds {_listing(series)}")
        return named[0]
    candidates = [s for s in series if s.modality in ("CT", "") and not s.is_localizer and s.is_axial]
    if not candidates:
        raise InputError(f"{folder}: no axial CT series among {_listing(series)}; choose one by its series UID",
                         option="series_uid")
    return min(candidates, key=lambda s: (-len(s.files), s.uid))


def _listing(series: list[Series]) -> str:
    return "; ".join(s.summary() for s in series) or "no DICOM series"


def read_series(folder: Path, series: Series) -> sitk.Image:
    """One series of ``folder`` as a volume in HU, after its geometry is checked."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in sorted_checked_files(folder, series)])
    try:
        with _itk_warnings_muted():
            return reader.Execute()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise InputError(f"{folder}: cannot read DICOM series {series.uid}: {reason}") from None


def sorted_checked_files(folder: Path, series: Series) -> list[Path]:
    """The series' files in stacking order; raises InputError for an unsound stack."""
    if len(series.files) == 1:  # one file: a multi-frame image, its geometry is in the file
        return list(series.files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise InputError(f"{folder}: series {series.uid} mixes slice orientations; export one orientation per series")
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    heights = positions @ series.normal
    order = np.argsort(heights, kind="stable")
    _check_steps(folder, series, heights[order])
    _check_tilt(folder, series, positions[order])
    return [series.files[i] for i in order]


def _check_steps(folder: Path, series: Series, heights: np.ndarray) -> None:
    steps = np.diff(heights)
    if steps.min() < 0.01:
        raise InputError(f"{folder}: series {series.uid} has {int((steps < 0.01).sum()) + 1} slices at one position "
                         f"(two acquisitions in one series?); choose or export one of them")
    typical = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - typical)))
    if abs(steps[worst] - typical) > SPACING_TOLERANCE * typical:
        raise InputError(f"{folder}: series {series.uid} has uneven slice spacing: {steps[worst]:.2f} mm between "
                         f"slices {worst + 1} and {worst + 2} where the others are {typical:.2f} mm apart "
                         f"(a missing slice?); export the complete series")


def _check_tilt(folder: Path, series: Series, positions: np.ndarray) -> None:
    travel = positions[-1] - positions[0]
    along = float(travel @ series.normal)
    across = float(np.linalg.norm(travel - along * series.normal))
    tilt = math.degrees(math.atan2(across, abs(along)))
    if tilt > MAX_TILT_DEGREES:
        raise InputError(f"{folder}: series {series.uid} was acquired with a gantry tilt of {tilt:.1f} degrees "
                         f"(sheared slices); load it in 3D Slicer with acquisition geometry regularization "
                         f"and save it as a volume, or export a tilt-corrected series")


@contextlib.contextmanager
def _itk_warnings_muted():
    """Mute ITK's multi-line console warnings; this module reports problems itself."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)

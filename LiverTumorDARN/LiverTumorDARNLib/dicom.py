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
* two slices at one position (two acquisitions in one series), mixed orientations or image sizes;
* a slice without its position or pixel spacing, or a spacing of 0: GDCM would assume 1 mm;
* a file of the series that GDCM cannot read (cut off in a copy, or empty): GDCM leaves it out
  without a word, so a slice would be missing, or the gap reported without the file's name.

Each is a one-line :class:`InputError` that says what is wrong and what to do, not a resampling
guess: the label map must lie exactly on the slices the radiologist reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import stat
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from .errors import InputError

AXIAL_MAX_ANGLE_DEGREES = 30.0
"""A series whose slice normal is within this angle of the body axis counts as axial."""

SPACING_TOLERANCE = 0.1
"""Slice steps may differ from the median step by this fraction (scanners round positions)."""

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
"""SOP Class UID of a DICOMDIR, the index file of a DICOM medium: DICOM, but no slice."""

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
    unreadable: tuple[Path, ...] = ()  # files of the folder that may be slices of it but GDCM cannot read

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
    files = _regular_files(folder)
    reader = sitk.ImageSeriesReader()
    with _itk_warnings_muted():  # GDCM warns on a folder without DICOM, an expected case here
        uids = reader.GetGDCMSeriesIDs(str(folder))
        series = [_describe(uid, reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids]
    listed = {Path(f).name for s in series for f in s.files}
    left_out = [(path, _claimed_series(path)) for path in files if path.name not in listed and not path.name.startswith(".")]
    return [dataclasses.replace(s, unreadable=tuple(path for path, uid in left_out if uid in ("", s.uid)))
            for s in series]


def _regular_files(folder: Path) -> list[Path]:
    """The files of ``folder``; a pipe or device among them is refused before GDCM opens it."""
    files = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        try:
            mode = entry.stat().st_mode
        except FileNotFoundError:  # a broken link: nothing to read
            continue
        if stat.S_ISREG(mode):
            files.append(Path(entry.path))
        elif not stat.S_ISDIR(mode):
            raise InputError(f"{folder}: {entry.name} is not a regular file (a pipe, socket or device); remove it from the series folder")
    return files


def _claimed_series(path: Path) -> str | None:
    """For a file GDCM left out: the series it says it belongs to, "" when it may be any (empty, or
    DICOM whose header is cut off), None when it is no DICOM image (a text file, a DICOMDIR)."""
    if path.stat().st_size == 0:
        return ""
    with open(path, "rb") as f:
        has_dicom_prefix = f.read(132)[128:] == b"DICM"
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
        return "" if has_dicom_prefix else None
    if header.get("SeriesInstanceUID"):
        return str(header.SeriesInstanceUID)
    is_directory = header.get("file_meta", {}).get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY
    return "" if has_dicom_prefix and not is_directory else None


def _describe(uid: str, files) -> Series:
    header = _header(Path(files[0]))
    return Series(uid=uid, files=tuple(Path(f) for f in files),
                  modality=str(header.get("Modality", "")),
                  description=str(header.get("SeriesDescription", "")),
                  image_type=tuple(str(v).upper() for v in header.get("ImageType", [])),
                  orientation=_orientation(header))


def _orientation(header: pydicom.Dataset) -> tuple[float, ...]:
    """The first slice's orientation, axial when it has none or a broken one (for choosing a series:
    reading one checks every slice's, naming the file)."""
    try:
        orientation = tuple(float(v) for v in header.get("ImageOrientationPatient", ()))
    except (TypeError, ValueError):
        orientation = ()
    return orientation if len(orientation) == 6 else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _header(path: Path) -> pydicom.Dataset:
    """A file's DICOM header; InputError naming the file when pydicom cannot parse it."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: cannot read the DICOM header ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         f"copy or export the series again") from None


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
    most = max(len(s.files) for s in candidates)
    tied = [s for s in candidates if len(s.files) == most]
    if len(tied) > 1:  # two contrast phases, say: which one is meant cannot be guessed
        raise InputError(f"{folder}: {len(tied)} axial CT series have {most} slices each: {_listing(tied)}; "
                         f"choose one by its series UID", option="series_uid")
    return tied[0]


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
    if series.unreadable:
        raise InputError(_unreadable_message(folder, series))
    if len(series.files) == 1:  # one file: a multi-frame image, its geometry is in the file
        return list(series.files)
    headers = [_header(f) for f in series.files]
    _check_sizes(folder, series, headers)
    orientations = np.array([_numbers(h, f, "ImageOrientationPatient", 6) for h, f in zip(headers, series.files)])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise InputError(f"{folder}: series {series.uid} mixes slice orientations; export one orientation per series")
    for header, path in zip(headers, series.files):
        _check_pixel_spacing(header, path)
    positions = np.array([_numbers(h, f, "ImagePositionPatient", 3) for h, f in zip(headers, series.files)])
    heights = positions @ series.normal
    order = np.argsort(heights, kind="stable")
    _check_steps(folder, series, heights[order])
    _check_tilt(folder, series, positions[order])
    return [series.files[i] for i in order]


def _unreadable_message(folder: Path, series: Series) -> str:
    first = series.unreadable[0]
    what = "is empty (0 bytes)" if first.stat().st_size == 0 else "cannot be read as a slice (cut off or corrupt)"
    others = f" (and {len(series.unreadable) - 1} more)" if len(series.unreadable) > 1 else ""
    return (f"{folder}: {first.name}{others} {what}, so series {series.uid} would be read without it; "
            f"copy or export the series again, or remove the file if it belongs to no series")


def _numbers(header: pydicom.Dataset, path: Path, keyword: str, count: int) -> list[float]:
    """A numeric attribute every slice needs for its place in space; InputError naming the file if absent."""
    values = header.get(keyword)
    try:
        numbers = [float(v) for v in values] if values is not None else []
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise InputError(f"{path}: the slice has no valid {keyword} ({values if values is not None else 'missing'}), "
                         f"so it cannot be placed in space; export the series again with its geometry")
    return numbers


def _check_pixel_spacing(header: pydicom.Dataset, path: Path) -> None:
    spacing = _numbers(header, path, "PixelSpacing", 2)
    if min(spacing) <= 0:
        shown = "\\".join(f"{v:g}" for v in spacing)
        raise InputError(f"{path}: PixelSpacing {shown} mm is not a pixel size (GDCM would read 1 mm); "
                         f"export the series again with its true spacing")


def _check_sizes(folder: Path, series: Series, headers: list) -> None:
    """One image size per series: GDCM stops at the first odd slice with a bare size message."""
    sizes = [(int(h.get("Rows", 0)), int(h.get("Columns", 0))) for h in headers]
    common = max(set(sizes), key=sizes.count)
    odd = [f for f, size in zip(series.files, sizes) if size != common]
    if odd:
        rows, columns = sizes[series.files.index(odd[0])]
        raise InputError(f"{folder}: series {series.uid} mixes image sizes: {odd[0].name} is {columns}x{rows} where "
                         f"{sizes.count(common)} slices are {common[1]}x{common[0]}"
                         f"{f' (and {len(odd) - 1} more odd slices)' if len(odd) > 1 else ''}; export the series again")


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

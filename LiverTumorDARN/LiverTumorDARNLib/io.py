"""Reading, checking, orienting and writing volumes: the only place that touches image files.

SimpleITK does the format, DICOM and orientation work. This module adds what the rest of the
project relies on:

* one canonical orientation: identity direction in ITK's LPS frame, so the array from
  ``sitk.GetArrayFromImage`` is ``[z, y, x]`` with x towards patient Left, y Posterior, z Superior
  (the models and the heuristics can then assume "the liver is on the patient's right = low x");
* results go back onto the input's exact grid (size, spacing, origin, direction bit-for-bit), so a
  label map overlays the CT in any viewer;
* user mistakes (missing file, truncated file, MR instead of CT, 2D image, ...) become one-line
  :class:`InputError` messages that name the path, instead of ITK's multi-line C++ traces;
* outputs are written atomically and read back before they take their name, so neither an
  interrupted run nor a full disk leaves a half-written file that looks finished, and an existing
  file is replaced only when asked (not even by another writer racing for the same name);
* an output never replaces an input, and the output folder is checked before the long work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import secrets
import socket
import stat
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Single-file or header+data formats that :func:`read_image` accepts (besides DICOM folders)."""

WRITE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".mha")
"""Formats :func:`write_image` writes. Detached-header formats (.nhdr, .mhd) are left out because
their header names the data file, which a write-then-rename would leave pointing at the temp name."""

_COMPRESSED_SUFFIXES = (".nii.gz", ".nrrd", ".mha")

MIN_SLICES = 16
"""Fewest voxels along the shortest axis: the 3D networks downsample 4 times (2**4 = 16)."""

MIN_IN_PLANE = 32
"""Fewest voxels along the two longer axes: below that there is no abdomen to segment."""

CANONICAL_ORIENTATION = "LPS"
"""DICOM-style code of the canonical frame: +x Left, +y Posterior, +z Superior (ITK's native frame)."""

AIR_PERCENTILE = 0.5
AIR_MAX_HU = -500.0
"""A CT of the abdomen always shows air (-1000 HU) around or inside the patient; if even the 0.5th
percentile is above -500 the values are not Hounsfield units (MR, PET, a normalised image)."""

MAX_MEDIAN_HU = 2000.0
"""Most of a CT volume is air and soft tissue; a median above this is no CT in HU."""

SPACING_LIMITS_MM = (0.05, 20.0)
"""From micro-CT-like reconstructions to the thickest clinical slices; anything else is a header error."""

HU_LIMITS = (-32768.0, 32767.0)
"""Hounsfield values are stored as 16-bit signed integers by every scanner."""

SERIES_UID_KEY = "0020|000e"
"""Metadata key (ITK's spelling of the DICOM tag Series Instance UID) under which :func:`read_image`
keeps the series it read from a DICOM folder, so the report can say which one it was."""

_PERCENTILE_SAMPLES = 1_000_000
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# --------------------------------------------------------------------------- paths


def _suffix(path: PathLike) -> str:
    """The image suffix of ``path`` (``.nii.gz`` counts as one), lower case, or ``""``."""
    name = Path(path).name.lower()
    return next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def image_stem(path: PathLike) -> str:
    """The file name without its image suffix (``segmentation-3.nii.gz`` -> ``segmentation-3``)."""
    name = Path(path).name
    return name[: len(name) - len(_suffix(path))]


def is_image_path(path: PathLike) -> bool:
    """True when ``path`` ends in one of :data:`IMAGE_SUFFIXES` (the file need not exist)."""
    return _suffix(path) != ""


def _itk_message(error: RuntimeError) -> str:
    """The one informative line of an ITK exception.

    ITK's first line is only "Exception thrown in ... file.cxx:123:"; the reason is on the next
    line, behind an "ITK ERROR: SomeIO(0x...): " prefix. Keep just the reason, on one line.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "ERROR" in line), lines[0] if lines else "unknown error")
    for marker in ("sitk::ERROR:", "ITK ERROR:"):
        if marker in reason:
            reason = reason.split(marker, 1)[1].strip()
    reason = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", reason)
    return reason.rstrip(":").strip() or "unknown error"


# --------------------------------------------------------------------------- reading


def read_image(path: PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a 3D scalar volume from an image file or a DICOM series folder.

    A folder is read as a DICOM series: the one named by ``series_uid``, else its axial CT series
    (:func:`.dicom.choose_series`). A folder without DICOM but with exactly one image file reads
    that file.

    The pixel type is kept as stored (a label map must stay integer); raises :class:`InputError`
    for anything that is not a readable 3D scalar volume, and for a pipe or device (reading one
    could block forever) before it is opened.
    """
    path = Path(path)
    try:
        image = _read_folder(path, series_uid) if _is_folder(path) else _read_file(path)
    except OSError as error:  # permission denied, an I/O error: the file system, not the image
        raise InputError(f"{error.filename or path}: cannot read it ({error.strerror or error})") from None
    _check_3d_scalar(image, str(path))
    return image


def source_series_uid(image: sitk.Image) -> str | None:
    """The Series Instance UID of the DICOM series ``image`` was read from; None for a volume file."""
    return image.GetMetaData(SERIES_UID_KEY) if image.HasMetaDataKey(SERIES_UID_KEY) else None


def _is_folder(path: Path) -> bool:
    """True for a folder, False for a regular file; InputError for a missing path or a special file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or folder; give a CT volume file ({', '.join(IMAGE_SUFFIXES)}) or a DICOM series folder") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise InputError(f"{path}: not a regular file (a pipe, socket or device); give a CT volume file or a DICOM series folder")
    return stat.S_ISDIR(mode)


def _read_file(path: Path) -> sitk.Image:
    """Read one image file, turning ITK's failures (and what its NIfTI reader hides) into InputError."""
    if not is_image_path(path):
        raise InputError(f"{path}: not a supported image file; expected one of {', '.join(IMAGE_SUFFIXES)} or a folder holding a DICOM series")
    with open(path, "rb"):  # an unreadable file fails here with its OSError, not with ITK's guess
        pass
    if _suffix(path) in (".nii", ".nii.gz"):
        _check_nifti(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: cannot read the image (truncated, corrupt or not really {_suffix(path)}): {_itk_message(error)}") from None


def _read_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    """Read the CT series of a DICOM folder (see :mod:`.dicom`), or its only image file."""
    from . import dicom

    series = dicom.list_series(folder)
    if series or series_uid is not None:
        chosen = dicom.choose_series(folder, series, series_uid)
        image = dicom.read_series(folder, chosen)
        image.SetMetaData(SERIES_UID_KEY, chosen.uid)
        return image
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_path(p))
    if len(files) == 1:
        return _read_file(files[0])
    found = f"{len(files)} image files" if files else "no image file"
    raise InputError(f"{folder}: folder holds no DICOM series and {found}; give a DICOM series folder or one volume file")


def _check_3d_scalar(image: sitk.Image, label: str) -> None:
    """Reject what the pipeline cannot segment: 2D slices, time series and colour/vector images."""
    if image.GetDimension() != 3:
        raise InputError(f"{label}: image is {image.GetDimension()}D with size {image.GetSize()}; expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1 or "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{label}: pixels are '{image.GetPixelIDTypeAsString()}' with {image.GetNumberOfComponentsPerPixel()} components; expected one scalar value per voxel (grey-level CT)")


# NIfTI: ITK's reader (SimpleITK 2.5 / ITK 5.4) hides three faults of a file: it zero-fills the
# missing part of a truncated file, reads NaN and infinite voxels as 0, and reads a voxel size of 0
# as 1 mm. The header and the data are read here first, so each is refused instead.

_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True)
class _NiftiHeader:
    endian: str
    shape: tuple[int, ...]  # dim[1] .. dim[dim[0]]
    datatype: int
    bitpix: int
    offset: int  # where the voxels start
    spacing: tuple[float, ...]  # pixdim of the first three axes

    @property
    def data_bytes(self) -> int:
        return math.prod(max(d, 1) for d in self.shape) * self.bitpix // 8

    @property
    def float_dtype(self) -> np.dtype | None:
        code = _NIFTI_FLOAT_TYPES.get(self.datatype)
        return np.dtype(self.endian + code) if code else None


def _nifti_header(raw: bytes) -> _NiftiHeader | None:
    """The fields of a NIfTI-1 or NIfTI-2 header that locate and describe the voxels, or None."""
    for endian in "<>":
        size = struct.unpack_from(endian + "i", raw, 0)[0] if len(raw) >= 4 else 0
        if size == 348 and len(raw) >= 348:
            dims = struct.unpack_from(endian + "8h", raw, 40)
            datatype, bitpix = struct.unpack_from(endian + "2h", raw, 70)
            pixdim = struct.unpack_from(endian + "8f", raw, 76)
            offset = max(int(struct.unpack_from(endian + "f", raw, 108)[0]), 348)
            break
        if size == 540 and len(raw) >= 540:
            datatype, bitpix = struct.unpack_from(endian + "2h", raw, 12)
            dims = struct.unpack_from(endian + "8q", raw, 16)
            pixdim = struct.unpack_from(endian + "8d", raw, 104)
            offset = max(struct.unpack_from(endian + "q", raw, 168)[0], 540)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    return _NiftiHeader(endian, tuple(dims[1 : dims[0] + 1]), datatype, bitpix, offset,
                        tuple(pixdim[1 : min(dims[0], 3) + 1]))


def _nifti_contents(path: Path) -> tuple[_NiftiHeader | None, int, int]:
    """(header, voxel bytes present, NaN or infinite voxels among them) of a .nii or .nii.gz file.

    Raises EOFError, OSError or zlib.error when the file cannot be read or its gzip stream is cut off.
    """
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as f:
        header = _nifti_header(f.read(540))
        if header is None:
            return None, 0, 0
        f.seek(header.offset)
        present, non_finite, dtype = 0, 0, header.float_dtype
        while present < header.data_bytes and (chunk := f.read(min(1 << 24, header.data_bytes - present))):
            present += len(chunk)
            if dtype is not None:
                voxels = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype)
                non_finite += int(np.count_nonzero(~np.isfinite(voxels)))
    return header, present, non_finite


def _check_nifti(path: Path) -> None:
    """Raise InputError for what ITK's NIfTI reader would hide (see above) or misreport."""
    if _suffix(path) == ".nii.gz" and not _starts_with(path, _GZIP_MAGIC) and _starts_like_nifti(path):
        raise InputError(f"{path}: the file is an uncompressed NIfTI although its name ends in .nii.gz; rename it to .nii")
    try:
        header, present, non_finite = _nifti_contents(path)
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: file is truncated or corrupt ({error}); re-export or re-download it") from None
    if header is None:
        return  # not NIfTI at all: ITK's own message says so
    if not all(math.isfinite(s) and s > 0 for s in header.spacing):
        raise InputError(f"{path}: the NIfTI header gives a voxel size of {' x '.join(f'{s:g}' for s in header.spacing)} mm, "
                         f"and a size must be above 0 (ITK would read 0 as 1 mm); fix the header's pixdim")
    if present < header.data_bytes:
        raise InputError(f"{path}: file is truncated: {header.offset + present} bytes where the NIfTI header needs "
                         f"{header.offset + header.data_bytes}; re-export or re-download it")
    if non_finite:
        raise InputError(_non_finite_message(str(path), non_finite, header.data_bytes * 8 // header.bitpix))


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _starts_like_nifti(path: Path) -> bool:
    with open(path, "rb") as f:
        return _nifti_header(f.read(540)) is not None


# --------------------------------------------------------------------------- CT plausibility


def check_ct(image: sitk.Image, path_label: str = "") -> None:
    """Raise :class:`InputError` unless ``image`` is plausibly a CT volume in Hounsfield units.

    The thresholds and models assume HU; an MR or a normalised image would run to completion and
    produce nonsense, so catch it here with a message that says why. Percentiles come from a strided
    sample (~1e6 voxels), so a 512x512x900 volume is checked in well under a second.
    """
    label = path_label or "image"
    _check_3d_scalar(image, label)
    _check_size(image, label)
    _check_spacing(image, label)
    voxels = sitk.GetArrayViewFromImage(image)
    _check_finite(voxels, label)
    low, high = float(voxels.min()), float(voxels.max())
    if low < HU_LIMITS[0] or high > HU_LIMITS[1]:
        raise InputError(f"{label}: values range {low:g}..{high:g}, outside the 16-bit range {HU_LIMITS[0]:g}..{HU_LIMITS[1]:g} of CT in Hounsfield units")
    air, median = np.percentile(_sample(voxels), [AIR_PERCENTILE, 50.0])
    if air > AIR_MAX_HU:
        raise InputError(f"{label}: no air in the image (the {AIR_PERCENTILE}th percentile is {air:g}, a CT in Hounsfield units has air near -1000); is it an MR, or a CT stored without its rescale to HU?")
    if median > MAX_MEDIAN_HU:
        raise InputError(f"{label}: median value {median:g} is above {MAX_MEDIAN_HU:g}; expected a CT in Hounsfield units (soft tissue near 40, air -1000)")


def _check_size(image: sitk.Image, label: str) -> None:
    """Reject volumes too small for the networks (orientation-independent: sorted axis lengths)."""
    shortest, middle, _ = sorted(image.GetSize())
    if shortest < MIN_SLICES or middle < MIN_IN_PLANE:
        raise InputError(f"{label}: volume of size {image.GetSize()} is too small to segment; need at least {MIN_SLICES} slices and {MIN_IN_PLANE}x{MIN_IN_PLANE} voxels in-plane")


def _check_spacing(image: sitk.Image, label: str) -> None:
    """Reject voxel sizes no CT has: usually a header written in metres or with a unit lost."""
    low, high = SPACING_LIMITS_MM
    spacing = " x ".join(f"{s:g}" for s in image.GetSpacing())
    if not all(s > 0 for s in image.GetSpacing()):
        raise InputError(f"{label}: voxel spacing {spacing} mm, and a voxel size must be above 0; fix the header")
    if not all(low <= s <= high for s in image.GetSpacing()):
        raise InputError(f"{label}: voxel spacing {spacing} mm is outside {low:g}..{high:g} mm, which no CT has; "
                         f"check the header's units (metres instead of millimetres?)")


def _check_finite(voxels: np.ndarray, label: str) -> None:
    """Reject NaN/Inf: one float64 sum is a fast test; count the culprits only when it fails."""
    if not np.issubdtype(voxels.dtype, np.floating) or np.isfinite(voxels.sum(dtype=np.float64)):
        return
    bad = int(np.count_nonzero(~np.isfinite(voxels)))
    if bad:
        raise InputError(_non_finite_message(label, bad, voxels.size))


def _non_finite_message(label: str, bad: int, total: int) -> str:
    if bad == total:
        return f"{label}: every voxel is NaN or infinite: the file holds no image (a failed export or conversion?)"
    return f"{label}: {bad} voxel(s) are NaN or infinite; expected finite Hounsfield values"


def _sample(voxels: np.ndarray) -> np.ndarray:
    """About :data:`_PERCENTILE_SAMPLES` voxels, strided over the flat array.

    The stride is made coprime with the row and slice lengths so the sample does not keep hitting
    the same column (e.g. a stride of 512 would sample one column of a 512-wide image).
    """
    flat = voxels.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLES)
    rows, plane = voxels.shape[-1], voxels.shape[-1] * voxels.shape[-2]
    while step > 1 and (math.gcd(step, rows) != 1 or math.gcd(step, plane) != 1):
        step += 1
    return flat[::step]


def read_ct(path: PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a CT volume and check it is plausible CT in HU; the pixel type is kept (casting is the caller's job)."""
    image = read_image(path, series_uid)
    check_ct(image, str(path))
    return image


# --------------------------------------------------------------------------- orientation


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Permute/flip ``image`` (no resampling) so its array axes run x=Left, y=Posterior, z=Superior.

    For an axis-aligned image the direction becomes the identity and every voxel keeps its physical
    position. An oblique image (e.g. gantry tilt) gets the nearest permutation/flip and keeps the
    residual rotation in its direction: the array axes are then only approximately L, P, S, which
    is what the pipeline needs, and no interpolation blurs the data.
    """
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def from_canonical(canonical: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Bring an image computed on ``to_canonical(reference)``'s grid back onto ``reference``'s grid.

    The output has reference's size, spacing, origin and direction bit-for-bit (copied, not
    recomputed), so it overlays the original scan exactly. A canonical image whose size or spacing
    does not belong to ``reference`` raises ValueError: that is a programming error, not user input.
    """
    back = _reorient_like(canonical, reference)
    if not np.allclose(back.GetSpacing(), reference.GetSpacing(), rtol=1e-5, atol=0.0):
        raise ValueError(f"from_canonical: spacing {canonical.GetSpacing()} is not the canonical spacing of the reference (reference spacing {reference.GetSpacing()})")
    back.CopyInformation(reference)
    return back


def array_to_reference(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a canonical ``[z, y, x]`` array (e.g. a label map) as an image on ``reference``'s grid.

    The array must have the shape of ``sitk.GetArrayFromImage(to_canonical(reference))``; boolean
    masks become uint8 because SimpleITK has no boolean pixel type.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim != 3:
        raise ValueError(f"array_to_reference: expected a 3D [z, y, x] array, got shape {array.shape}")
    back = _reorient_like(sitk.GetImageFromArray(array), reference)
    back.CopyInformation(reference)
    return back


def _reorient_like(canonical: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Undo :func:`to_canonical`'s permutation/flips, decided by orientation codes only.

    The direction is set to the identity first so the inverse permutation depends only on the
    reference's orientation code, never on the tie-breaking of a nearly 45-degree oblique matrix.
    """
    work = sitk.Image(canonical)
    work.SetDirection(_IDENTITY)
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())
    back = sitk.DICOMOrient(work, code)
    if back.GetSize() != reference.GetSize():
        raise ValueError(f"canonical image/array of size {canonical.GetSize()} (x, y, z) is not on the canonical grid of the reference (reference size {reference.GetSize()}, orientation {code})")
    return back


# --------------------------------------------------------------------------- writing


def write_image(image: sitk.Image, path: PathLike, overwrite: bool = False) -> Path:
    """Write ``image`` atomically to ``path`` and return the path.

    The data goes to a hidden temp file in the same folder (same extension, so SimpleITK picks the
    same format) and is read back before it takes the real name (:func:`atomic_write`): ITK's NIfTI
    writer reports a short write (a full disk) only on the console and returns as if it had
    succeeded. An existing file is refused unless ``overwrite``.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise InputError(f"{path}: cannot write this format; use one of {', '.join(WRITE_SUFFIXES)}")

    def write(temp: Path) -> None:
        try:
            sitk.WriteImage(image, str(temp), useCompression=suffix in _COMPRESSED_SUFFIXES)
        except RuntimeError as error:  # the reason names the temp file: show the user's name instead
            reason = _itk_message(error).replace(str(temp), str(path))
            raise InputError(f"{path}: cannot write the output: {reason}") from None

    return atomic_write(path, suffix, overwrite, write, lambda temp: _image_file_problem(temp, image))


def _image_file_problem(written: Path, image: sitk.Image) -> str | None:
    """What is wrong with an image file just written, found by reading it back; None if nothing."""
    try:
        if _suffix(written) in (".nii", ".nii.gz"):  # ITK's reader would zero-fill a short file
            header, present, _ = _nifti_contents(written)
            if header is None:
                return "the written file has no complete NIfTI header"
            if present < header.data_bytes:
                return f"only {header.offset + present} of {header.offset + header.data_bytes} bytes reached the disk"
        back = sitk.ReadImage(str(written))
    except RuntimeError as error:
        return f"the written file cannot be read back ({_itk_message(error)})"
    if back.GetSize() != image.GetSize() or not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)):
        return "the file read back holds other voxels than were written"
    return None


def write_json(data: Any, path: PathLike, overwrite: bool = False) -> Path:
    """Write ``data`` as indented JSON, atomically like :func:`write_image`.

    NaN/Infinity are refused (ValueError): they are not JSON and other tools reject them.
    """
    return write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", path, overwrite)


def write_text(text: str, path: PathLike, overwrite: bool = False) -> Path:
    """Write UTF-8 text atomically like :func:`write_image`; its size on disk is checked before the rename."""
    path = Path(path)
    data = text.encode("utf-8")
    return atomic_write(path, path.suffix, overwrite, lambda temp: temp.write_bytes(data),
                        lambda temp: _size_problem(temp, len(data)))


def _size_problem(written: Path, expected_bytes: int) -> str | None:
    actual = written.stat().st_size
    return None if actual == expected_bytes else f"only {actual} of {expected_bytes} bytes reached the disk"


def atomic_write(path: Path, suffix: str, overwrite: bool, write: Callable[[Path], None],
                 problem: Callable[[Path], str | None] = lambda written: None) -> Path:
    """Run ``write`` on a temp file next to ``path``, check it, then give it the name ``path``.

    * The temp file is flushed to the disk and ``problem(temp)`` reads it back (None: all there),
      so a short write (a full disk, a quota) is an error, never a truncated file at ``path``.
    * Without ``overwrite`` the file takes the name only if the name is free at that instant
      (:func:`_claim_name`): of two writers racing for one new output, one wins, the other is refused.
    * The temp file keeps ``suffix`` (writers choose the format by the file name) and names this
      machine and process, so that a later write of ``path`` can remove what a killed run left
      (:func:`remove_stale_partials`). A crash never leaves a partial file under the real name.
    """
    _check_output_name(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{path}: cannot create the output folder {path.parent} ({error.strerror or error}); is a file in the way, or the location read-only?") from None
    remove_stale_partials(path, suffix)
    temp = path.with_name(f".{_stem(path, suffix)}.partial-{_MACHINE}-{os.getpid()}-{secrets.token_hex(6)}{suffix}")
    try:
        write(temp)
        _flush_to_disk(temp)
        found = _read_back(temp, problem)
        if found:
            raise InputError(f"{path}: cannot write the output: {found} (is the disk full?)")
        if overwrite:
            os.replace(temp, path)
        else:
            _claim_name(temp, path)
    except OSError as error:
        raise InputError(f"{path}: cannot write the output: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    return path


def _read_back(written: Path, problem: Callable[[Path], str | None]) -> str | None:
    try:
        return problem(written)
    except Exception as error:  # whatever a reader raises on the file, the file is not what was meant
        return f"the written file cannot be read back ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"


def _check_output_name(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name for the output")
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: not a regular file (a pipe or device); give a file name for the output")
    if path.exists() and not overwrite:
        raise _exists(path)


def _exists(path: Path) -> InputError:
    return InputError(f"{path}: output file already exists; choose another name or allow overwriting", option="overwrite")


def _stem(path: Path, suffix: str) -> str:
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _flush_to_disk(path: Path) -> None:
    """fsync, so that a write the disk refuses late (delayed allocation on a full disk) fails here."""
    fd = os.open(path, os.O_RDWR)  # Windows flushes only handles open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _claim_name(temp: Path, path: Path) -> None:
    """Give ``temp`` the name ``path`` unless a file has it, in one step: no check-then-rename race."""
    try:
        os.link(temp, path)  # refused if the name is taken at this instant; the caller removes temp
        return
    except FileExistsError:
        raise _exists(path) from None
    except OSError:
        pass  # a file system without hard links (FAT, some network shares): claim the name instead
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        raise _exists(path) from None
    try:
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):  # the empty claim is ours: leave no empty file behind
            path.unlink()
        raise


_MACHINE = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:32] or "machine"
"""This machine's name in temp file names: a process id means something only on its own machine."""


def remove_stale_partials(path: Path, suffix: str) -> None:
    """Delete the temp files of ``path`` that killed runs on this machine left behind.

    A temp file is stale when the process named in it is gone. Those of a live writer (a concurrent
    run) or of another machine (a shared folder) are kept, as is everything on Windows, which has
    no harmless way to ask whether a process runs.
    """
    if os.name == "nt":
        return
    stem = _stem(path, suffix)
    ours = re.compile(rf"\.{re.escape(stem)}\.partial-{re.escape(_MACHINE)}-(\d+)-[0-9a-f]{{12}}{re.escape(suffix)}")
    for candidate in path.parent.glob(f".{glob.escape(stem)}.partial-*"):
        match = ours.fullmatch(candidate.name)
        if match and not _process_runs(int(match[1])):
            with contextlib.suppress(OSError):
                candidate.unlink()


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def check_writable_folder(folder: Path) -> None:
    """Refuse, before any long work, a folder where no output can be written: a file in its place,
    a read-only location, no permission. A folder not made yet is tried where it would be made."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{folder}: cannot create the output folder ({existing} is a file)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"{folder}: cannot write in {existing} ({error.strerror or error}); is the location read-only?") from None


def check_targets(outputs: Iterable[PathLike], inputs: Iterable[PathLike], overwrite: bool) -> None:
    """Everything about the outputs that can be known before the work: none is an input, none
    exists unless overwriting is allowed, and their folders can be written."""
    outputs = [Path(p) for p in outputs]
    check_outputs_apart(outputs, inputs)
    for path in outputs:
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists; allow overwriting to replace it", option="overwrite")
    for folder in dict.fromkeys(path.parent for path in outputs):
        check_writable_folder(folder)


def check_outputs_apart(outputs: Iterable[PathLike], inputs: Iterable[PathLike]) -> None:
    """Refuse, whatever the flags, an output that is one of the inputs (by path, link or hard link)
    or lands directly in an input folder, which is read as one scan (a DICOM series, a folder of
    one volume): nothing the user gave is replaced, or changed before it is read again."""
    files, folders, inodes = {}, {}, {}
    for source in map(Path, inputs):
        if source.is_dir():
            folders[source.resolve()] = source
        else:
            files[source.resolve()] = source
            with contextlib.suppress(OSError):
                inodes[_inode(source)] = source
    for output in map(Path, outputs):
        where = output.resolve()
        same = files.get(where) or (inodes.get(_inode(output)) if output.is_file() else None)
        if same is not None:
            raise InputError(f"{output}: would replace the input {same}; an input is never replaced, whatever the "
                             f"options: write the output to another file")
        if where.parent in folders:
            raise InputError(f"{output}: lies in the input folder {folders[where.parent]}, which is read as one scan; "
                             f"write the output elsewhere")


def _inode(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino

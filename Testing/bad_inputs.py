"""What a hospital user or an attacker hands the tool, each case made in a folder, with the outcome
it must get: the exit status and a fragment of the one line the command ends with.

Shared by Testing/test_bad_inputs.py (the specification) and Testing/bad_input_table.py (the table
in docs/bad-inputs.md), so the table shows exactly what the tests check. Besides its own outcome,
every case must change no file that was there before the command and leave no new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional
from unittest import mock

import numpy as np
import pydicom
import SimpleITK as sitk

from adversity import file_size_limit, release_readers
from dicom_series import write_series
from LiverTumorDARNLib.phantom import generate_case

Make = Callable[[Path, Path], "list[str]"]
"""Writes a case into a folder (given the weights folder to use) and returns the command line."""


@dataclasses.dataclass
class BadInput:
    name: str
    make: Make
    expected: str  # a fragment of the last line the command prints (stderr on failure, else stdout)
    exit_status: int = 2
    patches: dict = dataclasses.field(default_factory=dict)  # "module.attribute" -> replacement
    file_size_limit: Optional[int] = None  # bytes a file may grow to while the command runs (a full disk)


# --------------------------------------------------------------------------- commands


def segment(make_input: Callable[[Path], Path], output: str = "out/labels.nii.gz", *options: str,
            weights: Optional[Callable[[Path, Path], Path]] = None) -> Make:
    """`livertumordarn segment INPUT -o OUTPUT` on what ``make_input`` writes; ``weights`` may make a
    weights folder of its own from the given one. OUTPUT is relative to the case's folder."""
    def make(folder: Path, models: Path) -> list[str]:
        source = make_input(folder)
        used = weights(folder, models) if weights else models
        return ["segment", str(source), "-o", str(folder / output), *options, "--models", str(used), "--device", "cpu"]
    return make


def evaluate(prediction: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Make:
    """`livertumordarn evaluate` of a phantom's truth against ``prediction(labels, ct)``, on its grid."""
    def make(folder: Path, models: Path) -> list[str]:
        case = generate_case(7, small=True)
        labels, ct = sitk.GetArrayFromImage(case.labels), sitk.GetArrayFromImage(case.image)
        truth, predicted = folder / "truth.nii.gz", folder / "prediction.nii.gz"
        sitk.WriteImage(case.labels, str(truth))
        image = sitk.GetImageFromArray(prediction(labels, ct))
        image.CopyInformation(case.labels)
        sitk.WriteImage(image, str(predicted))
        return ["evaluate", "--gt", str(truth), "--pred", str(predicted)]
    return make


def _refine_over_its_mask(folder: Path, models: Path) -> list[str]:
    case = generate_case(7, small=True)
    ct, mask = folder / "ct.nii.gz", folder / "mask.nii.gz"
    sitk.WriteImage(case.image, str(ct))
    sitk.WriteImage(case.labels, str(mask))
    return ["refine", str(ct), "--mask", str(mask), "-o", str(mask), "--overwrite", "--models", str(models), "--device", "cpu"]


def _batch_rerun_in_its_input_folder(folder: Path, models: Path) -> list[str]:
    """The second run of a batch whose output folder is its input folder."""
    from LiverTumorDARNLib.cli import main

    scans = folder / "scans"
    scans.mkdir()
    _ct(scans)
    command = ["segment", str(scans), "-o", str(scans), "--models", str(models), "--device", "cpu"]
    assert main(command) == 0
    return command


def _batch_of(make_input: Callable[[Path], Path]) -> Make:
    """`livertumordarn segment scans -o out` of a folder holding what ``make_input`` writes."""
    def make(folder: Path, models: Path) -> list[str]:
        (folder / "scans").mkdir()
        make_input(folder / "scans")
        return ["segment", str(folder / "scans"), "-o", str(folder / "out"), "--models", str(models), "--device", "cpu"]
    return make


# --------------------------------------------------------------------------- inputs


def _ct(folder: Path, name: str = "ct.nii.gz") -> Path:
    path = folder / name
    sitk.WriteImage(generate_case(7, small=True).image, str(path))
    return path


def _array(folder: Path, array: np.ndarray, name: str = "ct.nii.gz", vector: bool = False) -> Path:
    path = folder / name
    image = sitk.GetImageFromArray(array, isVector=vector)
    sitk.WriteImage(image, str(path))
    return path


def _body(shape=(40, 64, 64), inside=40.0, outside=-1000.0) -> np.ndarray:
    array = np.full(shape, outside, np.float32)
    array[:, 16:48, 16:48] = inside
    return array


def _truncated(folder: Path) -> Path:
    path = _ct(folder)
    path.write_bytes(path.read_bytes()[:3000])
    return path


def _uncompressed_named_gz(folder: Path) -> Path:
    path = _ct(folder, "ct.nii")
    return path.rename(folder / "ct.nii.gz")


def _with_voxel(value: float, name: str = "ct.nrrd") -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        array = _body()
        array[5, 30, 30] = value
        return _array(folder, array, name)
    return make


def _spacing_in_metres(folder: Path) -> Path:
    image = generate_case(7, small=True).image
    image.SetSpacing([s / 1000 for s in image.GetSpacing()])
    path = folder / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _zero_slice_thickness(folder: Path) -> Path:
    """pixdim[3] = 0 in the header of an uncompressed NIfTI-1 file (ITK reads it as 1 mm)."""
    path = _ct(folder, "ct.nii")
    data = bytearray(path.read_bytes())
    data[88:92] = np.float32(0).tobytes()
    path.write_bytes(bytes(data))
    return path


def _pipe(folder: Path) -> Path:
    path = folder / "ct.nii.gz"
    os.mkfifo(path)
    release_readers(path)  # should a reader open it after all, the case fails instead of hanging
    return path


def _device(folder: Path) -> Path:
    path = folder / "ct.nii"
    path.symlink_to("/dev/zero")
    return path


def _dicom(edit: Callable[[list[Path]], None] = lambda files: None, **quirks) -> Callable[[Path], Path]:
    """A small CT series; ``edit`` changes its files, listed in stacking order."""
    def make(folder: Path) -> Path:
        write_series(folder / "dicom", _body(shape=(24, 48, 48)).astype(float), file_order="sorted", **quirks)
        edit(sorted((folder / "dicom").iterdir()))
        return folder / "dicom"
    return make


def _edit_slices(change: Callable[[pydicom.Dataset], None], *positions: int) -> Callable[[list[Path]], None]:
    def edit(files: list[Path]) -> None:
        for path in [files[p] for p in positions] if positions else files:
            dataset = pydicom.dcmread(path)
            change(dataset)
            dataset.save_as(path)
    return edit


def _shrink(dataset: pydicom.Dataset) -> None:
    dataset.Rows, dataset.Columns = 32, 32
    dataset.PixelData = np.zeros((32, 32), "<i2").tobytes()


def _cut_off(position: int, keep_bytes: int) -> Callable[[list[Path]], None]:
    def edit(files: list[Path]) -> None:
        files[position].write_bytes(files[position].read_bytes()[:keep_bytes])
    return edit


def _two_phases(folder: Path) -> Path:
    body = _body(shape=(24, 48, 48)).astype(float)
    write_series(folder / "dicom", body, description="arterial")
    write_series(folder / "dicom", body, description="venous", prefix="V")
    return folder / "dicom"


def _ct_and_an_earlier_output(folder: Path) -> Path:
    (folder / "out").mkdir()
    (folder / "out" / "labels.nii.gz").write_bytes(b"the user's earlier result")
    return _ct(folder)


def _ct_under_a_file(folder: Path) -> Path:
    (folder / "a-file").write_text("a file where the output folder should be")
    return _ct(folder)


# --------------------------------------------------------------------------- weights


def _tampered_weights(change: Callable[[dict, Path], None]) -> Callable[[Path, Path], Path]:
    """A copy of the weights folder whose tumor entry (or file) ``change(entry, folder)`` alters."""
    def make(folder: Path, models: Path) -> Path:
        copy = shutil.copytree(models, folder / "models")
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest["models"]["tumor"], copy)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy
    return make


def _changed_bytes(entry: dict, models: Path) -> None:
    weights = models / entry["file"]
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")


def _moved_outside(entry: dict, models: Path) -> None:
    """The true weights, checksum and all, moved out of the folder the user handed over."""
    (models.parent / "outside").mkdir()
    shutil.move(str(models / entry["file"]), str(models.parent / "outside" / entry["file"]))
    entry["file"] = f"../outside/{entry['file']}"


def _empty_with_its_checksum(entry: dict, models: Path) -> None:
    (models / entry["file"]).write_bytes(b"")
    entry["sha256"] = hashlib.sha256(b"").hexdigest()


# --------------------------------------------------------------------------- patches


def _interrupt_mid_write(image, path, *args, **kwargs):
    """SimpleITK's writer cut off by Ctrl-C after half a file."""
    Path(path).write_bytes(b"half a file")
    raise KeyboardInterrupt


def _must_not_segment(*args, **kwargs):
    raise AssertionError("the network ran before a check that needs none")


def _permission_denied(self):
    raise PermissionError(errno.EACCES, "Permission denied", str(self))


BAD_INPUTS = [
    # the scan
    BadInput("missing path", segment(lambda folder: folder / "no-such-scan.nii.gz"), "no such file or folder"),
    BadInput("folder without any image", segment(lambda folder: folder), "no DICOM series and no image file"),
    BadInput("truncated NIfTI file", segment(_truncated), "truncated"),
    BadInput("uncompressed NIfTI named .nii.gz", segment(_uncompressed_named_gz), "rename it to .nii"),
    BadInput("2D image", segment(lambda folder: _array(folder, _body()[0], "slice.nrrd")), "expected a 3D volume"),
    BadInput("4D image (time series)", segment(lambda folder: _array(folder, np.stack([_body()[:20]] * 2), "cine.nrrd")),
             "expected a 3D volume"),
    BadInput("RGB image", segment(lambda folder: _array(folder, np.zeros((40, 64, 64, 3), np.uint8), "rgb.nrrd", vector=True)),
             "expected one scalar value per voxel"),
    BadInput("MR-like intensities (no air)", segment(lambda folder: _array(folder, _body(inside=400.0, outside=0.0))),
             "no air in the image"),
    BadInput("NaN voxels", segment(_with_voxel(float("nan"))), "NaN or infinite"),
    BadInput("Inf voxels", segment(_with_voxel(float("inf"))), "NaN or infinite"),
    BadInput("NaN voxels in a NIfTI file (ITK reads them as 0)", segment(_with_voxel(float("nan"), "ct.nii.gz")),
             "1 voxel(s) are NaN or infinite"),
    BadInput("volume of NaN only", segment(lambda folder: _array(folder, np.full((40, 64, 64), np.nan, np.float32))),
             "every voxel is NaN or infinite"),
    BadInput("8 slices", segment(lambda folder: _array(folder, _body(shape=(8, 64, 64)))), "too small to segment"),
    BadInput("spacing in metres", segment(_spacing_in_metres), "no CT has"),
    BadInput("NIfTI slice thickness 0 (ITK reads 1 mm)", segment(_zero_slice_thickness), "fix the header's pixdim"),
    BadInput("named pipe (FIFO) named like a volume", segment(_pipe), "not a regular file"),
    BadInput("device named like a volume", segment(_device), "not a regular file"),
    # DICOM
    BadInput("DICOM with gantry tilt", segment(_dicom(tilt_degrees=12.0)), "gantry tilt of 12.0 degrees"),
    BadInput("DICOM with a missing slice", segment(_dicom(skip_slices=(9,))), "uneven slice spacing"),
    BadInput("DICOM folder of an MR series", segment(_dicom(modality="MR")), "no axial CT series"),
    BadInput("DICOM slice without ImagePositionPatient",
             segment(_dicom(_edit_slices(lambda slice_: delattr(slice_, "ImagePositionPatient"), 3))),
             "IM0003.dcm: the slice has no valid ImagePositionPatient"),
    BadInput("DICOM PixelSpacing 0\\0 (GDCM reads 1 mm)",
             segment(_dicom(_edit_slices(lambda slice_: setattr(slice_, "PixelSpacing", [0, 0])))), "is not a pixel size"),
    BadInput("DICOM slices of two image sizes", segment(_dicom(_edit_slices(_shrink, 5))), "IM0005.dcm is 32x32"),
    BadInput("DICOM slice file cut off", segment(_dicom(_cut_off(9, 1000))), "IM0009.dcm cannot be read as a slice"),
    BadInput("DICOM slice file empty (0 bytes)", segment(_dicom(_cut_off(0, 0))), "IM0000.dcm is empty"),
    BadInput("two CT series with as many slices", segment(_two_phases), "choose one by its series UID (--series-uid)"),
    BadInput("volume too large for the memory left", segment(_ct), "GB of memory",
             patches={"LiverTumorDARNLib.pipeline.available_memory_bytes": lambda: 100e6}),
    # the output
    BadInput("output exists", segment(_ct_and_an_earlier_output), "allow overwriting to replace it (--overwrite)"),
    BadInput("output is the input, with --overwrite", segment(_ct, "ct.nii.gz", "--overwrite"), "an input is never replaced"),
    BadInput("output inside the DICOM input folder", segment(_dicom(), "dicom/labels.nii.gz"), "lies in the input folder"),
    BadInput("output folder cannot be made (checked before the work)", segment(_ct_under_a_file, "a-file/labels.nii.gz"),
             "cannot create the output folder", patches={"LiverTumorDARNLib.segmenter.segment": _must_not_segment}),
    BadInput("output format unknown", segment(_ct, "out/labels.png"), "cannot tell the output format"),
    BadInput("DICOM SEG asked for a NIfTI input", segment(_ct, "out/seg.dcm"), "needs a DICOM series folder"),
    BadInput("disk full while the output is written", segment(_ct, "out/labels.nii"), "cannot write the output: only",
             file_size_limit=65536),
    BadInput("Ctrl-C while the output is written", segment(_ct), "interrupted", exit_status=130,
             patches={"SimpleITK.WriteImage": _interrupt_mid_write}),
    # the weights
    BadInput("weights whose checksum does not match", segment(_ct, weights=_tampered_weights(_changed_bytes)),
             "checksum mismatch"),
    BadInput("manifest naming weights outside its folder", segment(_ct, weights=_tampered_weights(_moved_outside)),
             "lies outside the models folder"),
    BadInput("manifest entry without sha256",
             segment(_ct, weights=_tampered_weights(lambda entry, models: entry.pop("sha256"))), "needs a \"file\" and its \"sha256\""),
    BadInput("empty weights file with its true checksum", segment(_ct, weights=_tampered_weights(_empty_with_its_checksum)),
             "weights file is empty"),
    # batches, refinement, evaluation
    BadInput("batch input folder the user may not read", _batch_of(_ct), "Permission denied",
             patches={"pathlib.Path.iterdir": _permission_denied}),
    BadInput("batch into its own input folder, run again", _batch_rerun_in_its_input_folder, "1 of 1 cases segmented",
             exit_status=0),
    BadInput("refine writing over its own mask", _refine_over_its_mask, "an input is never replaced"),
    BadInput("evaluate a prediction holding label 7", evaluate(lambda labels, ct: np.where(labels == 2, 7, labels)),
             "found 0, 1, 7"),
    BadInput("evaluate a prediction of 0.5, 1.5, 2.5", evaluate(lambda labels, ct: labels + np.float32(0.5)),
             "found 0.5, 1.5, 2.5"),
    BadInput("evaluate the CT as the prediction", evaluate(lambda labels, ct: ct), "a label map holds 0 background"),
]


@dataclasses.dataclass
class Outcome:
    exit_status: int
    message: str  # the last line on stderr (progress bars come before it) on failure, else on stdout
    changed: list[str]  # files there before the command that it changed or removed
    created: list[str]  # files the command left that were not there before


def run(bad: BadInput, folder: Path, models_dir: Path) -> Outcome:
    """Make the case in ``folder`` and run its command in-process."""
    from LiverTumorDARNLib.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        argv = bad.make(folder, models_dir)
    before = _files(folder)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        for target, replacement in bad.patches.items():
            stack.enter_context(mock.patch(target, replacement))
        stack.enter_context(contextlib.redirect_stderr(stderr))
        stack.enter_context(contextlib.redirect_stdout(stdout))
        if bad.file_size_limit is not None:
            stack.enter_context(file_size_limit(bad.file_size_limit))
        status = main(argv)
    after = _files(folder)
    return Outcome(status, _last_line(stderr.getvalue() if status else stdout.getvalue()),
                   sorted(name for name in before if after.get(name) != before[name]),
                   sorted(set(after) - set(before)))


def _files(folder: Path) -> dict[str, str]:
    """Every regular file under ``folder`` (pipes and devices are not read) and a digest of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in folder.rglob("*") if path.is_file()}


def _last_line(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # progress bars' cursor moves
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""

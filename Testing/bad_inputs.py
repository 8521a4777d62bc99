"""The bad inputs a hospital hands the tool, each made in a folder, with the outcome it must get.

Shared by Testing/test_bad_inputs.py (the specification) and tools/bad_input_table.py (the table
in the README), so the table shows exactly what the tests check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import SimpleITK as sitk

from dicom_series import write_series
from LiverTumorDARNLib.phantom import generate_case


@dataclasses.dataclass
class BadInput:
    name: str
    make: Callable[[Path], Path]  # writes the input into the folder, returns what to segment
    expected: str  # a fragment of the one-line message
    exit_status: int = 2
    output_name: str = "labels.nii.gz"
    patches: dict = dataclasses.field(default_factory=dict)  # "module.attribute" -> replacement
    keeps_output: bytes | None = None  # an output that exists before the run and must survive it


def _ct(folder: Path) -> Path:
    path = folder / "ct.nii.gz"
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


def _with_voxel(value: float) -> Callable[[Path], Path]:
    """NRRD, because ITK's NIfTI reader turns NaN into 0 before the check could see it."""
    def make(folder: Path) -> Path:
        array = _body()
        array[5, 30, 30] = value
        return _array(folder, array, "ct.nrrd")
    return make


def _spacing_in_metres(folder: Path) -> Path:
    image = generate_case(7, small=True).image
    image.SetSpacing([s / 1000 for s in image.GetSpacing()])
    path = folder / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _dicom(**quirks) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        write_series(folder / "dicom", _body(shape=(24, 48, 48)).astype(float), **quirks)
        return folder / "dicom"
    return make


def _corrupt_weights(folder: Path) -> Path:
    from LiverTumorDARNLib.weights import bundled_models_dir

    models = folder / "models"
    models.mkdir()
    for path in bundled_models_dir().iterdir():
        (models / path.name).write_bytes(path.read_bytes())
    weights = models / "darn-tumor.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    return _ct(folder)


def _ct_under_a_file(folder: Path) -> Path:
    (folder / "a-file").write_text("a file where the output folder should be")
    return _ct(folder)


def _interrupt_mid_write(image, path, *args, **kwargs):
    """SimpleITK's writer cut off by Ctrl-C after half a file."""
    Path(path).write_bytes(b"half a file")
    raise KeyboardInterrupt


BAD_INPUTS = [
    BadInput("missing path", lambda folder: folder / "no-such-scan.nii.gz", "no such file or folder"),
    BadInput("folder without any image", lambda folder: folder, "no DICOM series and no image file"),
    BadInput("truncated NIfTI file", _truncated, "truncated"),
    BadInput("2D image", lambda folder: _array(folder, _body()[0], "slice.nrrd"), "expected a 3D volume"),
    BadInput("4D image (time series)", lambda folder: _array(folder, np.stack([_body()[:20]] * 2), "cine.nrrd"),
             "expected a 3D volume"),
    BadInput("RGB image", lambda folder: _array(folder, np.zeros((40, 64, 64, 3), np.uint8), "rgb.nrrd", vector=True),
             "expected one scalar value per voxel"),
    BadInput("MR-like intensities (no air)", lambda folder: _array(folder, _body(inside=400.0, outside=0.0)),
             "no air in the image"),
    BadInput("NaN voxels", _with_voxel(float("nan")), "NaN or infinite"),
    BadInput("Inf voxels", _with_voxel(float("inf")), "NaN or infinite"),
    BadInput("8 slices", lambda folder: _array(folder, _body(shape=(8, 64, 64))), "too small to segment"),
    BadInput("spacing in metres", _spacing_in_metres, "no CT has"),
    BadInput("DICOM with gantry tilt", _dicom(tilt_degrees=12.0), "gantry tilt of 12.0 degrees"),
    BadInput("DICOM with a missing slice", _dicom(skip_slices=(9,)), "uneven slice spacing"),
    BadInput("DICOM folder of an MR series", _dicom(modality="MR"), "no axial CT series"),
    BadInput("volume too large for the memory left", _ct, "GB of memory",
             patches={"LiverTumorDARNLib.pipeline.available_memory_bytes": lambda: 100e6}),
    BadInput("output exists", _ct, "allow overwriting to replace it (--overwrite)", keeps_output=b"the user's earlier result"),
    BadInput("output folder not writable", _ct_under_a_file, "cannot create the output folder",
             output_name="a-file/labels.nii.gz"),
    BadInput("output format unknown", _ct, "cannot tell the output format", output_name="labels.png"),
    BadInput("DICOM SEG asked for a NIfTI input", _ct, "needs a DICOM series folder", output_name="seg.dcm"),
    BadInput("weights whose checksum does not match", _corrupt_weights, "checksum mismatch"),
    BadInput("Ctrl-C while the output is written", _ct, "interrupted", exit_status=130,
             patches={"SimpleITK.WriteImage": _interrupt_mid_write}),
]


@dataclasses.dataclass
class Outcome:
    exit_status: int
    message: str  # the last line on stderr (progress bars come before it)
    output: Path


def run(bad: BadInput, folder: Path, models_dir: Path) -> Outcome:
    """Make the bad input in ``folder`` and run ``livertumordarn segment`` on it in-process."""
    from LiverTumorDARNLib.cli import main

    source = bad.make(folder)
    output = folder / "out" / bad.output_name if "a-file" not in bad.output_name else folder / bad.output_name
    if bad.keeps_output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(bad.keeps_output)
    models = folder / "models" if (folder / "models").is_dir() else models_dir
    stderr = io.StringIO()
    with contextlib.ExitStack() as stack:
        for target, replacement in bad.patches.items():
            stack.enter_context(mock.patch(target, replacement))
        stack.enter_context(contextlib.redirect_stderr(stderr))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        status = main(["segment", str(source), "-o", str(output), "--models", str(models), "--device", "cpu"])
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr.getvalue())  # progress bars' cursor moves
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return Outcome(status, lines[-1] if lines else "", output)

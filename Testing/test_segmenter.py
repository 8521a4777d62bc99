"""The public core API (``from LiverTumorDARNLib import Segmenter, segment_file, Refiner``): what
every door segments through, with tiny random weights (see conftest.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LiverTumorDARNLib import Refiner, Segmenter, segment_file
from LiverTumorDARNLib import segmenter as segmenter_module
from LiverTumorDARNLib.cli import main
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.labels import LIVER
from LiverTumorDARNLib.phantom import generate_case
from LiverTumorDARNLib.pipeline import tumor_confidences

CORE_DIR = Path(__file__).resolve().parents[1] / "LiverTumorDARN" / "LiverTumorDARNLib"
COMMAND_ONLY = {"cli.py", "phantom.py", *(f"training/{path.name}" for path in (CORE_DIR / "training").glob("*.py"))}
"""Core modules whose messages only their own command shows (cli; train; the phantom command's
file writer), so they may name its flags."""


def test_the_public_api_imports_from_the_package(tmp_path):
    done = subprocess.run([sys.executable, "-c", "from LiverTumorDARNLib import Segmenter, segment_file, Refiner"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert Refiner.__module__ == "LiverTumorDARNLib.refine"


def test_segment_file_writes_the_label_map_the_command_line_writes(ct_file, models_dir, tmp_path):
    assert main(["segment", str(ct_file), "-o", str(tmp_path / "cli.nii.gz"), "--models", str(models_dir),
                 "--device", "cpu"]) == 0
    result, report = segment_file(ct_file, tmp_path / "api.nii.gz", models_dir, "cpu")
    written = sitk.ReadImage(str(tmp_path / "api.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli.nii.gz"))))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(result.labels))
    assert report.liver_volume_ml > 0


def test_segment_file_refuses_an_existing_output_before_any_work_and_names_no_flag(ct_file, models_dir, tmp_path):
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"the user's file")
    with pytest.raises(InputError, match="exists; allow overwriting to replace it") as refusal:
        Segmenter(models_dir, "cpu").segment_file(ct_file, target)
    assert refusal.value.option == "overwrite" and "--" not in str(refusal.value)
    assert target.read_bytes() == b"the user's file"


def test_a_volume_that_is_not_ct_is_refused_under_the_name_it_is_given(models_dir):
    not_ct = sitk.Image(64, 64, 32, sitk.sitkInt16) + 300
    with pytest.raises(InputError, match=r"^Portal phase: no air in the image"):
        Segmenter(models_dir, "cpu").segment(not_ct, name="Portal phase")


def gpu_that_runs_out_of_memory(monkeypatch) -> list[str]:
    """Pretend the segmenter sits on a GPU that runs out of memory on every case; returns the
    devices the pipeline was called on."""
    calls = []
    segment = segmenter_module.segment

    def segment_on(image, liver, tumor, device, *args):
        calls.append(device.type)
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return segment(image, liver, tumor, device, *args)

    monkeypatch.setattr(segmenter_module, "segment", segment_on)
    return calls


def test_a_gpu_out_of_memory_finishes_the_case_on_the_cpu_and_stays_there(ct_file, models_dir, monkeypatch):
    ct = sitk.ReadImage(str(ct_file))
    expected = sitk.GetArrayFromImage(Segmenter(models_dir, "cpu").segment(ct).labels)
    calls = gpu_that_runs_out_of_memory(monkeypatch)
    messages = []
    segmenter = Segmenter(models_dir, "cpu", on_message=messages.append)
    segmenter.device = torch.device("cuda")  # as if "auto" had found a GPU

    result = segmenter.segment(ct)

    assert calls == ["cuda", "cpu"]
    assert messages == [segmenter_module.GPU_FALLBACK_MESSAGE]
    assert segmenter.device == torch.device("cpu")  # the next case does not try the GPU again
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels), expected)


def test_running_out_of_memory_on_the_cpu_is_not_hidden(ct_file, models_dir, monkeypatch):
    monkeypatch.setattr(segmenter_module, "segment", lambda *args: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("out")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Segmenter(models_dir, "cpu").segment(sitk.ReadImage(str(ct_file)))


def test_the_tumor_probabilities_show_which_tumors_a_confidence_floor_gives_back(models_dir):
    """What tools/calibrate_tumor_confidence.py relies on: one run without a floor, with its tumor
    probabilities, tells what every floor would have kept."""
    ct = generate_case(7, small=True).image
    unfloored = Segmenter(models_dir, "cpu", min_tumor_confidence=0.0).segment(ct, tumor_probability=True)
    floored = Segmenter(models_dir, "cpu", min_tumor_confidence=0.5).segment(ct)
    labels = sitk.GetArrayFromImage(unfloored.labels)
    components, confidence = tumor_confidences(labels, sitk.GetArrayFromImage(unfloored.tumor_probability))
    unsure = np.flatnonzero(confidence[1:] < 0.5) + 1
    assert len(unsure) > 0, "the tiny random network should mark tumors it is unsure of"
    labels[np.isin(components, unsure)] = LIVER
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(floored.labels))
    assert floored.tumor_probability is None


def _messages_of_input_errors(path: Path) -> list[str]:
    """The literal text of every InputError raised in a module's source."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InputError" and node.args:
            found += [part.value for part in ast.walk(node.args[0]) if isinstance(part, ast.Constant) and isinstance(part.value, str)]
    return found


@pytest.mark.parametrize("path", sorted(p for p in CORE_DIR.rglob("*.py") if p.relative_to(CORE_DIR).as_posix() not in COMMAND_ONLY),
                         ids=lambda p: p.relative_to(CORE_DIR).as_posix())
def test_core_messages_name_no_command_line_flag(path):
    """Slicer users read them too: a setting is named by InputError's ``option``, and the command
    line adds its flag."""
    flagged = [text for text in _messages_of_input_errors(path) if " --" in f" {text}"]
    assert not flagged, f"{path.name}: {flagged}"

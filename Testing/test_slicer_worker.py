"""The segmentation subprocess of the Slicer panel: JSON lines of named stages, the label map on
the CT's grid, one-line errors that name the volume. Runs as the panel runs it, in a separate
Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LiverTumorDARNLib.pipeline import load_stages, segment

pytestmark = pytest.mark.slow
MODULE_DIR = Path(__file__).resolve().parents[1] / "LiverTumorDARN"


def run_worker(*args) -> tuple[int, list[dict]]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "LiverTumorDARNSceneLib.worker", *map(str, args)],
                          capture_output=True, text=True, env=environment, timeout=300)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_the_worker_writes_the_pipelines_label_map_and_reports_named_stages(ct_file, models_dir, tmp_path):
    code, records = run_worker(ct_file, tmp_path / "labels.nrrd", "--models", models_dir, "--device", "cpu")
    assert code == 0
    assert {"liver", "tumor"} <= {r["stage"] for r in records if "stage" in r}
    assert records[-1]["stage"] == "done"
    ct = sitk.ReadImage(str(ct_file))
    expected = segment(ct, *load_stages(models_dir, torch.device("cpu")), torch.device("cpu")).labels
    written = sitk.ReadImage(str(tmp_path / "labels.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
    assert written.GetOrigin() == ct.GetOrigin() and written.GetDirection() == ct.GetDirection()


def test_a_ct_the_core_refuses_gives_one_error_record_naming_the_volume_and_status_2(models_dir, tmp_path):
    small = sitk.Image(8, 8, 8, sitk.sitkInt16)
    sitk.WriteImage(small, str(tmp_path / "ct.nrrd"))
    code, records = run_worker(tmp_path / "ct.nrrd", tmp_path / "labels.nrrd", "--models", models_dir, "--name", "CT 7")
    assert code == 2
    assert records == [{"error": "CT 7: volume of size (8, 8, 8) is too small to segment; "
                                 "need at least 16 slices and 32x32 voxels in-plane"}]
    assert not (tmp_path / "labels.nrrd").exists()


def test_the_worker_applies_the_confidence_floor_it_is_given(ct_file, models_dir, tmp_path):
    code, _ = run_worker(ct_file, tmp_path / "labels.nrrd", "--models", models_dir, "--device", "cpu",
                         "--min-tumor-confidence", "0.5")
    assert code == 0
    ct, cpu = sitk.ReadImage(str(ct_file)), torch.device("cpu")
    floored = sitk.GetArrayFromImage(segment(ct, *load_stages(models_dir, cpu, 0.5), cpu).labels)
    unfloored = sitk.GetArrayFromImage(segment(ct, *load_stages(models_dir, cpu), cpu).labels)
    assert (floored != unfloored).any()  # the tiny random network marks tumors it is unsure of
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nrrd"))), floored)

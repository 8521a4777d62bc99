"""Batch runs: every case in isolation, nothing lost when a case is corrupt or the run is cut off."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_series import write_series
from LiverTumorDARNLib import batch, segmenter
from LiverTumorDARNLib.cli import main
from LiverTumorDARNLib.io import write_image
from LiverTumorDARNLib.phantom import generate_case

pytestmark = pytest.mark.slow
GOOD = ("case-1", "case-2", "case-4", "case-5")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Five small CT files; case-3, in the middle, is truncated."""
    folder = tmp_path_factory.mktemp("inputs")
    for seed in (1, 2, 3, 4, 5):
        write_image(generate_case(seed, small=True).image, folder / f"case-{seed}.nii.gz")
    corrupt = folder / "case-3.nii.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:2000])
    return folder


@pytest.fixture(scope="module")
def expected_labels(inputs, models_dir, tmp_path_factory):
    """Each good case segmented on its own: what the batch must write."""
    out = tmp_path_factory.mktemp("single")
    labels = {}
    for case in GOOD:
        target = out / f"{case}.nii.gz"
        assert main(["segment", str(inputs / f"{case}.nii.gz"), "-o", str(target), "--models", str(models_dir)]) == 0
        labels[case] = sitk.GetArrayFromImage(sitk.ReadImage(str(target)))
    return labels


def summary(out_dir) -> dict[str, dict]:
    with open(out_dir / batch.SUMMARY_NAME, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def run_batch(inputs, out_dir, models_dir, *extra) -> int:
    return main(["segment", str(inputs), "-o", str(out_dir), "--models", str(models_dir), *extra])


def interrupt_at_case(monkeypatch, number: int) -> None:
    """Make the pipeline raise Ctrl-C when it is called for the ``number``-th time."""
    calls = {"count": 0}
    segment = segmenter.segment

    def segment_until_interrupted(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == number:
            raise KeyboardInterrupt
        return segment(*args, **kwargs)

    monkeypatch.setattr(segmenter, "segment", segment_until_interrupted)


def test_corrupt_case_is_reported_and_the_others_are_written(inputs, models_dir, expected_labels, tmp_path, capsys):
    assert run_batch(inputs, tmp_path, models_dir) == 1
    assert "1 case(s) failed, first case-3" in capsys.readouterr().err
    rows = summary(tmp_path)
    assert rows["case-3"]["status"] == "failed" and "truncated" in rows["case-3"]["message"]
    for case in GOOD:
        assert rows[case]["status"] in ("done", "no liver found")
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{case}_segmentation.nii.gz")))
        np.testing.assert_array_equal(written, expected_labels[case])
    assert not (tmp_path / "case-3_segmentation.nii.gz").exists()


def test_interrupted_run_resumes_without_redoing_finished_cases(inputs, models_dir, expected_labels, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at_case(patch, 3)  # cases 1, 2 and the corrupt 3 (never reaches the network) are behind
        assert run_batch(inputs, tmp_path, models_dir) == 130
    first_run = {case: os.stat(tmp_path / f"{case}_segmentation.nii.gz").st_mtime_ns for case in ("case-1", "case-2")}
    assert summary(tmp_path)["case-4"]["status"] == "running"

    assert run_batch(inputs, tmp_path, models_dir) == 1  # the corrupt case still fails
    rows = summary(tmp_path)
    for case in GOOD:
        assert rows[case]["status"] in ("done", "no liver found")
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{case}_segmentation.nii.gz")))
        np.testing.assert_array_equal(written, expected_labels[case])
    for case, mtime in first_run.items():
        assert os.stat(tmp_path / f"{case}_segmentation.nii.gz").st_mtime_ns == mtime  # written once
    assert rows["case-3"]["status"] == "failed"
    assert not list(tmp_path.glob(".*partial*"))


def test_torchrun_ranks_share_the_cases_and_all_finish_though_one_failed(inputs, models_dir, tmp_path):
    # rank 0 takes cases 1, 3 (corrupt, fails at once) and 5; rank 1 takes 2, 4 and 6 and is still
    # segmenting when rank 0 is done: torchrun would stop it if rank 0 left with its error first
    cases = tmp_path / "cases"
    shutil.copytree(inputs, cases)
    shutil.copy(cases / "case-2.nii.gz", cases / "case-6.nii.gz")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "LiverTumorDARNLib.cli", "segment", str(cases), "-o", str(tmp_path / "out"),
               "--models", str(models_dir), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0  # rank 0 had the corrupt case
    assert "2 of 3 cases segmented" in result.stdout and "3 of 3 cases segmented" in result.stdout
    rows = summary(tmp_path / "out")
    assert sorted(rows) == ["case-1", "case-2", "case-3", "case-4", "case-5", "case-6"]
    assert all(rows[case]["status"] in ("done", "no liver found") for case in (*GOOD, "case-6"))


def test_output_nobody_recorded_is_refused_and_kept(inputs, models_dir, tmp_path, capsys):
    foreign = tmp_path / "case-2_segmentation.nii.gz"
    foreign.write_bytes(b"made by the user")
    assert run_batch(inputs, tmp_path, models_dir) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert foreign.read_bytes() == b"made by the user"
    assert not (tmp_path / "case-1_segmentation.nii.gz").exists()


def test_unwritable_output_folder_fails_before_the_first_case(inputs, models_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_batch(inputs, blocker / "out", models_dir) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_inputs_with_the_same_case_name_are_refused(inputs, models_dir, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "case-1.nii.gz").write_bytes((inputs / "case-1.nii.gz").read_bytes())
    assert main(["segment", str(inputs / "case-1.nii.gz"), str(other / "case-1.nii.gz"),
                 "-o", str(tmp_path / "out"), "--models", str(models_dir)]) == 2
    assert "several inputs are named case-1" in capsys.readouterr().err


def test_series_uid_with_a_batch_is_refused(inputs, models_dir, tmp_path, capsys):
    assert run_batch(inputs, tmp_path / "out", models_dir, "--series-uid", "1.2.3") == 2
    assert "--series-uid" in capsys.readouterr().err


def test_folder_of_dicom_case_folders_is_a_batch_of_those_cases_naming_each_series(models_dir, tmp_path):
    hu = np.full((20, 40, 48), -1000.0)
    hu[:, 8:32, 8:40] = 60.0
    uids = {case: write_series(tmp_path / "cases" / case, hu) for case in ("patient-a", "patient-b")}
    assert run_batch(tmp_path / "cases", tmp_path / "out", models_dir) == 0
    assert {case: row["series_uid"] for case, row in summary(tmp_path / "out").items()} == uids

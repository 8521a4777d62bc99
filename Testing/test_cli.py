"""The command line: each subcommand's contract, and one-line errors instead of tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from LiverTumorDARNLib.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    assert main(["phantom", str(folder), "--n", "2", "--seed", "3", "--small"]) == 0
    return folder


def test_phantom_writes_lits_named_cases_and_a_manifest(dataset):
    names = sorted(path.name for path in dataset.iterdir())
    assert names == ["manifest.json", "segmentation-0.nii.gz", "segmentation-1.nii.gz",
                     "volume-0.nii.gz", "volume-1.nii.gz"]


def test_evaluate_json_of_a_perfect_prediction(dataset, capsys):
    assert main(["evaluate", "--gt", str(dataset), "--pred", str(dataset), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("dice_per_case", "dice_global", "voe", "rvd", "assd_mm", "mssd_mm", "liver_dice"):
        assert key in summary
    assert summary["dice_per_case"] == 1.0 and summary["liver_dice"] == 1.0
    assert [row["case_id"] for row in summary["cases"]] == ["segmentation-0", "segmentation-1"]


def test_evaluate_prints_the_paper_table_layout(dataset, capsys):
    assert main(["evaluate", "--gt", str(dataset / "segmentation-0.nii.gz"),
                 "--pred", str(dataset / "segmentation-0.nii.gz")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "Dice per case [%]" in header and "Dice global [%]" in header


def test_evaluate_scores_an_empty_prediction_as_a_miss(dataset, tmp_path, capsys):
    truth = dataset / "segmentation-0.nii.gz"
    empty = sitk.Image(sitk.ReadImage(str(truth)).GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(sitk.ReadImage(str(truth)))
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    assert main(["evaluate", "--gt", str(truth), "--pred", str(tmp_path / "empty.nii.gz"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["liver_dice"] == 0.0 and summary["dice_per_case"] == 0.0  # seed 3 has tumors


def test_missing_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    code = main(["evaluate", "--gt", str(tmp_path / "nothing"), "--pred", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("livertumordarn: error:") and len(err.strip().splitlines()) == 1


def test_a_file_system_refusal_anywhere_is_one_line_naming_the_file(dataset, monkeypatch, capsys):
    from LiverTumorDARNLib import metrics

    def refused(*args):
        raise PermissionError(13, "Permission denied", "secret/segmentation-0.nii.gz")

    monkeypatch.setattr(metrics, "match_case_files", refused)  # as Path.exists() in a folder nobody may enter
    assert main(["evaluate", "--gt", str(dataset), "--pred", str(dataset)]) == 2
    assert capsys.readouterr().err == "livertumordarn: error: secret/segmentation-0.nii.gz: Permission denied\n"


def test_phantom_refuses_to_overwrite_without_the_flag(dataset, capsys):
    before = (dataset / "volume-0.nii.gz").read_bytes()
    assert main(["phantom", str(dataset), "--n", "1", "--small"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dataset / "volume-0.nii.gz").read_bytes() == before


def test_installed_console_command_runs(tmp_path):
    command = [sys.executable, "-m", "LiverTumorDARNLib.cli", "evaluate", "--gt", str(tmp_path / "x"),
               "--pred", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (Path(sys.executable).parent / "livertumordarn").exists()


def test_picture_refuses_a_volume_that_is_not_ct(dataset, tmp_path, capsys):
    """MR-like intensities (no air below -500 HU) are refused before anything is drawn."""
    labels = sitk.ReadImage(str(dataset / "segmentation-0.nii.gz"))
    not_ct = sitk.Cast(labels, sitk.sitkInt16) * 300 + 100
    sitk.WriteImage(not_ct, str(tmp_path / "mr.nii.gz"))
    code = main(["picture", str(tmp_path / "mr.nii.gz"), str(dataset / "segmentation-0.nii.gz"),
                 "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Hounsfield" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


def test_picture_draws_a_png_of_the_case(dataset, tmp_path):
    assert main(["picture", str(dataset / "volume-0.nii.gz"), str(dataset / "segmentation-0.nii.gz"),
                 "-o", str(tmp_path / "case.png")]) == 0
    png = sitk.ReadImage(str(tmp_path / "case.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[0] >= 96


def test_export_of_a_file_that_is_not_a_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    assert main(["export", str(not_a_checkpoint), "--out", str(tmp_path / "models")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "models").exists()


def test_a_picture_of_a_scan_with_unequal_in_plane_spacing_has_square_pixels():
    import SimpleITK as sitk

    from LiverTumorDARNLib.picture import axial_overlay

    ct = sitk.Image([40, 30, 20], sitk.sitkInt16)
    ct.SetSpacing((1.5, 1.2, 2.0))
    labels = sitk.Image([40, 30, 20], sitk.sitkUInt8)
    labels.CopyInformation(ct)
    labels[5:15, 5:15, 10] = 1
    assert axial_overlay(ct, labels).shape == (24, 40, 3)  # 30 rows of 1.2 mm shown as 24 of 1.5 mm

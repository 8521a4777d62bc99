"""`livertumordarn segment` and `demo` end to end, with tiny random weights exported as the real ones are.

Random weights make the labels arbitrary: these tests check files, grids, refusals and messages.
The bundled weights' accuracy is tested in test_bundled_weights.py.
"""

import pytest
import SimpleITK as sitk

from LiverTumorDARNLib.cli import main


def test_segment_writes_a_label_map_on_the_input_grid(models_dir, ct_file, tmp_path, capsys):
    output = tmp_path / "labels.nrrd"
    assert main(["segment", str(ct_file), "-o", str(output), "--models", str(models_dir), "--device", "cpu"]) == 0
    ct, labels = sitk.ReadImage(str(ct_file)), sitk.ReadImage(str(output))
    for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(labels, name)() == pytest.approx(getattr(ct, name)(), abs=1e-4)
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert "Liver volume" in capsys.readouterr().out


def test_segment_refuses_to_replace_an_existing_output(models_dir, ct_file, tmp_path, capsys):
    output = tmp_path / "labels.nii.gz"
    output.write_bytes(b"a file the user made")
    assert main(["segment", str(ct_file), "-o", str(output), "--models", str(models_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"a file the user made"


def test_segment_refuses_weights_whose_checksum_does_not_match(models_dir, ct_file, tmp_path, capsys):
    corrupt = tmp_path / "models"
    corrupt.mkdir()
    for path in models_dir.iterdir():
        (corrupt / path.name).write_bytes(path.read_bytes())
    weights = corrupt / "darn-tumor.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    assert main(["segment", str(ct_file), "-o", str(tmp_path / "l.nii.gz"), "--models", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "l.nii.gz").exists()


def test_segment_of_a_missing_file_is_one_line(models_dir, tmp_path, capsys):
    assert main(["segment", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "l.nii.gz"),
                 "--models", str(models_dir)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_scan_where_no_liver_is_found_gives_an_empty_label_map_and_says_so(models_dir, ct_file, tmp_path, capsys, monkeypatch):
    from LiverTumorDARNLib import pipeline

    monkeypatch.setattr(pipeline, "locate_liver", lambda *args: None)  # the liver stage finds nothing
    output = tmp_path / "labels.nii.gz"
    assert main(["segment", str(ct_file), "-o", str(output), "--models", str(models_dir)]) == 0
    assert "no liver found; the label map is empty" in capsys.readouterr().out
    assert sitk.GetArrayViewFromImage(sitk.ReadImage(str(output))).max() == 0


@pytest.mark.parametrize("option, floor", [([], 0.0), (["--min-tumor-confidence", "0.4"], 0.4)])
def test_the_tumor_confidence_floor_is_the_weights_unless_the_user_sets_one(
        models_dir, ct_file, tmp_path, monkeypatch, option, floor):
    from LiverTumorDARNLib import pipeline

    used = []
    monkeypatch.setattr(pipeline, "drop_unconfident_tumors", lambda labels, probability, value: used.append(value))
    assert main(["segment", str(ct_file), "-o", str(tmp_path / "l.nii.gz"), "--models", str(models_dir), *option]) == 0
    assert used == [floor]


@pytest.mark.parametrize("value", ["1", "-0.2", "high"])
def test_a_confidence_floor_that_is_not_a_probability_is_refused_before_any_work(models_dir, ct_file, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as refusal:
        main(["segment", str(ct_file), "-o", str(tmp_path / "l.nii.gz"), "--models", str(models_dir),
              "--min-tumor-confidence", value])
    assert refusal.value.code == 2 and "expected a probability" in capsys.readouterr().err
    assert not (tmp_path / "l.nii.gz").exists()

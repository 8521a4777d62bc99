"""`livertumordarn segment` and `demo` end to end, with tiny random weights exported as the real ones are.

Random weights make the labels arbitrary: these tests check files, grids, refusals and messages.
The bundled weights' accuracy is tested in test_bundled_weights.py.
"""

import pytest
import SimpleITK as sitk
import torch

from LiverTumorDARNLib.cli import main
from LiverTumorDARNLib.io import write_image
from LiverTumorDARNLib.models import build_model
from LiverTumorDARNLib.phantom import generate_case
from LiverTumorDARNLib.training import save_checkpoint
from LiverTumorDARNLib.weights import export_checkpoint

TINY = {"encoder_widths": (4, 8, 16), "pyramid_width": 4, "order": "spa_sem", "in_channels": 1}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, spacing, classes in (("liver", 4.0, 2), ("tumor", 1.5, 3)):
        config = {**TINY, "num_classes": classes}
        stage = {"name": name, "spacing_mm": (spacing,) * 3, "num_classes": classes, "patch_size": (32, 32, 32)}
        checkpoint = save_checkpoint({"model": build_model(config).state_dict(), "model_config": config,
                                      "stage": stage}, folder / f"{name}.pt")
        export_checkpoint(checkpoint, folder, note="random weights for tests")
    return folder


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "case-7.nii.gz"
    write_image(generate_case(7, small=True).image, path)
    return path


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


def test_segment_of_several_inputs_fills_an_output_folder(models_dir, ct_file, tmp_path):
    second = tmp_path / "case-8.nrrd"
    write_image(generate_case(8, small=True).image, second)
    assert main(["segment", str(ct_file), str(second), "-o", str(tmp_path / "out"),
                 "--models", str(models_dir)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "case-7_segmentation.nii.gz", "case-8_segmentation.nii.gz"]


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

"""Bundled weights: export from a checkpoint, manifest bookkeeping, and the checksum gate before loading."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from adversity import release_readers
from LiverTumorDARNLib import weights
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.models import build_model
from LiverTumorDARNLib.pipeline import load_stages
from LiverTumorDARNLib.training.checkpoints import save_checkpoint
from LiverTumorDARNLib.weights import (
    BUNDLED, CUSTOM, INTENDED_USE, bundled_models_dir, chosen_models_dir, describe_models, export_checkpoint,
    load_manifest, load_model,
)

TINY_ARCHITECTURE = {"encoder_widths": (4, 8), "pyramid_width": 4, "order": "spa_sem", "in_channels": 1,
                     "num_classes": 3, "deep_supervision": True}


@pytest.fixture
def trained(tmp_path):
    """(checkpoint path, eager model) of a tiny DARN with deep-supervision heads, as training writes it."""
    torch.manual_seed(0)
    model = build_model(TINY_ARCHITECTURE)
    stage = {"name": "tumor", "spacing_mm": (1.5, 1.5, 1.5), "num_classes": 3, "patch_size": (16, 16, 16)}
    path = save_checkpoint({"model": model.state_dict(), "model_config": TINY_ARCHITECTURE, "stage": stage,
                            "iteration": 2, "val_scores": {"liver": 0.9, "tumor": 0.5, "mean": 0.7}},
                           tmp_path / "last.pt")
    return path, model.eval()


def test_exported_model_loads_and_gives_the_eager_models_outputs(trained, tmp_path):
    checkpoint, model = trained
    export_checkpoint(checkpoint, tmp_path / "models")
    scripted, entry = load_model(tmp_path / "models", "tumor")
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
    assert not scripted.training
    assert entry["model"]["deep_supervision"] is False


def test_the_manifest_records_what_the_checkpoint_says_about_its_training(trained, tmp_path):
    checkpoint, _ = trained
    export_checkpoint(checkpoint, tmp_path / "models", note="2-core CPU, 40 min")
    entry = load_manifest(tmp_path / "models")["models"]["tumor"]
    assert entry["training"]["iterations"] == 2 and entry["training"]["note"] == "2-core CPU, 40 min"
    assert entry["metrics"] == {"validation_dice": {"liver": 0.9, "tumor": 0.5, "mean": 0.7}}


def test_an_existing_weights_file_is_replaced_only_when_asked(trained, tmp_path):
    checkpoint, _ = trained
    path = export_checkpoint(checkpoint, tmp_path / "models")
    with pytest.raises(InputError, match="exists") as refusal:
        export_checkpoint(checkpoint, tmp_path / "models")
    assert refusal.value.option == "overwrite"
    assert export_checkpoint(checkpoint, tmp_path / "models", overwrite=True) == path


def test_new_tumor_weights_drop_the_confidence_floor_chosen_for_the_old_ones(trained, tmp_path):
    checkpoint, _ = trained
    export_checkpoint(checkpoint, tmp_path / "models")
    manifest = load_manifest(tmp_path / "models")
    manifest["models"]["tumor"]["postprocessing"] = {"min_tumor_confidence": 0.75}
    (tmp_path / "models" / "manifest.json").write_text(json.dumps(manifest))
    export_checkpoint(checkpoint, tmp_path / "models", overwrite=True)
    assert "postprocessing" not in load_manifest(tmp_path / "models")["models"]["tumor"]


def test_a_changed_byte_is_refused_before_torchscript_loads_the_file(trained, tmp_path, monkeypatch):
    checkpoint, _ = trained
    path = export_checkpoint(checkpoint, tmp_path / "models")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    def must_not_load(*args, **kwargs):
        raise AssertionError("torch.jit.load was reached with a corrupt file")

    monkeypatch.setattr(torch.jit, "load", must_not_load)
    with pytest.raises(InputError, match="checksum mismatch: expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        load_model(tmp_path / "models", "tumor")


def test_updating_one_model_keeps_the_other_manifest_entries(trained, tmp_path):
    checkpoint, _ = trained
    liver = save_checkpoint({**torch.load(checkpoint, weights_only=True),
                             "stage": {"name": "liver", "spacing_mm": (4.0,) * 3, "num_classes": 3,
                                       "patch_size": (16, 16, 16)}}, tmp_path / "liver.pt")
    models = tmp_path / "models"
    export_checkpoint(liver, models, note="first")
    export_checkpoint(checkpoint, models, note="first")
    export_checkpoint(liver, models, note="second", overwrite=True)
    manifest = load_manifest(models)
    assert manifest["intended_use"] == INTENDED_USE
    assert manifest["models"]["tumor"]["training"]["note"] == "first"
    assert manifest["models"]["liver"]["training"]["note"] == "second"
    assert manifest["models"]["liver"]["bytes"] == (models / "darn-liver.pt").stat().st_size


def test_an_export_over_the_size_limit_is_refused_and_leaves_nothing(trained, tmp_path, monkeypatch):
    checkpoint, _ = trained
    monkeypatch.setattr(weights, "MAX_MODEL_BYTES", 1000)
    with pytest.raises(InputError, match="over the"):
        export_checkpoint(checkpoint, tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_a_refinement_checkpoint_exports_as_refine_pt_under_its_own_limit(tmp_path, monkeypatch):
    architecture = {"architecture": "refine", "widths": (4, 8)}
    model = build_model(architecture).eval()
    checkpoint = save_checkpoint({"model": model.state_dict(), "model_config": architecture,
                                  "stage": {"name": "refine", "patch_size": [32] * 3, "num_classes": 2}},
                                 tmp_path / "last.pt")
    target = export_checkpoint(checkpoint, tmp_path / "models")
    assert target.name == "refine.pt"
    loaded, entry = load_model(tmp_path / "models", "refine")
    x = torch.randn(1, 2, 8, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    assert entry["model"] == {"architecture": "refine", "widths": [4, 8], "in_channels": 2}  # declared: no clicks
    monkeypatch.setattr(weights, "MAX_REFINE_MODEL_BYTES", 1000)
    with pytest.raises(InputError, match="over the 0 MiB limit"):
        export_checkpoint(checkpoint, tmp_path / "models", overwrite=True)


@pytest.mark.parametrize("content, message", [
    (None, "no weights manifest"),
    ("{not json", "unreadable"),
    (json.dumps({"format": 2, "models": {}}), "format-1"),
])
def test_a_missing_or_invalid_manifest_is_an_input_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(InputError, match=message):
        load_manifest(tmp_path)


def test_an_unknown_model_name_lists_the_available_ones(trained, tmp_path):
    checkpoint, _ = trained
    export_checkpoint(checkpoint, tmp_path / "models")
    with pytest.raises(InputError, match="lists tumor"):
        load_model(tmp_path / "models", "liver")


def test_bundled_models_live_in_the_extensions_resources():
    assert bundled_models_dir().parts[-3:] == ("LiverTumorDARN", "Resources", "Models")
    assert bundled_models_dir().is_dir()


# ------------------------------------------------------------------------------ the Slicer panel's model choice


def test_choosing_the_bundled_weights_gives_the_bundled_folder():
    assert chosen_models_dir(BUNDLED) == bundled_models_dir()


def test_choosing_a_custom_folder_gives_that_folder_once_its_weights_check_out(models_dir):
    assert chosen_models_dir(CUSTOM, str(models_dir)) == models_dir


@pytest.mark.parametrize("custom_dir", ["", "."])
def test_choosing_custom_weights_without_a_folder_asks_for_one(custom_dir):
    with pytest.raises(InputError, match="no custom weights folder chosen"):
        chosen_models_dir(CUSTOM, custom_dir)


def test_a_custom_folder_without_a_manifest_is_refused_in_one_line(tmp_path):
    with pytest.raises(InputError, match="no weights manifest") as refusal:
        chosen_models_dir(CUSTOM, tmp_path)
    assert "\n" not in str(refusal.value)


def test_a_custom_folder_without_a_segmentation_stage_names_what_it_has(trained, tmp_path):
    checkpoint, _ = trained
    export_checkpoint(checkpoint, tmp_path / "models")
    with pytest.raises(InputError, match="no model 'liver'; it lists tumor"):
        chosen_models_dir(CUSTOM, tmp_path / "models")


def test_a_custom_folder_with_a_changed_weights_file_is_refused_before_any_segmentation(models_dir, tmp_path):
    folder = shutil.copytree(models_dir, tmp_path / "models")
    with open(folder / "darn-tumor.pt", "ab") as weights_file:
        weights_file.write(b"\0")
    with pytest.raises(InputError, match="darn-tumor.pt: checksum mismatch"):
        chosen_models_dir(CUSTOM, folder)


def test_a_weights_folder_is_described_by_the_papers_name_of_its_darn_order(models_dir):
    assert describe_models(models_dir) == "DARN Spa+Sem"  # the test weights are spa_sem


# ------------------------------------------------------------------------------ a manifest not to be trusted


def tampered(models_dir, tmp_path, change) -> Path:
    """A copy of ``models_dir`` whose manifest's tumor entry ``change(entry, folder)`` edited."""
    folder = shutil.copytree(models_dir, tmp_path / "models")
    manifest = load_manifest(folder)
    change(manifest["models"]["tumor"], folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def outside_copy(entry: dict, folder) -> Path:
    """The tumor weights copied out of the models folder, with their true checksum kept in the entry."""
    outside = folder.parent / "outside"
    outside.mkdir()
    return Path(shutil.copy(folder / entry["file"], outside / "darn-tumor.pt"))


@pytest.mark.parametrize("way_out", ["relative", "absolute", "link"])
def test_a_manifest_may_name_only_files_in_its_own_folder(models_dir, tmp_path, monkeypatch, way_out):
    def lead_out(entry, folder):
        copy = outside_copy(entry, folder)
        if way_out == "link":
            (folder / "link.pt").symlink_to(copy)
        entry["file"] = {"relative": "../outside/darn-tumor.pt", "absolute": str(copy), "link": "link.pt"}[way_out]

    folder = tampered(models_dir, tmp_path, lead_out)
    monkeypatch.setattr(weights, "file_sha256", lambda path: pytest.fail(f"{path} was read"))
    with pytest.raises(InputError, match="lies outside the models folder"):
        load_model(folder, "tumor")


def test_a_manifest_entry_without_a_checksum_is_one_line(models_dir, tmp_path):
    folder = tampered(models_dir, tmp_path, lambda entry, folder: entry.pop("sha256"))
    with pytest.raises(InputError, match="the 'tumor' entry needs a \"file\" and its \"sha256\""):
        load_model(folder, "tumor")


def test_a_segmentation_entry_without_its_stage_is_one_line(models_dir, tmp_path):
    folder = tampered(models_dir, tmp_path, lambda entry, folder: entry.pop("stage"))
    with pytest.raises(InputError, match="the 'tumor' entry has no \"stage\""):
        load_stages(folder, torch.device("cpu"))


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"not a zip archive", "not a TorchScript file")],
                         ids=["empty", "garbage"])
def test_weights_that_match_their_checksum_but_do_not_load_are_one_line_naming_the_file(models_dir, tmp_path, content, message):
    def replace_weights(entry, folder):
        (folder / entry["file"]).write_bytes(content)
        entry["sha256"] = hashlib.sha256(content).hexdigest()

    folder = tampered(models_dir, tmp_path, replace_weights)
    with pytest.raises(InputError, match=f"darn-tumor.pt: .*{message}") as refusal:
        load_model(folder, "tumor")
    assert "\n" not in str(refusal.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_manifest_that_is_a_pipe_is_refused_unread(tmp_path):
    os.mkfifo(tmp_path / "manifest.json")
    stop = release_readers(tmp_path / "manifest.json")
    try:
        with pytest.raises(InputError, match="not a regular file"):
            load_manifest(tmp_path)
    finally:
        stop.set()

"""Training: what the loss, the patches, the augmentation, checkpoints and DDP must do (tiny and fast)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.phantom import write_dataset
from LiverTumorDARNLib.training import (
    NORMALISED_AIR, VALIDATION_SEED_START, PoolCase, TrainConfig, augment, choose_focus,
    deep_supervision_loss, dice_ce_loss, find_lits_pairs, sample_patch, train,
)

TINY_MODEL = {"encoder_widths": (4, 8), "pyramid_width": 4, "order": "spa_sem"}


def tiny_config(out_dir: Path, **changes) -> TrainConfig:
    """Small phantoms, a two-level model with 4 channels and 16^3 patches: a few iterations a second."""
    settings = dict(stage="liver", phantom_small=True, pool_size=2, refresh_every=1, iterations=2, batch_size=1,
                    model=TINY_MODEL, val_cases=1, val_every=2, out_dir=out_dir, device="cpu",
                    patch_size=(16, 16, 16))
    settings.update(changes)
    return TrainConfig(**settings)


def logits_for(labels: torch.Tensor, num_classes: int, confidence: float = 20.0) -> torch.Tensor:
    """Logits [B, C, ...] that predict ``labels`` [B, ...] with the given margin."""
    return F.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3).float() * confidence


def case_with_tumor() -> PoolCase:
    """A 20^3 volume: liver in the low-x half, a 3^3 tumor in the corner at the origin."""
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[:, :, :10] = 1
    labels[:3, :3, :3] = 2
    image = np.where(labels > 0, 1.0, -1.0).astype(np.float32)
    return PoolCase.from_arrays(image, labels, num_classes=3)


# ------------------------------------------------------------------------------------ loss


def test_dice_ce_loss_is_near_zero_for_a_perfect_prediction_and_high_for_a_wrong_one():
    labels = torch.zeros((2, 8, 8, 8), dtype=torch.long)
    labels[:, 2:6, 2:6, 2:6] = 1
    labels[:, 3:5, 3:5, 3:5] = 2
    assert dice_ce_loss(logits_for(labels, 3), labels).item() < 1e-3
    assert dice_ce_loss(logits_for((labels + 1) % 3, 3), labels).item() > 10


def test_deep_supervision_loss_is_near_zero_when_every_level_predicts_max_pooled_labels():
    labels = torch.zeros((1, 8, 8, 8), dtype=torch.long)
    labels[0, 2:6, 2:6, 2:6] = 1
    labels[0, 2, 2, 2] = 2  # one tumor voxel: max pooling keeps it at the coarse level
    coarse = F.max_pool3d(labels[:, None].float(), 2)[:, 0].long()
    assert coarse[0, 1, 1, 1] == 2
    assert deep_supervision_loss([logits_for(labels, 3), logits_for(coarse, 3)], labels).item() < 1e-3


# ------------------------------------------------------------------------------------ patches


def test_patches_have_the_requested_size_and_air_padding_at_the_volume_border():
    case = case_with_tumor()  # the tumor sits in the corner, so tumor-centred patches leave the volume
    image, labels = sample_patch(case, (16, 12, 8), focus=2, rng=np.random.default_rng(0))
    assert image.shape == labels.shape == (16, 12, 8)
    assert image[0, 0, 0] == NORMALISED_AIR and labels[0, 0, 0] == 0


def test_tumor_centred_patches_contain_tumor():
    case = case_with_tumor()
    rng = np.random.default_rng(1)
    for _ in range(20):
        _, labels = sample_patch(case, (8, 8, 8), focus=2, rng=rng)
        assert (labels == 2).any()


def test_foreground_oversampling_centres_on_liver_when_the_case_has_no_tumor():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    case = PoolCase.from_arrays(np.zeros(labels.shape, np.float32), labels, num_classes=3)
    rng = np.random.default_rng(0)
    focuses = {choose_focus(case, rng) for _ in range(100)}
    assert focuses == {None, 1}


def test_half_of_the_patches_centre_on_tumor_when_the_case_has_one():
    case = case_with_tumor()
    rng = np.random.default_rng(0)
    focuses = [choose_focus(case, rng) for _ in range(4000)]
    assert focuses.count(2) / len(focuses) == pytest.approx(0.5, abs=0.03)


# ------------------------------------------------------------------------------------ augmentation


def test_augmentation_never_mirrors_the_liver_to_the_other_side():
    case = case_with_tumor()  # liver in the low-x half (the patient's right)
    images = torch.from_numpy(case.image[None, None].copy()).repeat(4, 1, 1, 1, 1)
    labels = torch.from_numpy(case.labels[None].astype(np.int64)).repeat(4, 1, 1, 1)
    rng = np.random.default_rng(0)
    x = torch.arange(20.0)
    for _ in range(25):
        augmented_images, augmented_labels = augment(images, labels, rng)
        assert augmented_images.shape == images.shape and augmented_labels.shape == labels.shape
        for liver in augmented_labels > 0:
            assert (liver.float().sum((0, 1)) * x).sum() / liver.sum() < 9.5


# ------------------------------------------------------------------------------------ runs


def test_checkpoint_is_written_and_resume_continues_at_the_saved_iteration(tmp_path):
    train(tiny_config(tmp_path, iterations=2))
    first = torch.load(tmp_path / "last.pt", weights_only=True)
    assert first["iteration"] == 2 and (tmp_path / "best.pt").exists()

    train(tiny_config(tmp_path, iterations=4, resume=True))
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    assert resumed["iteration"] == 4
    assert int(resumed["optimizer"]["state"][0]["step"]) == 4  # Adam's step count went on from 2


def test_a_folder_holding_a_checkpoint_is_not_overwritten_without_resume(tmp_path):
    train(tiny_config(tmp_path, iterations=1, val_every=1))
    with pytest.raises(InputError, match="--resume"):
        train(tiny_config(tmp_path, iterations=1, val_every=1))


def test_training_on_a_lits_folder_holds_out_validation_cases(tmp_path):
    write_dataset(tmp_path / "lits", count=3, seed=5, small=True)
    train(tiny_config(tmp_path / "out", data=tmp_path / "lits", stage="tumor", iterations=1, val_every=1))
    checkpoint = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert set(checkpoint["val_scores"]) == {"liver", "tumor", "mean"}


def test_lits_files_are_paired_by_case_number_and_unpaired_volumes_are_skipped(tmp_path):
    for name in ("volume-10.nii", "segmentation-10.nii.gz", "volume-2.nii.gz", "segmentation-2.nii", "volume-7.nii"):
        (tmp_path / name).touch()
    pairs = find_lits_pairs(tmp_path)
    assert [(v.name, s.name) for v, s in pairs] == [("volume-2.nii.gz", "segmentation-2.nii"),
                                                     ("volume-10.nii", "segmentation-10.nii.gz")]


@pytest.mark.parametrize("changes, message", [
    ({"data": Path("/no/such/folder")}, "no such folder"),
    ({"stage": "spleen"}, "unknown stage"),
    ({"phantom_seed_start": VALIDATION_SEED_START - 1}, "validation phantoms"),
])
def test_bad_settings_are_refused_with_one_line(tmp_path, changes, message):
    with pytest.raises(InputError, match=message) as refused:
        train(tiny_config(tmp_path, **changes))
    assert "\n" not in str(refused.value)


def test_a_data_folder_without_lits_pairs_is_refused(tmp_path):
    (tmp_path / "volume-1.nii.gz").touch()
    with pytest.raises(InputError, match="no volume-K"):
        train(tiny_config(tmp_path / "out", data=tmp_path))


def test_two_process_ddp_run_writes_one_checkpoint_with_identical_replicas(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "LiverTumorDARNLib.cli", "train", "--out", str(out), "--small-phantoms", "--iterations", "2",
               "--widths", "4,8", "--patch-size", "16,16,16", "--pool-size", "1", "--val-cases", "1",
               "--batch-size", "1", "--threads", "1", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("last.pt") == 1  # only rank 0 reports
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["iteration"] == 2
    assert len(checkpoint["replica_checksums"]) == 2 and len(set(checkpoint["replica_checksums"])) == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.parametrize("flags, amp", [([], None), (["--amp"], True), (["--no-amp"], False)])
@pytest.mark.parametrize("stage", ["tumor", "refine"])
def test_the_amp_option_reaches_the_training_settings_of_every_stage(tmp_path, stage, flags, amp):
    from LiverTumorDARNLib import refine_training, training
    from LiverTumorDARNLib.cli import build_parser

    args = build_parser().parse_args(["train", "--stage", stage, "--out", str(tmp_path), *flags])
    config_from_args = refine_training.config_from_args if stage == "refine" else training.config_from_args
    assert config_from_args(args).amp is amp


def test_amp_is_declined_with_a_warning_on_a_cpu_without_native_bfloat16(monkeypatch):
    from LiverTumorDARNLib.training import resolve_amp

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert resolve_amp(True, torch.device("cpu")) is False
    assert resolve_amp(None, torch.device("cpu")) is False


def test_training_on_label_maps_validates_on_a_held_out_map(tmp_path):
    from test_anatomy import made_up_abdomen, write_map

    for k in range(10):  # one of each ten maps of a data set is held out
        write_map(made_up_abdomen(), tmp_path / "maps" / "btcv" / f"label{k:04d}.nii.gz")
    train(tiny_config(tmp_path / "out", anatomy=tmp_path / "maps", phantom_small=False, pool_size=1,
                      iterations=1, val_every=1, patch_size=(16, 16, 16)))
    checkpoint = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert checkpoint["iteration"] == 1 and set(checkpoint["val_scores"]) == {"liver", "mean"}


def test_a_run_can_start_from_exported_weights_of_the_same_network(tmp_path, models_dir):
    from LiverTumorDARNLib.weights import load_model

    from conftest import TINY

    same_network = {key: value for key, value in TINY.items() if key != "in_channels"}
    train(tiny_config(tmp_path, model=same_network, init_from=models_dir, learning_rate=0.0, weight_decay=0.0))
    trained = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    exported = load_model(models_dir, "liver")[0].state_dict()
    assert all(torch.equal(trained[key], value) for key, value in exported.items())  # a zero step kept them


def test_starting_from_weights_of_another_network_is_refused(tmp_path, models_dir):
    with pytest.raises(InputError, match="its liver network is"):
        train(tiny_config(tmp_path, init_from=models_dir))

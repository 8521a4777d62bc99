"""Training: the one loop every stage runs, and what each stage's task feeds it (tiny and fast)."""

import contextlib
import inspect
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LiverTumorDARNLib.cli import build_parser, main
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.models import DARN, BoundaryRefinementNet
from LiverTumorDARNLib.phantom import VALIDATION_SEED_START, write_dataset
from LiverTumorDARNLib.pipeline import STAGES
from LiverTumorDARNLib.training.augmentation import NORMALISED_AIR, augment
from LiverTumorDARNLib.training.checkpoints import save_checkpoint
from LiverTumorDARNLib.training.darn_task import PoolCase, PrepareForStage, choose_focus, sample_patch
from LiverTumorDARNLib.training.data import PhantomCases, Prepared, case_workers, find_lits_pairs, make_cases
from LiverTumorDARNLib.training.loop import WORLD_OF_ONE, Trainer, make_task, resolve_amp, train
from LiverTumorDARNLib.training.losses import deep_supervision_loss, dice_ce_loss
from LiverTumorDARNLib.training.options import STAGE_DEFAULTS, TrainConfig, config_from_args
from LiverTumorDARNLib.weights import export_checkpoint, load_model

TINY_DARN = {"encoder_widths": (4, 8), "pyramid_width": 4, "order": "spa_sem"}
CHECKPOINT_KEYS = {"model", "model_config", "optimizer", "scaler", "iteration", "config", "stage", "best_val_dice",
                   "val_scores", "replica_checksums"}


@pytest.fixture(scope="module")
def lits_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lits")
    write_dataset(folder, count=3, seed=5, small=True)
    return folder


@pytest.fixture(scope="module")
def tiny_config(lits_folder, models_dir):
    """A run of two iterations, cases made in this process: DARN on small phantoms with a two-level
    network and 16^3 patches; the refinement network (4, 8 wide) on small LiTS-layout cases with the
    tiny test weights' DARN masks."""

    def config(stage: str, out_dir: Path, **changes) -> TrainConfig:
        settings = dict(stage=stage, out_dir=out_dir, pool_size=1, refresh_every=1, iterations=2, batch_size=1,
                        val_cases=1, val_every=2, device="cpu", workers=0)
        if stage == "refine":
            settings.update(data=lits_folder, models_dir=models_dir, model={"widths": (4, 8)}, batch_size=2)
        elif stage == "tumor":
            settings.update(data=lits_folder, model=TINY_DARN, patch_size=(16, 16, 16))
        else:
            settings.update(phantom_small=True, model=TINY_DARN, patch_size=(16, 16, 16))
        return TrainConfig(**{**settings, **changes})

    return config


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


def help_text(*argv: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(printed.getvalue().split())  # argparse wraps lines where it likes


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


# ------------------------------------------------------------------------------------ cases


def test_lits_files_are_paired_by_case_number_and_unpaired_volumes_are_skipped(tmp_path):
    for name in ("volume-10.nii", "segmentation-10.nii.gz", "volume-2.nii.gz", "segmentation-2.nii", "volume-7.nii"):
        (tmp_path / name).touch()
    pairs = find_lits_pairs(tmp_path)
    assert [(v.name, s.name) for v, s in pairs] == [("volume-2.nii.gz", "segmentation-2.nii"),
                                                     ("volume-10.nii", "segmentation-10.nii.gz")]


@pytest.mark.slow
def test_a_worker_process_makes_the_cases_this_process_makes(tiny_config, tmp_path):
    source = Prepared(PhantomCases(first_seed=3, stride=1, small=True, randomize_fraction=0.5),
                      PrepareForStage(STAGES["liver"]))
    with case_workers(tiny_config("liver", tmp_path, workers=1)) as executor:
        assert executor is not None
        made_there = make_cases(source, [0, 1], executor)
    for there, here in zip(made_there, make_cases(source, [0, 1], None)):
        np.testing.assert_array_equal(there.image, here.image)
        np.testing.assert_array_equal(there.labels, here.labels)


# ------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module", params=[pytest.param("tumor", marks=pytest.mark.slow),
                                        pytest.param("refine", marks=pytest.mark.slow)])
def finished_run(request, tiny_config, tmp_path_factory):
    """(stage, folder) of one two-iteration run of a DARN stage and of the refinement network on
    the small LiTS-layout folder, shared by the tests that read what a run leaves."""
    stage, out = request.param, tmp_path_factory.mktemp(f"run-{request.param}")
    train(tiny_config(stage, out))
    return stage, out


def test_a_run_writes_last_and_best_checkpoints_of_the_one_format(finished_run):
    stage, out = finished_run
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert set(checkpoint) == CHECKPOINT_KEYS and checkpoint["iteration"] == 2
    assert checkpoint["stage"]["name"] == checkpoint["config"]["stage"] == stage
    assert (out / "best.pt").exists()


def test_validation_scores_the_held_out_cases(finished_run):
    stage, out = finished_run
    expected = {"liver", "tumor", "mean"} if stage == "tumor" else {"coarse", "refined"}
    assert set(torch.load(out / "last.pt", weights_only=True)["val_scores"]) == expected


def test_resume_continues_at_the_saved_iteration(finished_run, tiny_config, tmp_path):
    stage, out = finished_run
    shutil.copytree(out, tmp_path / "run")
    train(tiny_config(stage, tmp_path / "run", iterations=3, resume=True))
    resumed = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert resumed["iteration"] == 3
    assert int(resumed["optimizer"]["state"][0]["step"]) == 3  # Adam's step count went on from 2


def test_resume_refuses_a_checkpoint_of_another_network(finished_run, tiny_config, tmp_path):
    stage, out = finished_run
    other_network = {"widths": (4, 8, 16)} if stage == "refine" else {"encoder_widths": (4, 8, 16)}
    with pytest.raises(InputError, match="checkpoint was trained for stage"):
        train(tiny_config(stage, out, iterations=3, resume=True, model=other_network))


def test_a_trained_checkpoint_exports_as_the_weights_segment_and_refine_load(finished_run, tmp_path):
    stage, out = finished_run
    target = export_checkpoint(out / "last.pt", tmp_path / "models")
    _, entry = load_model(tmp_path / "models", stage)
    assert target.name == ("refine.pt" if stage == "refine" else f"darn-{stage}.pt")
    assert entry["training"]["iterations"] == 2 and entry["training"]["config"]["stage"] == stage


def test_a_run_stopped_by_an_error_leaves_a_checkpoint_that_resume_goes_on_from(tiny_config, tmp_path, monkeypatch):
    step = Trainer.step

    def fail_at_the_third(trainer, cases, rng):
        if trainer.iteration == 2:
            raise OSError("No space left on device")
        return step(trainer, cases, rng)

    monkeypatch.setattr(Trainer, "step", fail_at_the_third)
    with pytest.raises(OSError):
        train(tiny_config("liver", tmp_path, iterations=4, val_every=4))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 2
    monkeypatch.setattr(Trainer, "step", step)
    train(tiny_config("liver", tmp_path, iterations=4, val_every=4, resume=True))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 4


def test_an_exported_network_declares_the_input_channels_it_was_trained_with(finished_run, tmp_path):
    stage, out = finished_run
    export_checkpoint(out / "last.pt", tmp_path / "models")
    assert load_model(tmp_path / "models", stage)[1]["model"]["in_channels"] == (4 if stage == "refine" else 1)


def test_a_folder_holding_a_checkpoint_is_not_overwritten_without_resume(tiny_config, tmp_path):
    save_checkpoint({"note": "another run's"}, tmp_path / "last.pt")
    with pytest.raises(InputError, match="--resume"):
        train(tiny_config("refine", tmp_path))
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"note": "another run's"}


@pytest.mark.parametrize("stage", ["liver", "refine"])
def test_training_phantoms_that_would_reach_the_validation_seeds_are_refused(tiny_config, tmp_path, stage):
    with pytest.raises(InputError, match="validation phantoms start at"):
        train(tiny_config(stage, tmp_path, data=None, phantom_seed_start=VALIDATION_SEED_START - 1))


@pytest.mark.parametrize("stage, changes, message", [
    ("liver", {"data": Path("/no/such/folder")}, "no such folder"),
    ("spleen", {}, "unknown stage"),
    ("tumor", {"darn_fraction": 0.5}, "setting of the refine stages"),
    ("refine", {"model": {"widths": (4, 8), "in_channels": 3}}, "input channels"),
    ("refine", {"phantom_small": True}, "setting of the DARN stages"),
    ("liver", {"pool_size": 0}, "pool size must be at least 1"),
    ("liver", {"randomize_fraction": 1.5}, "must lie in 0..1"),
])
def test_bad_settings_are_refused_with_one_line(tiny_config, tmp_path, stage, changes, message):
    with pytest.raises(InputError, match=message) as refused:
        train(tiny_config(stage, tmp_path, **changes))
    assert "\n" not in str(refused.value)


def test_a_data_folder_without_lits_pairs_is_refused(tiny_config, tmp_path):
    (tmp_path / "volume-1.nii.gz").touch()
    with pytest.raises(InputError, match="no volume-K"):
        train(tiny_config("liver", tmp_path / "out", data=tmp_path))


@pytest.mark.slow
def test_two_process_ddp_run_writes_one_checkpoint_with_identical_replicas(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "LiverTumorDARNLib.cli", "train", "--out", str(out), "--small-phantoms", "--iterations", "2",
               "--widths", "4,8", "--patch-size", "16,16,16", "--pool-size", "1", "--val-cases", "1",
               "--batch-size", "1", "--threads", "1", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("last.pt") == 1  # only rank 0 reports
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["iteration"] == 2
    assert len(checkpoint["replica_checksums"]) == 2 and len(set(checkpoint["replica_checksums"])) == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_training_on_label_maps_validates_on_a_held_out_map(tiny_config, tmp_path):
    """Every stage draws its cases through the same data sources (``data.raw_sources``); the
    liver stage, the cheapest, stands for them (the refinement stage would add a DARN run on a
    full-size validation scan, most of a minute on two cores)."""
    from test_anatomy import made_up_abdomen, write_map

    for k in range(10):  # one of each ten maps of a data set is held out; half-size abdomens, quick to draw
        write_map(made_up_abdomen(), tmp_path / "maps" / "btcv" / f"label{k:04d}.nii.gz", spacing=(1.5, 1.5, 2.5))
    train(tiny_config("liver", tmp_path / "out", data=None, anatomy=tmp_path / "maps", phantom_fraction=0.0,
                      iterations=1, val_every=1))
    checkpoint = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert checkpoint["iteration"] == 1 and set(checkpoint["val_scores"]) == {"liver", "mean"}


def test_a_run_can_start_from_exported_weights_of_the_same_network(tiny_config, tmp_path, models_dir):
    from conftest import TINY

    same_network = {key: value for key, value in TINY.items() if key != "in_channels"}
    train(tiny_config("liver", tmp_path, model=same_network, init_from=models_dir, learning_rate=0.0, weight_decay=0.0))
    trained = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    exported = load_model(models_dir, "liver")[0].state_dict()
    assert all(torch.equal(trained[key], value) for key, value in exported.items())  # a zero step kept them


def refine_trainer(tiny_config, out_dir: Path, in_channels: int) -> Trainer:
    config = tiny_config("refine", out_dir, model={"widths": (4, 8), "in_channels": in_channels})
    return Trainer(config, make_task(config), torch.device("cpu"), WORLD_OF_ONE)


def test_the_refinement_network_starts_from_exported_weights_as_a_darn_stage_does(tiny_config, tmp_path, models_dir):
    trainer = refine_trainer(tiny_config, tmp_path, in_channels=2)  # as the test weights' refiner
    trainer.start_from(models_dir)
    exported = load_model(models_dir, "refine")[0].state_dict()
    assert all(torch.equal(trainer.model.state_dict()[key], value) for key, value in exported.items())


def test_a_click_refiner_started_from_a_two_channel_one_computes_what_it_did_whatever_the_clicks(
        tiny_config, tmp_path, models_dir):
    trainer = refine_trainer(tiny_config, tmp_path, in_channels=4)
    trainer.start_from(models_dir)
    inputs = torch.randn(1, 4, 16, 16, 16)
    with torch.inference_mode():
        before = load_model(models_dir, "refine")[0](inputs[:, :2])
        assert torch.allclose(trainer.model.eval()(inputs), before, atol=1e-5)


def test_a_two_channel_refiner_does_not_start_from_a_click_one(tiny_config, tmp_path):
    clicking = refine_trainer(tiny_config, tmp_path / "run", in_channels=4)
    save_checkpoint(clicking.checkpoint(), tmp_path / "clicks.pt")
    export_checkpoint(tmp_path / "clicks.pt", tmp_path / "models")
    with pytest.raises(InputError, match="takes 4 input channels; this run builds one that takes 2"):
        refine_trainer(tiny_config, tmp_path / "other", in_channels=2).start_from(tmp_path / "models")


@pytest.mark.parametrize("stage, message", [("liver", "its liver network is"), ("refine", "its refine network is")])
def test_starting_from_weights_of_another_network_is_refused(tiny_config, tmp_path, models_dir, stage, message):
    other = {"widths": (4, 8, 16)} if stage == "refine" else {"encoder_widths": (4, 8, 16)}
    with pytest.raises(InputError, match=message):
        train(tiny_config(stage, tmp_path, init_from=models_dir, model=other))


def test_the_refinement_network_trains_under_bfloat16_autocast_without_loss_scaling(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # as on an AVX-512 BF16 CPU
    config = tiny_config("refine", tmp_path, amp=True)
    trainer = Trainer(config, make_task(config), torch.device("cpu"), WORLD_OF_ONE)
    precisions = []

    def loss(logits, targets):
        precisions.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return logits.float().mean()

    monkeypatch.setattr(trainer.task, "loss", loss)
    inputs = torch.randn(2, config.model["in_channels"], 16, 16, 16).to(memory_format=torch.channels_last_3d)
    trainer.optimise(inputs, torch.zeros(2, 16, 16, 16, dtype=torch.long))
    assert precisions == [torch.bfloat16] and not trainer.scaler.is_enabled()
    assert all(value.dtype == torch.float32 for value in trainer.model.state_dict().values() if value.is_floating_point())


# ------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("flags, amp", [([], None), (["--amp"], True), (["--no-amp"], False)])
@pytest.mark.parametrize("stage", ["tumor", "refine"])
def test_the_amp_option_reaches_the_training_settings_of_every_stage(tmp_path, stage, flags, amp):
    args = build_parser(stage).parse_args(["train", "--stage", stage, "--out", str(tmp_path), *flags])
    assert config_from_args(args).amp is amp


def test_amp_is_declined_with_a_warning_on_a_cpu_without_native_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert resolve_amp(True, torch.device("cpu")) is False
    assert resolve_amp(None, torch.device("cpu")) is False


def test_train_help_shows_the_defaults_of_the_stage_it_is_asked_for():
    refine, liver = help_text("train", "--stage", "refine"), help_text("train")
    assert "--batch-size N default 8" in refine and "--refresh-every N iterations between replacing one case of " \
                                                      "the pool (default 100)" in refine
    assert "(default 12,24,48,96)" in refine and "(default 3)" in refine
    assert "--batch-size N default 2" in liver and "(default 8,16,32,64,128)" in liver
    assert "--darn-fraction" not in liver and "--small-phantoms" not in refine


def test_the_refinement_stage_draws_on_label_maps_too_with_its_own_phantom_share():
    refine = help_text("train", "--stage", "refine")
    assert "--anatomy DIR" in refine and "--phantom-fraction P with --anatomy: share of phantoms among the " \
                                             "training cases (default 0.2)" in refine


@pytest.mark.parametrize("stage, option", [("tumor", ["--models", "weights"]), ("tumor", ["--darn-fraction", "0.5"]),
                                           ("refine", ["--order", "sem_spa"]), ("refine", ["--small-phantoms"])])
def test_an_option_of_another_stage_is_a_usage_error(tmp_path, capsys, stage, option):
    with pytest.raises(SystemExit) as refusal:
        main(["train", "--stage", stage, "--out", str(tmp_path), *option])
    assert refusal.value.code == 2 and f"unrecognized arguments: {option[0]}" in capsys.readouterr().err


def test_options_left_out_keep_the_stages_defaults(tmp_path):
    args = build_parser("refine").parse_args(["train", "--stage", "refine", "--out", str(tmp_path), "--widths", "6,12"])
    config = config_from_args(args)
    assert (config.batch_size, config.refresh_every, config.val_cases) == (8, 100, 3)
    assert config.model == {"widths": (6, 12), "in_channels": 4}


@pytest.mark.parametrize("network, stage, key", [(DARN, "tumor", "encoder_widths"), (BoundaryRefinementNet, "refine", "widths")])
def test_each_stage_trains_the_network_its_class_describes_by_default(network, stage, key):
    assert inspect.signature(network).parameters[key].default == STAGE_DEFAULTS[stage]["model"][key]

"""Fixtures shared by the command-line tests: tiny random weights exported as the real ones are,
(both DARN stages and the refinement network) and small phantom CT files. Random weights make the labels arbitrary but deterministic: the tests
that use them check files, grids, refusals and messages, never accuracy. Both stages work at 4 mm
so that a case takes a second, not the half minute a 1.5 mm tumor stage takes."""

import pytest
import torch

from LiverTumorDARNLib.io import write_image
from LiverTumorDARNLib.models import build_model
from LiverTumorDARNLib.phantom import generate_case
from LiverTumorDARNLib.training import save_checkpoint
from LiverTumorDARNLib.weights import export_checkpoint

TINY = {"encoder_widths": (4, 8, 16), "pyramid_width": 4, "order": "spa_sem", "in_channels": 1}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, classes in (("liver", 2), ("tumor", 3)):
        config = {**TINY, "num_classes": classes}
        stage = {"name": name, "spacing_mm": (4.0,) * 3, "num_classes": classes, "patch_size": (32, 32, 32)}
        checkpoint = save_checkpoint({"model": build_model(config).state_dict(), "model_config": config,
                                      "stage": stage}, folder / f"{name}.pt")
        export_checkpoint(checkpoint, folder, note="random weights for tests")
    refine = {"architecture": "refine", "widths": (4, 8)}
    checkpoint = save_checkpoint({"model": build_model(refine).state_dict(), "model_config": refine,
                                  "stage": {"name": "refine", "patch_size": [32] * 3, "num_classes": 2}},
                                 folder / "refine-checkpoint.pt")
    export_checkpoint(checkpoint, folder, note="random weights for tests")
    return folder


@pytest.fixture(scope="session")
def ct_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "case-7.nii.gz"
    write_image(generate_case(7, small=True).image, path)
    return path

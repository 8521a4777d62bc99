"""The bundled weights, as a user who installed the package runs them: `livertumordarn demo` on
the CPU, from the wheel (test_package.py), in a folder of its own.

The demo segments its sample phantom (seed 850000, never trained on: see phantom.SAMPLE_SEED) and
prints the Dice against the known truth. The floors sit well below what the weights score (the
README's benchmark table), so these tests catch broken weights, a broken pipeline or a wrong
orientation, not a change of a few hundredths. The refiner is tested on corrupted masks of a
second held-out phantom (seed 850002).
"""

import re

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import run_installed
from LiverTumorDARNLib.io import read_ct, read_image
from LiverTumorDARNLib.labels import TUMOR
from LiverTumorDARNLib.metrics import dice
from LiverTumorDARNLib.phantom import SAMPLE_SEED, generate_case
from LiverTumorDARNLib.refine import Refiner
from LiverTumorDARNLib.regions import widened_mm
from LiverTumorDARNLib.training.refine_task import corrupted_map
from LiverTumorDARNLib.weights import bundled_models_dir, load_manifest

LIVER_DICE_FLOOR = 0.90
TUMOR_DICE_FLOOR = 0.25
GOOD_MASK_DICE_FLOOR = 0.95
CUT_TUMORS_SEED = SAMPLE_SEED + 2
"""A phantom of the validation range (never trained on) with three tumors of 2.6 to 23 mL: the
bundled refiner raises their mean Dice from 0.55 to 0.83 when each has lost a piece."""
CUT_TUMOR_DICE_GAIN_FLOOR = 0.10


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(installed_package, tmp_path_factory):
    """(exit status, output folder, printed text) of one demo run of the installed command."""
    folder = tmp_path_factory.mktemp("demo")
    done = run_installed(installed_package[0], "demo", "--out", "demo", "--device", "cpu", cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.returncode, folder / "demo", done.stdout


def printed_dice(text: str, structure: str) -> float:
    return float(re.search(rf"{structure} Dice ([0-9.]+)", text).group(1))


def test_the_bundled_weights_are_listed_with_the_intended_use():
    manifest = load_manifest(bundled_models_dir())
    assert set(manifest["models"]) == {"liver", "tumor", "refine"}
    assert "train on real data before any other use" in manifest["intended_use"]


def test_the_demo_writes_ct_truth_segmentation_and_picture(demo):
    status, out, _ = demo
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "ct.nii.gz", "segmentation.nii.gz", "truth-vs-segmentation.png", "truth.nii.gz"]


def test_the_demo_prints_the_per_tumor_report(demo):
    assert "Liver volume" in demo[2]


def test_the_bundled_weights_find_the_sample_liver(demo):
    assert printed_dice(demo[2], "liver") >= LIVER_DICE_FLOOR


def test_the_bundled_weights_find_the_sample_tumor(demo):
    assert printed_dice(demo[2], "tumor") >= TUMOR_DICE_FLOOR


def test_the_bundled_refiner_keeps_a_true_tumor_mask(demo):
    out = demo[1]
    ct, truth = read_ct(out / "ct.nii.gz"), sitk.GetArrayFromImage(read_image(out / "truth.nii.gz"))
    refined = Refiner.load(bundled_models_dir(), torch.device("cpu")).refine_all(ct, truth).labels
    assert dice(refined == TUMOR, truth == TUMOR) >= GOOD_MASK_DICE_FLOOR


def test_the_bundled_refiner_restores_the_missing_piece_of_a_cut_tumor():
    case = generate_case(CUT_TUMORS_SEED)
    truth = sitk.GetArrayFromImage(case.labels)
    spacing = case.image.GetSpacing()[::-1]
    refiner = Refiner.load(bundled_models_dir(), torch.device("cpu"))
    tumors = cc3d.connected_components(truth == TUMOR, connectivity=26)
    coarse_dice, refined_dice = [], []
    for number, box in enumerate(ndimage.find_objects(tumors), start=1):
        region = widened_mm(box, 15.0, spacing, truth.shape)
        true_tumor = tumors[region] == number
        coarse, cut = corrupted_map(truth, region, true_tumor, "missing", spacing, np.random.default_rng(0))
        refined = refiner.refine_tumor(case.image, coarse, cut, region).labels
        coarse_dice.append(dice(coarse[region] == TUMOR, true_tumor))  # scored alike: the region's tumor
        refined_dice.append(dice(refined[region] == TUMOR, true_tumor))
    assert np.mean(refined_dice) >= np.mean(coarse_dice) + CUT_TUMOR_DICE_GAIN_FLOOR


def test_the_bundled_weights_fit_the_size_limits():
    models = bundled_models_dir()
    assert (models / "refine.pt").stat().st_size <= 8 * 2 ** 20
    assert sum(path.stat().st_size for path in models.glob("*.pt")) <= 30 * 2 ** 20

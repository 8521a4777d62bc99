"""Boundary refinement: patch geometry, paste-back, and what each kind of click does.

Most tests use stand-in networks whose answer is known, so they test the geometry and the click
rules, not the training: ``Bright`` calls tumor wherever the CT is brighter than 100 HU, ``Echo``
returns the coarse mask it was given. The bundled network is tested in test_bundled_weights.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn

from LiverTumorDARNLib.cli import main
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import write_image
from LiverTumorDARNLib.label_edits import component_at, split_between_clicks, trim_at
from LiverTumorDARNLib.labels import LIVER, TUMOR
from LiverTumorDARNLib.lesion_seeds import LOCAL_SEED_MM, SEED_RADIUS_MM, lesion_seed
from LiverTumorDARNLib.models import build_model
from LiverTumorDARNLib.patches import (MIN_SPACING_MM, PATCH_SIZE, RELATIVE_HU_SCALE, Click, click_maps, index_bounds,
                                       liver_hu, patch_around, patch_inputs, patch_to_region)
from LiverTumorDARNLib.pipeline import load_stages
from LiverTumorDARNLib.refine import LIVER_REACH_MM, Refiner
from LiverTumorDARNLib.regions import ball, on_region
from LiverTumorDARNLib.training import refine_task
from LiverTumorDARNLib.training.checkpoints import save_checkpoint
from LiverTumorDARNLib.training.refine_task import CORRUPTIONS, corrupt, draw_sample, make_scan
from LiverTumorDARNLib.weights import export_checkpoint, load_model

LIVER_HU, TUMOR_HU = 60, 160
CPU = torch.device("cpu")
FLIPS = {"identity": (1, 0, 0, 0, 1, 0, 0, 0, 1), "flipped": (-1, 0, 0, 0, 1, 0, 0, 0, -1)}


class Bright(nn.Module):
    """Tumor wherever the CT is more than 50 HU above the liver (relative: (HU - liver) / 50 > 1),
    whatever the coarse mask says (no mask term in its logits)."""

    mask_prior = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tumor = (x[:, :1] - 1) * 20
        return torch.cat([torch.zeros_like(tumor), tumor], 1)


class Echo(nn.Module):
    """Gives back the coarse mask: its logits are the mask term alone (+/- ``mask_prior``) and
    correct nothing."""

    mask_prior = 10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tumor = (x[:, 1:2] - 0.5) * 2 * self.mask_prior
        return torch.cat([torch.zeros_like(tumor), tumor], 1)


def scan(tumors_ijk_mm, direction=FLIPS["identity"], spacing=(0.8, 0.8, 2.5), size=(48, 48, 20)):
    """A liver filling the volume but a 2-voxel rim, bright spherical tumors at (i, j, k) with radius mm."""
    labels = np.zeros(size[::-1], np.uint8)
    labels[:, 2:-2, 2:-2] = LIVER
    k, j, i = np.indices(labels.shape)
    for (ci, cj, ck), radius in tumors_ijk_mm:
        distance = np.sqrt(((i - ci) * spacing[0]) ** 2 + ((j - cj) * spacing[1]) ** 2 + ((k - ck) * spacing[2]) ** 2)
        labels[(distance <= radius) & (labels > 0)] = TUMOR
    hu = np.choose(labels, [-1000, LIVER_HU, TUMOR_HU]).astype(np.int16)
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing(spacing)
    ct.SetDirection(direction)
    ct.SetOrigin((12.0, -40.0, 100.0))
    return ct, labels


def shrunk(labels: np.ndarray) -> np.ndarray:
    """The label map with every tumor's outer layer given to the liver: a coarse mask to refine."""
    coarse = labels.copy()
    coarse[(labels == TUMOR) & ~ndimage.binary_erosion(labels == TUMOR, np.ones((1, 3, 3)))] = LIVER
    return coarse


def with_hu(ct: sitk.Image, hu: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.CopyInformation(ct)
    return image


def on_whole_volume(mask: np.ndarray, box, labels: np.ndarray) -> np.ndarray:
    return on_region(mask, box, tuple(slice(0, n) for n in labels.shape))


class Nothing(nn.Module):
    """Background everywhere, whatever the coarse mask and the CT say."""

    mask_prior = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        background = torch.full_like(x[:, :1], 20.0)
        return torch.cat([background, -background], 1)


class Recorder(Echo):
    """:class:`Echo` that keeps every input it is given."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return super().forward(x)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_patch_is_an_isotropic_cube_centred_on_the_tumor():
    ct, _ = scan([], direction=FLIPS["flipped"])
    patch = patch_around(ct, [20, 20, 8], [26, 24, 10])
    assert patch.grid.GetSize() == (PATCH_SIZE,) * 3
    assert len(set(patch.grid.GetSpacing())) == 1 and patch.grid.GetSpacing()[0] >= MIN_SPACING_MM
    centre = patch.grid.TransformContinuousIndexToPhysicalPoint([(PATCH_SIZE - 1) / 2] * 3)
    np.testing.assert_allclose(centre, ct.TransformContinuousIndexToPhysicalPoint([23, 22, 9]), atol=1e-6)


def test_patch_region_stops_at_the_volume_border():
    ct, _ = scan([])
    patch = patch_around(ct, [0, 0, 0], [3, 3, 1])
    assert all(s.start == 0 for s in patch.region)
    assert all(s.stop <= n for s, n in zip(patch.region, ct.GetSize()[::-1]))


@pytest.mark.parametrize("flip", sorted(FLIPS))
@pytest.mark.parametrize("spacing", [(0.8, 0.8, 2.5), (0.7, 1.1, 0.9)])
def test_a_mask_the_network_does_not_correct_comes_back_voxel_for_voxel(flip, spacing):
    ct, labels = scan([((24, 22, 10), 6.0), ((36, 36, 14), 1.5)], FLIPS[flip], spacing)
    change = Refiner(Echo(), torch.device("cpu")).refine_all(ct, labels)
    np.testing.assert_array_equal(change.labels, labels)


@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_the_patch_sees_the_image_where_the_volume_has_it(flip):
    ct, labels = scan([((24, 22, 10), 6.0)], FLIPS[flip])
    patch = patch_around(ct, [20, 18, 8], [28, 26, 12])
    inputs = patch_inputs(ct, labels[patch.region] == TUMOR, patch, liver_hu(ct, labels))
    middle = PATCH_SIZE // 2
    assert inputs[0][middle, middle, middle] == pytest.approx((TUMOR_HU - LIVER_HU) / RELATIVE_HU_SCALE, abs=0.05)
    assert inputs[1][middle, middle, middle] == pytest.approx(1.0)


def test_refinement_changes_nothing_outside_the_patch():
    ct, labels = scan([((14, 14, 6), 4.0), ((36, 36, 14), 4.0)])
    coarse = shrunk(labels)
    change = Refiner(Bright(), torch.device("cpu")).click(ct, coarse, (14, 14, 6))
    differs = change.labels != coarse
    inside = np.zeros_like(differs)
    inside[change.box] = True
    assert differs.any() and not (differs & ~inside).any()
    np.testing.assert_array_equal(change.labels[14:, 30:, 30:], coarse[14:, 30:, 30:])  # the other tumor


def test_a_speck_the_network_adds_is_dropped():
    ct, labels = scan([((24, 22, 10), 4.0), ((33, 22, 10), 1.0)])  # the second: 8 mm^3, a speck
    coarse = shrunk(labels)
    coarse[10, 22, 33] = LIVER
    change = Refiner(Bright(), torch.device("cpu")).click(ct, coarse, (24, 22, 10))
    assert change.labels[10, 22, 24] == TUMOR and change.labels[10, 22, 33] == LIVER


def test_click_on_a_tumor_refines_that_tumor():
    ct, labels = scan([((24, 22, 10), 6.0)])
    coarse = shrunk(labels)
    change = Refiner(Bright(), torch.device("cpu")).click(ct, coarse, (24, 22, 10))
    assert dice(change.labels == TUMOR, labels == TUMOR) > dice(coarse == TUMOR, labels == TUMOR) + 0.05
    assert change.message == "tumor refined"


def test_click_on_the_missed_part_of_a_tumor_grows_that_tumor():
    ct, labels = scan([((24, 22, 10), 6.0)])
    coarse = np.where((labels == TUMOR) & (np.indices(labels.shape)[2] >= 24), LIVER, labels).astype(np.uint8)
    change = Refiner(Echo(), CPU).click(ct, coarse, (27, 22, 10))  # on the half the map misses
    assert change.message == "tumor grown to the click"
    assert dice(change.labels == TUMOR, labels == TUMOR) > 0.9


def test_click_on_a_lesion_the_maps_liver_left_out_adds_it_into_the_liver():
    ct, labels = scan([((24, 22, 10), 6.0)])
    left_out = np.where(labels == TUMOR, 0, labels).astype(np.uint8)  # as the liver stage leaves a large lesion out
    change = Refiner(Bright(), CPU).click(ct, left_out, (24, 22, 10))
    assert change.message == "lesion added"
    assert dice(change.labels == TUMOR, labels == TUMOR) > 0.9


@pytest.mark.parametrize("direction", ["identity", "flipped"])
def test_the_refined_mask_is_the_vote_over_the_whole_patch_region_though_interpolated_on_a_box(direction):
    ct, labels = scan([((24, 22, 10), 5.0)], direction=FLIPS[direction])
    refiner = Refiner(Bright(), CPU)
    tumor = labels == TUMOR
    patch = patch_around(ct, *index_bounds(tumor, tuple(slice(0, n) for n in tumor.shape)))
    coarse = tumor[patch.region]
    correction = np.random.default_rng(0).normal(0.0, 2.0 * refiner.mask_prior, (PATCH_SIZE,) * 3).astype(np.float32)
    correction[:, :, PATCH_SIZE // 2:] = -10.0  # no sample above the prior on one side: a box smaller than the region
    whole = patch_to_region(correction, ct, patch) + refiner.mask_vote(coarse) > 0
    np.testing.assert_array_equal(refiner._vote(correction, coarse, ct, patch), whole)


def test_a_click_the_network_does_not_confirm_still_makes_the_clicked_tissue_tumor():
    ct, labels = scan([((24, 22, 10), 6.0)])
    missed = np.where(labels == TUMOR, LIVER, labels).astype(np.uint8)
    change = Refiner(Nothing(), CPU).click(ct, missed, (24, 22, 10))
    assert change.labels[10, 22, 24] == TUMOR
    assert "the network did not confirm it" in change.message


def test_every_click_on_a_missed_lesion_without_contrast_adds_to_it():
    ct, labels = scan([((24, 22, 10), 8.0)])
    isodense = with_hu(ct, np.where(labels == TUMOR, LIVER_HU, sitk.GetArrayFromImage(ct)))
    missed = np.where(labels == TUMOR, LIVER, labels).astype(np.uint8)
    refiner = Refiner(Echo(), CPU)
    for point in ((24, 22, 10), (30, 22, 10), (18, 22, 10)):  # the second and third at the first one's edge
        change = refiner.click(isodense, missed, point)
        assert change.box is not None and change.labels[point[::-1]] == TUMOR
        missed = change.labels


def test_a_click_on_liver_without_contrast_adds_the_seed_ball_and_says_the_network_did_not_confirm_it():
    ct, labels = scan([])
    change = Refiner(Bright(), CPU).click(ct, labels, (24, 22, 10))
    expected, box = ball((10, 22, 24), SEED_RADIUS_MM, (2.5, 0.8, 0.8), labels.shape)
    assert np.array_equal(change.labels == TUMOR, on_whole_volume(expected, box, labels) & (labels > 0))
    assert change.message == "lesion added as seeded from the click (the network did not confirm it)"


def test_click_on_empty_liver_over_a_missed_tumor_adds_it():
    ct, labels = scan([((24, 22, 10), 6.0)])
    missed = np.where(labels == TUMOR, LIVER, labels).astype(np.uint8)
    change = Refiner(Bright(), torch.device("cpu")).click(ct, missed, (24, 22, 10))
    assert change.message == "lesion added"
    assert dice(change.labels == TUMOR, labels == TUMOR) > 0.9


@pytest.mark.parametrize("contrast_hu", [100, -50])
def test_a_new_lesion_starts_from_the_voxels_of_its_contrast(contrast_hu):
    ct, labels = scan([((24, 22, 10), 6.0)])
    ct = with_hu(ct, np.where(labels == TUMOR, LIVER_HU + contrast_hu, sitk.GetArrayFromImage(ct)))
    missed = np.where(labels == TUMOR, LIVER, labels).astype(np.uint8)
    seed, box = lesion_seed(ct, missed, (10, 22, 24), LIVER_HU)
    assert dice(on_whole_volume(seed, box, labels), labels == TUMOR) > 0.9


def test_a_new_lesion_seed_is_cut_off_where_it_leaks_into_a_vessel_thinner_than_the_lesion():
    ct, labels = scan([((60, 60, 60), 12.0)], spacing=(1.0, 1.0, 1.0), size=(120, 120, 120))
    k, j, i = np.indices(labels.shape)
    vessel = (np.hypot(k - 60, j - 60) <= 6.0) & (i >= 60)  # 12 mm wide, out of the seed's reach
    missed = np.where(labels == TUMOR, LIVER, labels).astype(np.uint8)
    seed, box = lesion_seed(with_hu(ct, np.where(vessel, TUMOR_HU, sitk.GetArrayFromImage(ct))), missed, (60, 60, 60),
                            LIVER_HU)
    assert dice(on_whole_volume(seed, box, labels), labels == TUMOR) > 0.9


def test_a_new_lesion_seed_has_no_holes():
    ct, labels = scan([((24, 22, 10), 8.0)], spacing=(0.8, 0.8, 0.8), size=(48, 48, 24))
    k, j, i = np.indices(labels.shape)
    core = np.sqrt((i - 24) ** 2 + (j - 22) ** 2 + (k - 10) ** 2) * 0.8 <= 3.0  # liver-like centre of a target lesion
    missed = np.where(labels == TUMOR, LIVER, labels).astype(np.uint8)
    hu = np.where(core, LIVER_HU, sitk.GetArrayFromImage(ct))
    seed, box = lesion_seed(with_hu(ct, hu), missed, (10, 22, 24 + 7), LIVER_HU)  # on the ring, 5.6 mm out
    assert on_whole_volume(seed, box, labels)[core].all()


def test_a_click_whose_contrast_reaches_everywhere_seeds_the_part_of_it_near_the_click():
    ct, labels = scan([], spacing=(1.0, 1.0, 1.0), size=(160, 160, 60))
    k, j, i = np.indices(labels.shape)
    band = (i >= 60) & (i < 100) & (labels > 0)  # hypodense across the liver: no opening encloses it
    seed, box = lesion_seed(with_hu(ct, np.where(band, LIVER_HU - 60, sitk.GetArrayFromImage(ct))), labels,
                            (30, 80, 80), LIVER_HU)
    seeded = on_whole_volume(seed, box, labels)
    distance_mm = np.sqrt((k - 30) ** 2 + (j - 80) ** 2 + (i - 80) ** 2)
    assert band[seeded].all()
    assert seeded[band & (distance_mm <= LOCAL_SEED_MM - 5)].all() and (distance_mm[seeded] <= LOCAL_SEED_MM + 5).all()  # 2 mm blocks


def test_a_click_on_a_small_lesion_at_the_liver_surface_seeds_the_lesion_not_the_fat_around_it():
    ct, labels = scan([], spacing=(0.8, 0.8, 0.8), size=(60, 48, 40))
    labels[:, :, 30:] = 0  # fat beyond the liver's surface at i = 30
    k, j, i = np.indices(labels.shape)
    lesion = np.sqrt((i - 30) ** 2 + (j - 24) ** 2 + (k - 20) ** 2) * 0.8 <= 2.0  # most of a 3 mm ball around it is fat
    hu = np.where(labels > 0, LIVER_HU, -100)
    hu[lesion] = LIVER_HU - 40
    seed, box = lesion_seed(with_hu(ct, hu), labels, (20, 24, 31), LIVER_HU)
    seeded = on_whole_volume(seed, box, labels)
    assert seeded[lesion].all() and seeded.sum() <= ball((20, 24, 31), SEED_RADIUS_MM, (0.8,) * 3, labels.shape)[0].sum()


def test_a_click_without_contrast_seeds_a_ball():
    ct, labels = scan([])
    seed, box = lesion_seed(ct, labels, (10, 22, 24), LIVER_HU)
    expected, expected_box = ball((10, 22, 24), SEED_RADIUS_MM, (2.5, 0.8, 0.8), labels.shape)
    assert box == expected_box and np.array_equal(seed, expected)


def test_a_lesion_larger_than_the_first_patch_is_followed_to_its_edge():
    ct, labels = scan([((24, 24, 10), 15.0)], spacing=(0.8, 0.8, 0.8), size=(60, 60, 40))
    missed = np.where(labels == TUMOR, LIVER, labels).astype(np.uint8)
    change = Refiner(Bright(), torch.device("cpu")).click(ct, missed, (24, 24, 10))
    assert dice(change.labels == TUMOR, labels == TUMOR) > 0.9


def test_tumor_at_the_volume_border_is_refined():
    ct, labels = scan([((46, 24, 10), 6.0)])  # touches the volume's last i column's neighbourhood
    coarse = shrunk(labels)
    change = Refiner(Bright(), torch.device("cpu")).click(ct, coarse, (44, 24, 10))
    assert dice(change.labels == TUMOR, labels == TUMOR) > dice(coarse == TUMOR, labels == TUMOR)


def test_negative_click_on_a_tumor_removes_it_and_gives_it_to_the_liver():
    ct, labels = scan([((14, 14, 6), 4.0), ((36, 36, 14), 4.0)])
    change = Refiner(Bright(), torch.device("cpu")).click(ct, labels, (14, 14, 6), positive=False)
    assert change.message == "tumor removed"
    assert not (change.labels[:, :25, :25] == TUMOR).any()
    assert (change.labels[labels == TUMOR][:1] == LIVER).all() or (change.labels[5:8, 12:17, 12:17] == LIVER).all()
    assert (change.labels[14, 36, 36] == TUMOR)  # the other tumor stays


def test_negative_click_on_false_tissue_grown_onto_a_tumor_removes_it_and_keeps_the_tumor():
    ct, labels = scan([((24, 22, 15), 5.0)], spacing=(0.8, 0.8, 0.8), size=(48, 48, 30))
    true = labels == TUMOR
    grown = ndimage.distance_transform_edt(~true, sampling=0.8) <= 3.0  # 3 mm of parenchyma taken in
    coarse = np.where(grown & (labels > 0), TUMOR, labels).astype(np.uint8)
    change = Refiner(Bright(), CPU).click(ct, coarse, (24 + 8, 22, 15), positive=False)  # 6.4 mm out: in the false rim
    assert change.message == "false part removed"
    assert dice(change.labels == TUMOR, true) > 0.9


def test_negative_click_on_a_speck_of_tumor_hu_in_false_tissue_removes_the_false_tissue():
    ct, labels = scan([((24, 22, 15), 5.0)], spacing=(0.8, 0.8, 0.8), size=(48, 48, 30))
    true = labels == TUMOR
    grown = ndimage.distance_transform_edt(~true, sampling=0.8) <= 3.0
    coarse = np.where(grown & (labels > 0), TUMOR, labels).astype(np.uint8)
    hu = sitk.GetArrayFromImage(ct)
    hu[14:17, 21:24, 31:34] = TUMOR_HU  # a bright vessel's cross-section in the false rim, clicked on
    change = Refiner(Bright(), CPU).click(with_hu(ct, hu), coarse, (32, 22, 15), positive=False)
    assert change.message == "false part removed"
    assert dice(change.labels == TUMOR, true) > 0.9


def test_negative_click_at_the_edge_of_a_two_tissue_tumor_keeps_its_core():
    ct, labels = scan([((24, 22, 15), 8.0)], spacing=(0.8, 0.8, 0.8), size=(48, 48, 30))
    hu = sitk.GetArrayFromImage(ct)
    cap = (labels == TUMOR) & (np.indices(labels.shape)[2] < 24 - 3)  # a darker cap on one side, 5.6 mm thick
    hu[cap] = LIVER_HU - 40
    change = Refiner(Bright(), CPU).click(with_hu(ct, hu), labels, (24 + 8, 22, 15), positive=False)  # 6.4 mm out
    assert change.message == "false part removed"
    assert change.labels[15, 22, 24 + 8] == LIVER and change.labels[15, 22, 24] == TUMOR and (change.labels[cap] == TUMOR).all()


def test_negative_click_on_an_offshoot_trims_it_and_keeps_the_body():
    body = np.zeros((30, 40, 60), bool)
    k, j, i = np.indices(body.shape)
    body |= (i - 20) ** 2 + (j - 20) ** 2 + (k - 15) ** 2 <= 10 ** 2
    leak = (abs(j - 20) <= 1) & (abs(k - 15) <= 1) & (i >= 20) & (i <= 50)  # a thin finger to the right
    kept = trim_at(body | leak, (15, 20, 45), (1.0, 1.0, 1.0))
    assert kept[15, 20, 20] and not kept[15, 20, 45]
    assert (kept & body).sum() >= 0.98 * body.sum()


def test_a_negative_click_keeps_the_part_of_a_tumor_an_earlier_positive_click_marked():
    ct, labels = scan([((24, 22, 10), 6.0)])  # one compact tumor: a negative click alone removes it whole
    earlier = [((19, 22, 10), True)]
    change = Refiner(Bright(), CPU).click(ct, labels, (29, 22, 10), positive=False, earlier=earlier)
    assert change.message == "false part removed up to your earlier positive click"
    assert change.labels[10, 22, 19] == TUMOR and change.labels[10, 22, 29] == LIVER


def test_the_tumor_at_a_voxel_is_found_whole_however_far_it_reaches_from_it():
    labels = np.zeros((40, 60, 300), np.uint8)
    labels[10:30, 20:40, 5:290] = TUMOR  # from the seed at one end to 285 voxels beyond
    labels[10:30, 45:50, 5:290] = TUMOR  # another tumor beside it, not joined
    mask, box = component_at(labels, (20, 30, 6))
    assert box == (slice(10, 30), slice(20, 40), slice(5, 290)) and mask.all()


def test_a_click_changes_only_the_voxels_nearer_it_than_an_earlier_opposite_click_in_its_piece():
    piece = np.ones((1, 1, 10), bool)
    region = (slice(0, 1), slice(0, 1), slice(100, 110))
    part = split_between_clicks(piece, region, (0, 0, 101), [(0, 0, 107)], (1.0, 1.0, 1.0))
    assert part.ravel().tolist() == [True] * 4 + [False] * 6  # x 100..103 are nearer 101 than 107


def test_an_earlier_opposite_click_outside_the_piece_leaves_it_whole():
    piece = np.zeros((1, 1, 10), bool)
    piece[..., :5] = True
    region = (slice(0, 1), slice(0, 1), slice(100, 110))
    part = split_between_clicks(piece, region, (0, 0, 101), [(0, 0, 107), (0, 0, 300)], (1.0, 1.0, 1.0))
    assert np.array_equal(part, piece)


def test_negative_click_far_from_any_tumor_changes_nothing():
    ct, labels = scan([((14, 14, 6), 4.0)])
    change = Refiner(Bright(), torch.device("cpu")).click(ct, labels, (40, 40, 15), positive=False)
    assert change.box is None and change.labels is labels


def test_refine_all_refines_every_tumor():
    ct, labels = scan([((14, 14, 6), 4.5), ((34, 34, 14), 4.5)])
    coarse = shrunk(labels)
    change = Refiner(Bright(), torch.device("cpu")).refine_all(ct, coarse)
    assert change.message == "2 tumors refined"
    for window in (np.s_[:10, :25, :25], np.s_[10:, 25:, 25:]):
        assert dice(change.labels[window] == TUMOR, labels[window] == TUMOR) > dice(coarse[window] == TUMOR, labels[window] == TUMOR)


def test_an_edit_never_modifies_the_map_it_was_given():
    ct, labels = scan([((24, 22, 10), 6.0)])
    coarse = shrunk(labels)
    before = coarse.copy()
    Refiner(Bright(), torch.device("cpu")).click(ct, coarse, (24, 22, 10))
    np.testing.assert_array_equal(coarse, before)


def test_click_outside_the_volume_is_an_input_error():
    ct, labels = scan([])
    with pytest.raises(InputError, match="outside the volume"):
        Refiner(Bright(), torch.device("cpu")).click(ct, labels, (48, 0, 0))


def test_a_label_map_on_another_grid_is_refused_before_anything_changes():
    ct, labels = scan([((24, 22, 10), 6.0)])
    with pytest.raises(InputError, match="not on the CT's grid"):
        Refiner(Bright(), CPU).click(ct, np.ascontiguousarray(labels[:, :, :-1]), (24, 22, 10))


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("where, point, what", [("air", (0, 22, 10), "on air or lung"),
                                                ("bone", (40, 40, 15), "on bone")])
def test_a_click_on_air_or_bone_changes_nothing_and_says_so(where, point, what, positive):
    ct, labels = scan([((24, 22, 10), 6.0)])
    hu = sitk.GetArrayFromImage(ct)
    hu[12:18, 36:44, 36:44] = 1200  # a piece of rib over the liver
    change = Refiner(Bright(), CPU).click(with_hu(ct, hu), labels, point, positive)
    assert change.box is None and change.labels is labels
    assert what in change.message and "nothing changed" in change.message


def test_a_positive_click_far_from_the_liver_adds_nothing_and_says_so():
    ct, labels = scan([], size=(96, 48, 20))
    labels[:, :, 40:] = 0  # soft tissue, not liver, beyond i = 40
    soft_tissue = with_hu(ct, np.where(np.indices(labels.shape)[2] >= 40, 40, sitk.GetArrayFromImage(ct)))
    change = Refiner(Bright(), CPU).click(soft_tissue, labels, (90, 22, 10))
    assert change.box is None and change.labels is labels
    assert change.message == f"the click is more than {LIVER_REACH_MM:.0f} mm from the liver: no lesion added"


# ------------------------------------------------------------------ the refine command


@pytest.fixture
def case_files(tmp_path):
    ct, labels = scan([((24, 22, 10), 6.0)], FLIPS["flipped"])
    mask = sitk.GetImageFromArray(shrunk(labels))
    mask.CopyInformation(ct)
    return write_image(ct, tmp_path / "ct.nii.gz"), write_image(mask, tmp_path / "coarse.nii.gz")


def refine_command(ct, mask, output, models_dir, *extra) -> int:
    return main(["refine", str(ct), "--mask", str(mask), "-o", str(output), "--models", str(models_dir),
                 "--device", "cpu", *extra])


def test_refine_command_writes_the_corrected_map_on_the_ct_grid(case_files, models_dir, tmp_path, capsys):
    ct, mask = case_files
    assert refine_command(ct, mask, tmp_path / "refined.nii.gz", models_dir, "--click", "24,22,10") == 0
    out = capsys.readouterr().out
    assert "tumor refined" in out and "wrote" in out
    written, source = sitk.ReadImage(str(tmp_path / "refined.nii.gz")), sitk.ReadImage(str(ct))
    assert written.GetSize() == source.GetSize() and written.GetDirection() == source.GetDirection()
    assert set(np.unique(sitk.GetArrayViewFromImage(written))) <= {0, 1, 2}


def test_refine_command_says_when_a_negative_click_found_no_tumor(case_files, models_dir, tmp_path, capsys):
    ct, mask = case_files
    assert refine_command(ct, mask, tmp_path / "refined.nii.gz", models_dir, "--negative", "40,40,15") == 0
    assert "no tumor at the click: nothing to remove" in capsys.readouterr().out
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "refined.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(mask))))


def test_refine_command_says_why_a_click_on_air_changed_nothing(case_files, models_dir, tmp_path, capsys):
    ct, mask = case_files
    assert refine_command(ct, mask, tmp_path / "refined.nii.gz", models_dir, "--click", "0,22,10") == 0
    assert re.search(r"the click is on air or lung \(-\d+ HU\): nothing changed", capsys.readouterr().out)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "refined.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(mask))))


def test_refine_command_without_clicks_refines_every_tumor(case_files, models_dir, tmp_path, capsys):
    ct, mask = case_files
    assert refine_command(ct, mask, tmp_path / "refined.nrrd", models_dir) == 0
    assert "1 tumor refined" in capsys.readouterr().out


def test_refine_command_keeps_an_existing_output(case_files, models_dir, tmp_path, capsys):
    ct, mask = case_files
    existing = tmp_path / "refined.nii.gz"
    existing.write_bytes(b"the user's file")
    assert refine_command(ct, mask, existing, models_dir) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_bytes() == b"the user's file"


def test_refine_command_refuses_a_mask_on_another_grid(case_files, models_dir, tmp_path, capsys):
    ct, _ = case_files
    other = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    mask = write_image(other, tmp_path / "other.nii.gz")
    assert refine_command(ct, mask, tmp_path / "refined.nii.gz", models_dir) == 2
    assert "not on the CT's voxel grid" in capsys.readouterr().err
    assert not (tmp_path / "refined.nii.gz").exists()


def test_refine_command_refuses_a_click_outside_the_volume(case_files, models_dir, tmp_path, capsys):
    ct, mask = case_files
    assert refine_command(ct, mask, tmp_path / "refined.nii.gz", models_dir, "--click", "480,2,2") == 2
    assert "outside the volume" in capsys.readouterr().err
    assert not (tmp_path / "refined.nii.gz").exists()


def test_a_click_that_is_not_three_integers_is_a_usage_error(case_files, models_dir, tmp_path):
    ct, mask = case_files
    with pytest.raises(SystemExit) as exit_:
        refine_command(ct, mask, tmp_path / "refined.nii.gz", models_dir, "--click", "4,5")
    assert exit_.value.code == 2


# ------------------------------------------------------------------ the network


def test_the_image_channel_is_the_ct_relative_to_the_liver():
    ct, labels = scan([((24, 22, 10), 6.0)])
    brighter = sitk.Cast(ct, sitk.sitkInt16) + 40  # another scanner, phase or patient: all 40 HU up
    patch = patch_around(ct, [20, 18, 8], [28, 26, 12])
    tumor = labels[patch.region] == TUMOR
    np.testing.assert_allclose(patch_inputs(brighter, tumor, patch, liver_hu(brighter, labels)),
                               patch_inputs(ct, tumor, patch, liver_hu(ct, labels)), atol=1e-5)


def test_an_untrained_refinement_network_gives_back_the_coarse_mask():
    torch.manual_seed(0)
    network = build_model({"architecture": "refine", "widths": (4, 8, 16)}).eval()
    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[..., 4:11, 3:9, 5:12] = 1
    with torch.inference_mode():
        tumor = network(torch.cat([torch.randn_like(mask), mask], 1)).argmax(1, keepdim=True)
    assert (tumor == mask).float().mean() > 0.99


def test_a_network_that_takes_clicks_is_given_them_after_the_image_and_the_mask():
    ct, labels = scan([((24, 22, 10), 6.0)])
    network = Recorder()
    Refiner(network, CPU, takes_clicks=True).click(ct, shrunk(labels), (24, 22, 10), earlier=[((30, 22, 10), False)])
    inputs = network.inputs[0][0]
    assert inputs.shape[0] == 4
    assert inputs[2].max() > 0.5 and inputs[3].max() > 0.5  # this click, the earlier one


def test_a_network_without_click_channels_is_given_the_image_and_the_mask_only():
    ct, labels = scan([((24, 22, 10), 6.0)])
    network = Recorder()
    Refiner(network, CPU).click(ct, shrunk(labels), (24, 22, 10), earlier=[((30, 22, 10), False)])
    assert network.inputs[0].shape[1] == 2


@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_a_click_map_peaks_at_the_click_on_the_patch_grid(flip):
    ct, _ = scan([], direction=FLIPS[flip])
    patch = patch_around(ct, [20, 18, 8], [28, 26, 12])
    maps = click_maps(ct, patch, [Click((10, 20, 26), positive=False)])
    at = patch.grid.TransformPhysicalPointToIndex(ct.TransformIndexToPhysicalPoint((26, 20, 10)))
    assert np.unravel_index(np.argmax(maps[1]), maps[1].shape) == tuple(at[::-1])
    assert maps[0].max() == 0


def export_refiner(folder, **model) -> None:
    """A random refinement network of ``model``'s arguments exported into ``folder`` as training does."""
    config = {"architecture": "refine", "widths": (4, 8), **model}
    checkpoint = save_checkpoint({"model": build_model(config).state_dict(), "model_config": config,
                                  "stage": {"name": "refine", "patch_size": [32] * 3, "num_classes": 2}},
                                 folder / "checkpoint.pt")
    export_checkpoint(checkpoint, folder)


@pytest.mark.parametrize("in_channels", [2, 4])
def test_a_loaded_refiner_answers_as_its_exported_network_does(tmp_path, in_channels):
    torch.manual_seed(0)
    export_refiner(tmp_path, in_channels=in_channels)
    inputs = torch.randn(1, in_channels, 32, 32, 32)
    with torch.inference_mode():
        exported = load_model(tmp_path, "refine")[0](inputs)
        torch.testing.assert_close(Refiner.load(tmp_path, "cpu").model(inputs), exported, atol=1e-4, rtol=1e-4)


def test_refine_weights_that_declare_click_channels_take_clicks(tmp_path):
    export_refiner(tmp_path, in_channels=4)
    assert Refiner.load(tmp_path, "cpu").takes_clicks


def test_the_bundled_two_channel_refiner_takes_no_clicks():
    assert not Refiner.load(device="cpu").takes_clicks


def test_refine_weights_whose_manifest_misstates_their_channels_are_refused(tmp_path):
    export_refiner(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["models"]["refine"]["model"]["in_channels"] = 4
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="takes 2 input channels and its manifest entry declares 4"):
        Refiner.load(tmp_path, "cpu")


# ------------------------------------------------------------------ training samples


@pytest.mark.parametrize("kind", [kind for kind in CORRUPTIONS if kind not in ("darn", "click", "false")])
def test_each_corruption_gives_a_wrong_mask_inside_the_liver(kind):
    _, labels = scan([((24, 22, 14), 6.0)], spacing=(0.8, 0.8, 0.8), size=(48, 48, 30))
    truth, organ = labels == TUMOR, labels > 0
    coarse = corrupt(truth, organ, kind, (0.8, 0.8, 0.8), np.random.default_rng(1))
    assert coarse.any() and not (coarse & ~organ).any()
    assert np.array_equal(coarse, truth) == (kind == "good")


def test_training_samples_are_cut_by_the_inference_patch_code(models_dir):
    ct, labels = scan([((24, 22, 10), 6.0)])
    truth = sitk.GetImageFromArray(labels)
    truth.CopyInformation(ct)
    training_scan = make_scan(ct, truth, load_stages(models_dir, torch.device("cpu")))
    rng = np.random.default_rng(0)
    samples = [sample for sample in (draw_sample(training_scan, rng) for _ in range(30)) if sample is not None]
    assert samples
    for inputs, target in samples:
        assert inputs.shape == (2, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE) and target.shape == (PATCH_SIZE,) * 3
    with_tumor = [(inputs, target) for inputs, target in samples if target.any()]
    inputs, target = with_tumor[0]
    assert inputs[0][target.astype(bool)].mean() == pytest.approx((TUMOR_HU - LIVER_HU) / RELATIVE_HU_SCALE, abs=10 / RELATIVE_HU_SCALE)


def test_a_click_sample_starts_from_the_seed_a_click_on_the_missed_tumor_grows(monkeypatch):
    ct, labels = scan([((24, 22, 10), 6.0)])
    truth = sitk.GetImageFromArray(labels)
    truth.CopyInformation(ct)
    monkeypatch.setattr(refine_task, "CORRUPTIONS", ("click",))
    inputs, target = draw_sample(make_scan(ct, truth, stages=None), np.random.default_rng(0))
    assert dice(inputs[1] > 0.5, target.astype(bool)) > 0.9  # a bright tumor's seed is the tumor


def truth_scan(tumors_ijk_mm, **geometry) -> refine_task.Scan:
    ct, labels = scan(tumors_ijk_mm, **geometry)
    truth = sitk.GetImageFromArray(labels)
    truth.CopyInformation(ct)
    return make_scan(ct, truth, stages=None)


def click_samples(kind: str, monkeypatch, count: int = 12) -> list[tuple[np.ndarray, np.ndarray]]:
    monkeypatch.setattr(refine_task, "CORRUPTIONS", (kind,))
    training_scan = truth_scan([((24, 22, 15), 6.0)], spacing=(0.8, 0.8, 0.8), size=(48, 48, 30))
    rng = np.random.default_rng(0)
    return [draw_sample(training_scan, rng, with_clicks=True) for _ in range(count)]


@pytest.mark.parametrize("kind, channel, error", [("erode", 2, "missed"), ("dilate", 3, "false")])
def test_simulated_clicks_land_on_the_masks_errors(kind, channel, error, monkeypatch):
    clicked = 0
    for inputs, target in click_samples(kind, monkeypatch):
        assert inputs.shape == (4, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)
        peaks = inputs[channel] > 0.99
        if inputs[channel].max() < 0.5 or inputs[5 - channel].max() > 0:  # no click, or a click on a right part too
            continue
        coarse, true = inputs[1][peaks] > 0.5, target[peaks] == 1
        assert (true & ~coarse).all() if error == "missed" else (coarse & ~true).all()
        clicked += 1
    assert clicked


def test_a_good_mask_gets_no_click_on_an_error(monkeypatch):
    for inputs, target in click_samples("good", monkeypatch):
        assert inputs[3].max() == 0
        assert (target[inputs[2] > 0.99] == 1).all()


def test_a_click_sample_has_the_click_its_seed_grew_from_in_the_positive_channel(monkeypatch):
    for inputs, target in click_samples("click", monkeypatch, count=4):
        assert inputs[2].max() > 0.5 and target[np.unravel_index(np.argmax(inputs[2]), target.shape)] == 1


def test_a_scan_that_darn_did_not_segment_offers_no_darn_masks(monkeypatch):
    ct, labels = scan([((24, 22, 10), 6.0)])
    truth = sitk.GetImageFromArray(labels)
    truth.CopyInformation(ct)
    monkeypatch.setattr(refine_task, "CORRUPTIONS", ("darn",))
    assert draw_sample(make_scan(ct, truth, stages=None), np.random.default_rng(0)) is None

"""The cascade's plumbing: grids, crops, sliding windows, pasting back, post-processing, report.

The networks here are tiny TorchScript stand-ins that threshold intensity, so every test checks
geometry and bookkeeping, independent of trained weights.
"""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import to_canonical
from LiverTumorDARNLib.labels import TUMOR
from LiverTumorDARNLib.metrics import dice
from LiverTumorDARNLib.phantom import generate_case
from LiverTumorDARNLib.pipeline import (ORGAN_GATE_MM, STAGES, Stage, drop_unconfident_tumors, gaussian_importance, load_stages,
                                        postprocess, prepare_case, segment, sliding_window, working_grid)
from LiverTumorDARNLib.report import longest_axial_diameter, measure

LIVER_HU, TUMOR_HU, SURROUNDINGS_HU = 120, 30, 400  # surroundings bright: no ramp crosses tumor HU


class LiverByIntensity(torch.nn.Module):
    """Stage 1 stand-in: liver (with tumors) is whatever is darker than the surroundings."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        liver = (x < 1.8).float()
        return torch.cat([1 - liver, liver], dim=1) * 10


class TumorByIntensity(torch.nn.Module):
    """Stage 2 stand-in: tumor below 80 HU, liver below the surroundings, else background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tumor = (x < 0.3).float()
        liver = (x < 1.8).float() - tumor
        return torch.cat([1 - tumor - liver, liver, tumor], dim=1) * 10


def stages() -> tuple[Stage, Stage]:
    return (Stage(torch.jit.script(LiverByIntensity()), STAGES["liver"]),
            Stage(torch.jit.script(TumorByIntensity()), STAGES["tumor"]))


def sphere_scan(orientation: str) -> tuple[sitk.Image, np.ndarray]:
    """An anisotropic scan with a 'liver' sphere holding a 'tumor' sphere, stored in ``orientation``."""
    size_zyx, spacing_xyz = (40, 90, 100), (1.6, 1.6, 3.0)
    z, y, x = np.indices(size_zyx).astype(float)
    mm = (x * spacing_xyz[0], y * spacing_xyz[1], z * spacing_xyz[2])
    liver = ((mm[0] - 80) ** 2 + (mm[1] - 72) ** 2 + (mm[2] - 60) ** 2) < 45 ** 2
    tumor = ((mm[0] - 95) ** 2 + (mm[1] - 70) ** 2 + (mm[2] - 60) ** 2) < 15 ** 2
    labels = np.where(tumor, 2, np.where(liver, 1, 0)).astype(np.uint8)
    hu = np.choose(labels, [SURROUNDINGS_HU, LIVER_HU, TUMOR_HU]).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin((-30.0, 12.5, -200.0))
    return sitk.DICOMOrient(image, orientation), labels


@pytest.mark.parametrize("orientation", ["LPS", "LAI", "RAS"])
def test_segment_returns_labels_on_the_input_grid_in_every_orientation(orientation):
    ct, truth = sphere_scan(orientation)
    result = segment(ct, *stages(), torch.device("cpu"))
    for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(result.labels, name)() == getattr(ct, name)()
    labels = sitk.GetArrayFromImage(to_canonical(result.labels))
    assert dice(labels > 0, truth > 0) > 0.97
    assert dice(labels == 2, truth == 2) > 0.9


def test_segment_says_so_when_no_liver_is_found():
    class Nothing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.ones_like(x), torch.zeros_like(x)], dim=1)

    ct, _ = sphere_scan("LPS")
    result = segment(ct, Stage(torch.jit.script(Nothing()), STAGES["liver"]), stages()[1], torch.device("cpu"))
    assert not result.liver_found
    assert not sitk.GetArrayViewFromImage(result.labels).any()


def test_the_tumor_stage_marks_no_liver_far_from_the_liver_stage_s_liver():
    """A neighbour organ joined to the liver, liver to the tumor stage but not to the liver stage
    (as the stomach or spleen beside the left lobe can be), is left out beyond the gate."""

    class LiverBelow150HU(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            liver = (x < 1.0).float()
            return torch.cat([1 - liver, liver], dim=1) * 10

    ct, truth = sphere_scan("LPS")
    hu = sitk.GetArrayFromImage(ct)
    z, y, x = np.indices(hu.shape).astype(float)
    neighbour = (x * 1.6 >= 115) & (np.abs(y * 1.6 - 72) < 20) & (np.abs(z * 3.0 - 60) < 20) & (truth == 0)
    hu[neighbour] = 200
    scan = sitk.GetImageFromArray(hu)
    scan.CopyInformation(ct)
    liver_stage = Stage(torch.jit.script(LiverBelow150HU()), STAGES["liver"])
    labels = sitk.GetArrayFromImage(segment(scan, liver_stage, stages()[1], torch.device("cpu")).labels)
    beyond_gate = neighbour & (x * 1.6 > 125 + ORGAN_GATE_MM + 4)
    assert beyond_gate.sum() > 100 and not labels[beyond_gate].any()
    assert dice(labels > 0, truth > 0) > 0.97


def test_working_grid_covers_the_input_extent_at_the_new_spacing():
    image = sitk.Image([100, 80, 30], sitk.sitkInt16)
    image.SetSpacing((0.8, 0.8, 5.0))
    grid = working_grid(image, (4.0, 4.0, 4.0))
    assert grid.GetSize() == (20, 16, 38)
    first_corner_in = np.array(image.GetOrigin()) - 0.5 * np.array(image.GetSpacing())
    first_corner_out = np.array(grid.GetOrigin()) - 0.5 * np.array(grid.GetSpacing())
    assert np.allclose(first_corner_in, first_corner_out)


def test_tumor_stage_crops_to_the_liver_with_its_margin():
    case = generate_case(1, small=True)
    prepared = prepare_case(case.image, case.labels, STAGES["tumor"], liver_box_margin_mm=12.0)
    liver = np.argwhere(prepared.labels > 0)
    margin_voxels = 12.0 / STAGES["tumor"].spacing_mm[0]
    assert (liver.min(0) >= margin_voxels - 2).all()
    assert (np.array(prepared.labels.shape) - 1 - liver.max(0) >= margin_voxels - 2).all()
    assert prepared.image.dtype == np.float32 and prepared.image.shape == prepared.labels.shape


def test_liver_stage_folds_tumor_into_liver():
    case = generate_case(1, small=True)
    prepared = prepare_case(case.image, case.labels, STAGES["liver"])
    assert set(np.unique(prepared.labels)) == {0, 1}


def test_sliding_window_covers_volumes_smaller_and_larger_than_the_patch():
    constant = torch.jit.script(TumorByIntensity())
    for shape in [(20, 30, 40), (70, 65, 130)]:
        image = np.full(shape, -1.0, np.float32)  # tumor everywhere
        probabilities = sliding_window(constant, image, (32, 32, 32), 3, torch.device("cpu"))
        assert probabilities.shape == (3, *shape)
        assert np.allclose(probabilities.sum(0), 1, atol=1e-5)
        assert (probabilities[2] > 0.99).all()


def test_gaussian_importance_trusts_the_window_centre_most():
    weights = gaussian_importance((16, 16, 16))
    assert weights[8, 8, 8] == weights.max() and weights[0, 0, 0] > 0


def test_postprocess_keeps_the_main_liver_and_drops_tumor_specks():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:25, 5:25, 5:20] = 1
    labels[10:15, 10:15, 10:15] = 2  # a real tumor: 125 mm^3
    labels[20, 20, 8] = 2  # a 1 mm^3 speck
    labels[27:29, 27:29, 27:29] = 1  # a separate liver-coloured blob
    cleaned = postprocess(labels, (1.0, 1.0, 1.0))
    assert cleaned[20, 20, 8] == 1 and cleaned[12, 12, 12] == 2
    assert not cleaned[27:29, 27:29, 27:29].any()


def two_tumors_of_differing_confidence() -> tuple[np.ndarray, np.ndarray]:
    labels = np.ones((20, 20, 20), np.uint8)
    labels[2:6, 2:6, 2:6] = labels[12:16, 12:16, 12:16] = 2
    probability = np.zeros(labels.shape, np.float32)
    probability[2:6, 2:6, 2:6], probability[12:16, 12:16, 12:16] = 0.9, 0.6
    return labels, probability


def test_tumors_under_the_confidence_floor_are_given_back_to_the_liver():
    labels, probability = two_tumors_of_differing_confidence()
    drop_unconfident_tumors(labels, probability, 0.75)
    assert (labels[2:6, 2:6, 2:6] == 2).all() and (labels[12:16, 12:16, 12:16] == 1).all()


def test_without_a_confidence_floor_every_tumor_stays():
    labels, probability = two_tumors_of_differing_confidence()
    drop_unconfident_tumors(labels, probability, 0.0)
    assert (labels == 2).sum() == 2 * 4 ** 3


def test_segment_gives_the_tumors_its_network_is_unsure_of_to_the_liver():
    class UnsureTumor(torch.nn.Module):
        """TumorByIntensity with the tumor's logit margin cut to 1.1: tumor probability 0.6."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tumor = (x < 0.3).float()
            liver = (x < 1.8).float() - tumor
            return torch.cat([1 - tumor - liver, liver, tumor * 0.11], dim=1) * 10

    ct, truth = sphere_scan("LPS")
    unsure = torch.jit.script(UnsureTumor())
    kept = segment(ct, stages()[0], Stage(unsure, STAGES["tumor"], 0.5), torch.device("cpu"))
    dropped = segment(ct, stages()[0], Stage(unsure, STAGES["tumor"], 0.75), torch.device("cpu"))
    assert dice(sitk.GetArrayFromImage(to_canonical(kept.labels)) == 2, truth == 2) > 0.9
    labels = sitk.GetArrayFromImage(to_canonical(dropped.labels))
    assert not (labels == 2).any() and dice(labels > 0, truth > 0) > 0.97


def with_tumor_floor(models_dir, folder, value):
    shutil.copytree(models_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["models"]["tumor"]["postprocessing"] = {"min_tumor_confidence": value}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_tumor_confidence_floor_comes_with_the_weights(models_dir, tmp_path):
    liver, tumor = load_stages(with_tumor_floor(models_dir, tmp_path / "models", 0.6), torch.device("cpu"))
    assert (liver.min_tumor_confidence, tumor.min_tumor_confidence) == (0.0, 0.6)


def test_weights_without_a_floor_keep_every_tumor(models_dir):
    assert load_stages(models_dir, torch.device("cpu"))[1].min_tumor_confidence == 0.0


@pytest.mark.parametrize("value", [1.5, -0.1, "high", True])
def test_a_floor_that_is_not_a_probability_is_refused_in_one_line(models_dir, tmp_path, value):
    with pytest.raises(InputError, match="min_tumor_confidence .* is not a probability in \\[0, 1\\)"):
        load_stages(with_tumor_floor(models_dir, tmp_path / "models", value), torch.device("cpu"))


def test_longest_axial_diameter_of_a_disk_is_its_diameter():
    y, x = np.indices((80, 80))
    disk = ((x - 40) ** 2 + (y - 40) ** 2) < 20 ** 2  # radius 20 voxels
    smaller = ((x - 40) ** 2 + (y - 40) ** 2) < 10 ** 2
    mask = np.stack([smaller, disk, smaller])  # the longest slice counts
    assert longest_axial_diameter(mask, (0.5, 0.5)) == pytest.approx(20.0, abs=0.6)  # 40 voxels x 0.5 mm


def test_report_places_a_tumor_at_its_own_voxel_wherever_the_liver_lies_in_the_scan():
    ct = sitk.Image(40, 30, 20, sitk.sitkInt16)
    ct.SetSpacing((0.8, 0.9, 2.0))
    ct.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    ct.SetOrigin((5.0, -7.0, 30.0))
    array = np.zeros((20, 30, 40), np.uint8)
    array[8:14, 10:20, 20:32] = 1  # a liver away from every corner of the volume
    array[10:13, 14:17, 25:28] = 2
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(ct)
    report = measure(ct, labels)
    assert [tumor.centroid_ijk for tumor in report.tumors] == [(26, 15, 11)]
    assert report.tumors[0].centroid_mm == pytest.approx(ct.TransformIndexToPhysicalPoint((26, 15, 11)), abs=0.05)
    assert report.liver_volume_ml == pytest.approx(6 * 10 * 12 * 0.8 * 0.9 * 2.0 / 1000, abs=0.01)


def test_report_measures_the_tumors_of_a_label_map():
    ct, truth = sphere_scan("LAI")
    labels = sitk.GetImageFromArray(truth)
    labels.CopyInformation(to_canonical(ct))
    report = measure(to_canonical(ct), labels)
    assert len(report.tumors) == 1
    tumor = report.tumors[0]
    assert tumor.volume_ml == pytest.approx(4 / 3 * np.pi * 15 ** 3 / 1000, rel=0.05)
    assert tumor.longest_axial_diameter_mm == pytest.approx(30, abs=3.5)
    assert tumor.mean_hu == pytest.approx(TUMOR_HU)
    assert report.tumor_burden_percent == pytest.approx(100 * (15 / 45) ** 3, rel=0.06)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, -1)], ids=["LPS", "RPI"])
def test_tumors_of_equal_size_are_numbered_in_the_canonical_grids_order(direction):
    """Twenty one-voxel and twenty two-voxel tumors along a canonical row: among equals, the one
    nearer the patient's right comes first, however the file stores its axes."""
    canonical = np.zeros((3, 5, 162), np.uint8)
    canonical[1, 2, 2::4] = TUMOR
    canonical[1, 2, 3::8] = TUMOR  # every other tumor grows to two voxels
    labels = sitk.GetImageFromArray(canonical)
    ct = sitk.GetImageFromArray(np.zeros(canonical.shape, np.int16))
    stored_labels, stored_ct = (sitk.DICOMOrient(image, sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        direction)) for image in (labels, ct))
    report = measure(stored_ct, stored_labels)
    by_size = {}
    for tumor in report.tumors:
        by_size.setdefault(tumor.volume_ml, []).append((tumor.id, tumor.centroid_mm[0]))
    assert sorted(len(tumors) for tumors in by_size.values()) == [20, 20]
    for tumors in by_size.values():
        assert [x for _, x in sorted(tumors)] == sorted(x for _, x in tumors)

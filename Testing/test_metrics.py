"""Specification of the LiTS evaluation (LiverTumorDARNLib.metrics).

Arrays are [z, y, x]; spacing is (sx, sy, sz) as SimpleITK reports it.
"""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.metrics import (
    dice,
    evaluate_case,
    evaluate_files,
    format_table,
    match_case_files,
    summarize,
    surface_distances,
)

TUMOR = 2


def box_mask(shape, z, y, x):
    """Boolean mask that is True in the half-open ranges z, y, x."""
    mask = np.zeros(shape, dtype=bool)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return mask


def sphere_mask(shape, center_mm, radius_mm, spacing):
    """Voxels whose centres lie within radius_mm of center_mm; center and spacing in (x, y, z)."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cx, cy, cz = center_mm
    sx, sy, sz = spacing
    return (x * sx - cx) ** 2 + (y * sy - cy) ** 2 + (z * sz - cz) ** 2 <= radius_mm**2


def tumor_map(mask):
    """Label map with the mask as tumor inside a liver that fills the array."""
    return np.where(mask, TUMOR, 1).astype(np.uint8)


def to_image(mask, spacing):
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(spacing)
    return image


# --- Dice -------------------------------------------------------------------------------------


def test_dice_of_identical_masks_is_one():
    mask = box_mask((8, 8, 8), (2, 6), (2, 6), (2, 6))
    assert dice(mask, mask) == 1.0


def test_dice_of_two_empty_masks_is_one():
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert dice(empty, empty) == 1.0


def test_dice_of_shifted_spheres_matches_lens_volume_formula():
    radius, shift, spacing = 10.0, 6.0, (0.5, 0.5, 0.5)
    shape = (56, 56, 56)
    a = sphere_mask(shape, (14.0, 14.0, 14.0), radius, spacing)
    b = sphere_mask(shape, (14.0, 14.0, 14.0 + shift), radius, spacing)
    lens = math.pi * (4 * radius + shift) * (2 * radius - shift) ** 2 / 12
    expected = lens / (4 / 3 * math.pi * radius**3)
    assert dice(a, b) == pytest.approx(expected, abs=0.01)


@settings(max_examples=60, deadline=None)
@given(arrays(bool, (4, 5, 6)), arrays(bool, (4, 5, 6)))
def test_dice_is_symmetric_bounded_and_determines_voe(a, b):
    score = dice(a, b)
    assert score == dice(b, a)
    assert 0.0 <= score <= 1.0
    case = evaluate_case(tumor_map(a), tumor_map(b), (1.0, 1.0, 1.0), "random")
    assert case.voe == pytest.approx(1 - score / (2 - score))


# --- Per-case conventions ---------------------------------------------------------------------


def test_case_without_tumor_in_either_map_scores_one():
    liver = np.ones((6, 6, 6), dtype=np.uint8)
    case = evaluate_case(liver, liver, (1.0, 1.0, 1.0), "no-tumor")
    assert (case.tumor_dice, case.voe) == (1.0, 0.0)


def test_case_with_tumor_in_only_one_map_scores_zero():
    tumor = tumor_map(box_mask((6, 6, 6), (1, 3), (1, 3), (1, 3)))
    liver = np.ones_like(tumor)
    assert evaluate_case(tumor, liver, (1.0, 1.0, 1.0), "missed").tumor_dice == 0.0
    assert evaluate_case(liver, tumor, (1.0, 1.0, 1.0), "false-alarm").tumor_dice == 0.0


def test_voe_and_rvd_of_nested_boxes_have_known_values():
    truth = box_mask((16, 16, 16), (2, 12), (2, 12), (2, 12))  # 1000 voxels
    prediction = box_mask((16, 16, 16), (2, 14), (2, 12), (2, 12))  # 1200 voxels, contains truth
    case = evaluate_case(tumor_map(truth), tumor_map(prediction), (1.0, 1.0, 1.0), "boxes")
    assert case.voe == pytest.approx(1 - 1000 / 1200)
    assert case.rvd == pytest.approx(0.2)


def test_rvd_is_negative_for_under_segmentation():
    truth = box_mask((16, 16, 16), (2, 14), (2, 12), (2, 12))
    prediction = box_mask((16, 16, 16), (2, 8), (2, 12), (2, 12))
    case = evaluate_case(tumor_map(truth), tumor_map(prediction), (1.0, 1.0, 1.0), "under")
    assert case.rvd == pytest.approx(-0.5)


def test_distances_and_rvd_are_nan_when_truth_has_no_tumor():
    liver = np.ones((6, 6, 6), dtype=np.uint8)
    tumor = tumor_map(box_mask((6, 6, 6), (1, 3), (1, 3), (1, 3)))
    case = evaluate_case(liver, tumor, (1.0, 1.0, 1.0), "false-alarm")
    assert math.isnan(case.rvd) and math.isnan(case.assd_mm) and math.isnan(case.mssd_mm)


def test_liver_dice_counts_tumor_as_liver():
    truth = np.zeros((6, 6, 6), dtype=np.uint8)
    truth[1:5, 1:5, 1:5] = 1
    prediction = truth.copy()
    prediction[2:4, 2:4, 2:4] = TUMOR
    assert evaluate_case(truth, prediction, (1.0, 1.0, 1.0), "c").liver_dice == 1.0


def test_volumes_and_tumor_burden_use_physical_spacing():
    truth = np.ones((10, 10, 10), dtype=np.uint8)
    truth[:2, :5, :5] = TUMOR  # 50 of 1000 liver voxels
    case = evaluate_case(truth, truth, (2.0, 2.0, 2.5), "c")  # 10 mm^3 voxels
    assert case.truth_tumor_ml == pytest.approx(0.5)
    assert case.truth_tumor_burden == pytest.approx(0.05)


# --- Surface distances ------------------------------------------------------------------------


def test_surface_distances_of_empty_mask_are_empty():
    mask = box_mask((6, 6, 6), (1, 3), (1, 3), (1, 3))
    a_to_b, b_to_a = surface_distances(mask, np.zeros_like(mask), (1.0, 1.0, 1.0))
    assert a_to_b.size == 0 and b_to_a.size == 0


def test_shift_along_z_is_measured_with_z_spacing():
    spacing = (0.7, 0.9, 2.5)  # (sx, sy, sz): must not be applied to the array's first axis as 0.7
    truth = box_mask((20, 12, 12), (4, 10), (3, 9), (3, 9))
    prediction = box_mask((20, 12, 12), (7, 13), (3, 9), (3, 9))  # shifted by 3 slices
    case = evaluate_case(tumor_map(truth), tumor_map(prediction), spacing, "z-shift")
    assert case.mssd_mm == pytest.approx(3 * 2.5)


def test_mssd_agrees_with_simpleitk_hausdorff_on_anisotropic_spheres():
    spacing = (0.8, 0.6, 2.0)
    shape = (24, 48, 40)
    a = sphere_mask(shape, (16.0, 14.0, 22.0), 9.0, spacing)
    b = sphere_mask(shape, (18.0, 13.0, 26.0), 9.0, spacing)
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(to_image(a, spacing), to_image(b, spacing))
    case = evaluate_case(tumor_map(a), tumor_map(b), spacing, "spheres")
    assert case.mssd_mm == pytest.approx(hausdorff.GetHausdorffDistance(), abs=np.linalg.norm(spacing))


def test_assd_agrees_with_simpleitk_maurer_distance_on_label_contours():
    spacing = (0.8, 0.6, 2.0)
    shape = (24, 48, 40)
    a = sphere_mask(shape, (16.0, 14.0, 22.0), 9.0, spacing)
    b = sphere_mask(shape, (18.0, 13.0, 26.0), 9.0, spacing)

    def contour_and_distance(mask):
        contour = sitk.LabelContour(to_image(mask, spacing))
        distance = sitk.Abs(sitk.SignedMaurerDistanceMap(contour, squaredDistance=False, useImageSpacing=True))
        return sitk.GetArrayFromImage(contour) > 0, sitk.GetArrayFromImage(distance)

    contour_a, distance_a = contour_and_distance(a)
    contour_b, distance_b = contour_and_distance(b)
    expected = np.concatenate([distance_b[contour_a], distance_a[contour_b]]).mean()
    case = evaluate_case(tumor_map(a), tumor_map(b), spacing, "spheres")
    assert case.assd_mm == pytest.approx(expected, rel=1e-3)


def test_surface_distances_do_not_depend_on_empty_margin_around_masks():
    spacing = (1.0, 1.5, 2.0)
    a = box_mask((12, 12, 12), (2, 6), (3, 8), (1, 5))
    b = box_mask((12, 12, 12), (3, 9), (2, 7), (2, 6))
    padded = [np.pad(mask, 10) for mask in (a, b)]
    for small, large in zip(surface_distances(a, b, spacing), surface_distances(*padded, spacing)):
        np.testing.assert_allclose(np.sort(small), np.sort(large))


# --- Lesion detection -------------------------------------------------------------------------


def test_lesion_found_missed_and_false_positive_give_half_recall_and_precision():
    shape = (20, 20, 20)
    found = box_mask(shape, (2, 6), (2, 6), (2, 6))
    missed = box_mask(shape, (12, 16), (12, 16), (12, 16))
    false_positive = box_mask(shape, (2, 5), (14, 17), (14, 17))
    case = evaluate_case(tumor_map(found | missed), tumor_map(found | false_positive), (1.0, 1.0, 1.0), "c")
    summary = summarize([case])
    assert (case.truth_lesions, case.detected_lesions) == (2, 1)
    assert (case.predicted_lesions, case.true_positive_lesions) == (2, 1)
    assert (summary["lesion_recall"], summary["lesion_precision"]) == (0.5, 0.5)


def test_lesion_with_overlap_below_half_iou_is_not_detected():
    truth = box_mask((12, 12, 12), (2, 10), (2, 6), (2, 6))  # 128 voxels
    prediction = box_mask((12, 12, 12), (2, 5), (2, 6), (2, 6))  # 48 voxels inside: IoU 0.375
    case = evaluate_case(tumor_map(truth), tumor_map(prediction), (1.0, 1.0, 1.0), "c")
    assert (case.detected_lesions, case.true_positive_lesions) == (0, 0)


def test_lesion_split_into_two_predicted_pieces_is_detected_by_their_union():
    truth = box_mask((12, 12, 12), (2, 10), (2, 6), (2, 6))
    prediction = box_mask((12, 12, 12), (2, 5), (2, 6), (2, 6)) | box_mask((12, 12, 12), (6, 10), (2, 6), (2, 6))
    case = evaluate_case(tumor_map(truth), tumor_map(prediction), (1.0, 1.0, 1.0), "c")
    assert (case.predicted_lesions, case.detected_lesions) == (2, 1)


# --- Summary and table ------------------------------------------------------------------------


def test_global_dice_pools_voxels_while_per_case_dice_weighs_cases_equally():
    big = tumor_map(box_mask((12, 12, 12), (1, 11), (1, 11), (1, 11)))  # 1000 voxels, found exactly
    small = tumor_map(box_mask((12, 12, 12), (1, 3), (1, 3), (1, 3)))  # 8 voxels, missed
    nothing = np.ones_like(small)
    cases = [evaluate_case(big, big, (1.0, 1.0, 1.0), "big"), evaluate_case(small, nothing, (1.0, 1.0, 1.0), "small")]
    summary = summarize(cases)
    assert summary["dice_per_case"] == pytest.approx(0.5)
    assert summary["dice_global"] == pytest.approx(2000 / 2008)


def test_summary_is_strict_json_and_leaves_undefined_values_out_of_means():
    tumor = tumor_map(box_mask((8, 8, 8), (2, 6), (2, 6), (2, 6)))
    liver = np.ones_like(tumor)
    cases = [evaluate_case(tumor, tumor, (1.0, 1.0, 1.0), "a"), evaluate_case(liver, tumor, (1.0, 1.0, 1.0), "b")]
    summary = summarize(cases)
    json.dumps(summary, allow_nan=False)
    assert (summary["assd_mm"], summary["rvd"]) == (0.0, 0.0)
    assert summary["cases"][1]["assd_mm"] is None
    assert summary["n_cases"] == 2


def test_table_has_paper_columns_and_one_row_per_case():
    tumor = tumor_map(box_mask((8, 8, 8), (2, 6), (2, 6), (2, 6)))
    summary = summarize([evaluate_case(tumor, tumor, (1.0, 1.0, 1.0), name) for name in ("case-1", "case-2")])
    table = format_table(summary)
    assert "Dice per case [%]" in table and "Dice global [%]" in table
    assert [line.split()[0] for line in table.splitlines()[4:]] == ["case-1", "case-2"]
    assert "100.0" in table.splitlines()[2]


# --- Files --------------------------------------------------------------------------------------


def test_match_case_files_pairs_folders_by_last_number_across_naming(tmp_path):
    truth, prediction = tmp_path / "truth", tmp_path / "prediction"
    truth.mkdir(), prediction.mkdir()
    for name in ("segmentation-10.nii", "segmentation-2.nii.gz", "segmentation-1.nii", "notes.txt"):
        (truth / name).touch()
    for name in ("volume-2.nii.gz", "case_1.nrrd", "run3_pred-10.mha", "volume-99.nii.gz"):
        (prediction / name).touch()
    pairs = match_case_files(truth, prediction)
    assert [(case, p.name) for case, _, p in pairs] == [
        ("segmentation-1", "case_1.nrrd"),
        ("segmentation-2", "volume-2.nii.gz"),
        ("segmentation-10", "run3_pred-10.mha"),
    ]


def test_match_case_files_names_truth_cases_without_prediction(tmp_path):
    truth, prediction = tmp_path / "truth", tmp_path / "prediction"
    truth.mkdir(), prediction.mkdir()
    for name in ("segmentation-1.nii", "segmentation-7.nii", "segmentation-8.nii"):
        (truth / name).touch()
    (prediction / "volume-1.nii").touch()
    with pytest.raises(InputError, match="7, 8"):
        match_case_files(truth, prediction)


def test_match_case_files_pairs_two_files_under_the_truth_name(tmp_path):
    (tmp_path / "segmentation-3.nii.gz").touch()
    (tmp_path / "mine.nrrd").touch()
    assert match_case_files(tmp_path / "segmentation-3.nii.gz", tmp_path / "mine.nrrd") == [
        ("segmentation-3", tmp_path / "segmentation-3.nii.gz", tmp_path / "mine.nrrd")
    ]


def test_match_case_files_rejects_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(InputError):
        match_case_files(tmp_path / "absent", tmp_path)
    with pytest.raises(InputError):
        match_case_files(tmp_path, tmp_path)


def test_evaluate_files_scores_matching_images(tmp_path):
    labels = tumor_map(box_mask((6, 7, 8), (1, 4), (2, 5), (3, 6)))
    sitk.WriteImage(to_image(labels, (0.8, 0.8, 2.0)), str(tmp_path / "segmentation-0.nii.gz"))
    sitk.WriteImage(to_image(labels, (0.8, 0.8, 2.0)), str(tmp_path / "prediction-0.nrrd"))
    summary = evaluate_files(tmp_path / "segmentation-0.nii.gz", tmp_path / "prediction-0.nrrd")
    assert (summary["n_cases"], summary["dice_per_case"], summary["liver_dice"]) == (1, 1.0, 1.0)


@pytest.mark.parametrize("spacing, size", [((0.8, 0.8, 2.5), (6, 7, 8)), ((0.8, 0.8, 2.0), (6, 7, 9))])
def test_evaluate_files_rejects_images_with_different_geometry(tmp_path, spacing, size):
    truth = tumor_map(box_mask((6, 7, 8), (1, 4), (2, 5), (3, 6)))
    prediction = np.ones(size[::-1], dtype=np.uint8)
    sitk.WriteImage(to_image(truth, (0.8, 0.8, 2.0)), str(tmp_path / "truth.nii.gz"))
    sitk.WriteImage(to_image(prediction, spacing), str(tmp_path / "prediction.nii.gz"))
    with pytest.raises(InputError):
        evaluate_files(tmp_path / "truth.nii.gz", tmp_path / "prediction.nii.gz")

"""The simulated-click protocol of benchmarks/clicks.py: where each click goes, and when clicking stops."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorDARNLib.labels import LIVER, TUMOR


def _clicks_benchmark():
    """benchmarks/clicks.py, loaded from its file (the benchmarks are not an installed package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "clicks.py"
    spec = importlib.util.spec_from_file_location("benchmark_clicks", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


clicks = _clicks_benchmark()
SPACING = (1.0, 1.0, 1.0)


def liver_with_tumor() -> np.ndarray:
    """[z, y, x] labels: liver filling a 20^3 volume, a 7^3 tumor around (7, 7, 7)."""
    labels = np.full((20, 20, 20), LIVER, np.uint8)
    labels[4:11, 4:11, 4:11] = TUMOR
    return labels


def test_a_missed_tumor_gets_a_positive_click_at_its_deepest_point():
    truth = liver_with_tumor()
    point, positive, size = clicks.next_click(np.where(truth == TUMOR, LIVER, truth), truth, SPACING)
    assert positive and size == 7 ** 3 and point == (7, 7, 7)


def test_a_false_tumor_larger_than_the_missed_part_gets_a_negative_click_on_it():
    truth = liver_with_tumor()
    labels = truth.copy()
    labels[4:11, 4:11, 4:6] = LIVER  # 98 voxels missed
    labels[12:18, 12:18, 12:18] = TUMOR  # 216 voxels false
    point, positive, size = clicks.next_click(labels, truth, SPACING)
    assert not positive and size == 216 and labels[point] == TUMOR and truth[point] == LIVER


def test_a_result_equal_to_the_truth_gets_no_click():
    truth = liver_with_tumor()
    assert clicks.next_click(truth.copy(), truth, SPACING) is None


def test_clicking_stops_when_no_error_is_left_and_each_click_records_its_dice():
    truth = liver_with_tumor()
    ct = sitk.Image(20, 20, 20, sitk.sitkInt16)
    scan = clicks.Scan("block", "test", ct, truth)

    def fixing_click(labels, ijk, positive, earlier):
        return truth.copy(), "fixed"

    steps = clicks.click_through(scan, np.where(truth == TUMOR, LIVER, truth), 5, fixing_click)
    assert len(steps) == 1 and steps[0].positive and steps[0].changed
    assert (steps[0].dice_before, steps[0].dice_after) == (0.0, pytest.approx(1.0))
    assert clicks.dice_after(0.0, steps, 10) == pytest.approx(1.0)


def test_a_scan_without_errors_leaves_its_groups_seconds_per_click_to_the_scans_that_were_clicked():
    perfect = clicks.summarize(1.0, [])
    clicked = clicks.summarize(0.0, [clicks.Step(True, 343, 0.0, 1.0, True, "lesion added", 0.5)])
    group = clicks.group_summary([perfect, clicked])
    assert group["median_seconds"] == 0.5 and group["clicks"] == 1
    assert group["dice"]["1"] == pytest.approx(1.0)

"""The README's first command: segment the sample phantom and show how well it went.

The sample case is a phantom drawn from a fixed seed (no patient data ships with the project),
so its ground truth is known and the demo can print an honest Dice next to the report.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk
import torch

from .errors import InputError
from .io import to_canonical, write_image
from .metrics import evaluate_case
from .phantom import SAMPLE_SEED, generate_case
from .picture import axial_overlay, best_axial_slice, montage, save_png
from .report import CaseReport, measure
from .segmenter import Segmenter

OUTPUT_NAMES = ("ct.nii.gz", "truth.nii.gz", "segmentation.nii.gz", "truth-vs-segmentation.png")


def run_demo(out_dir: Path, device: torch.device, models_dir: Path, overwrite: bool = False,
             say=print) -> tuple[CaseReport, dict]:
    """Draw the sample case, segment it, write CT, truth, result and a picture; report and score."""
    targets = [Path(out_dir) / name for name in OUTPUT_NAMES]
    if not overwrite and any(path.exists() for path in targets):
        raise InputError(f"{out_dir} already holds demo output; allow overwriting to replace it", option="overwrite")
    segmenter = Segmenter(models_dir, device, on_message=say)  # first: no weights, no point drawing a case
    say(f"Drawing the sample phantom (seed {SAMPLE_SEED}) ...")
    case = generate_case(SAMPLE_SEED)
    say(f"Segmenting a {'x'.join(map(str, case.image.GetSize()))} CT on {device} ...")
    result = segmenter.segment(case.image, name="the sample phantom")
    for image, path in zip((case.image, case.labels, result.labels), targets):
        write_image(image, path, overwrite=overwrite)
    slice_index = best_axial_slice(sitk.GetArrayFromImage(to_canonical(case.labels)))  # a copy: the view would outlive its image
    picture = montage([axial_overlay(case.image, labels, slice_index) for labels in (case.labels, result.labels)], 2)
    save_png(picture, targets[3])
    scores = evaluate_case(sitk.GetArrayViewFromImage(case.labels), sitk.GetArrayViewFromImage(result.labels),
                           case.image.GetSpacing(), "demo")
    return measure(case.image, result.labels), {
        "liver_dice": scores.liver_dice, "tumor_dice": scores.tumor_dice,
        "truth_tumors": len(case.tumors), "found_tumors": scores.predicted_lesions,
        "detected_true_tumors": scores.detected_lesions, "picture": str(targets[3])}

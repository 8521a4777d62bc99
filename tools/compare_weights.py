"""Choose between DARN checkpoints on validation cases, never on the benchmark's.

    .venv/bin/python -m tools.compare_weights FOLDER [FOLDER ...] [--cases 12] [--first 800010] [--anatomy MAPS]

Each FOLDER is a weights folder written by `livertumordarn export`. Every phantom runs through
the whole pipeline with each folder; the tumor Dice per case and global are printed. Training
validates on three phantoms (seeds 800000-800002), too few to tell checkpoints apart, so the
default seeds start above them, inside the validation range (800000-899999) that neither
training nor the benchmark (900000 upwards) draws from. With --anatomy the cases are CT drawn on
the label maps training holds out. The liver Dice and the tumor Dice per case and global are printed.
"""

from __future__ import annotations

import SimpleITK as sitk

from LiverTumorDARNLib import Segmenter
from LiverTumorDARNLib.metrics import evaluate_case, summarize
from tools.validation_seeds import parse_comparison_args, validation_cases


def main() -> None:
    args = parse_comparison_args(__doc__.splitlines()[0], cases=12, first_offset=10)
    segmenters = {folder: Segmenter(folder, "cpu") for folder in args.folders}
    cases = {folder: [] for folder in args.folders}
    for name, image, truth in validation_cases(args):
        line = name
        for folder in args.folders:
            labels = sitk.GetArrayFromImage(segmenters[folder].segment(image).labels)
            cases[folder].append(evaluate_case(sitk.GetArrayViewFromImage(truth), labels, image.GetSpacing(), name))
            line += f" | {folder.name} liver {cases[folder][-1].liver_dice:.3f} tumor {cases[folder][-1].tumor_dice:.3f}"
        print(line, flush=True)
    for folder in args.folders:
        summary = summarize(cases[folder])
        print(f"{folder}: liver Dice {summary['liver_dice']:.3f}, tumor Dice per case {summary['dice_per_case']:.3f}, "
              f"global {summary['dice_global']:.3f}")


if __name__ == "__main__":
    main()

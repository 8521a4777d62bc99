"""Choose a weights folder's tumor confidence floor on validation cases, never on the benchmark's.

    .venv/bin/python -m tools.calibrate_tumor_confidence FOLDER [--cases 48] [--first 800010] [--anatomy MAPS] [--write]
    .venv/bin/python -m tools.calibrate_tumor_confidence FOLDER --data HELD_OUT_LITS_DIR [--write]

`segment` gives a tumor component back to the liver when its mean tumor probability is under the
floor kept in the weights' manifest (``pipeline.drop_unconfident_tumors``). Each case is segmented
once with no floor (``Segmenter`` with floor 0, which also returns its tumor probabilities); every
tumor component of the result is recorded with its mean tumor probability, its size and its
overlap with the truth. Dropping whole
components changes the Dice by exactly those counts, so every candidate floor (0 to 0.95 in steps
of 0.05) is scored without running the networks again. The floor with the best tumor Dice per case
(the LiTS ranking measure; the lowest on a tie) is printed, and with --write stored in
FOLDER/manifest.json. The cases are validation phantoms (seeds 800000-899999, which neither
training nor the benchmark draws from), CT drawn on the label maps training holds out (--anatomy)
or, with --data, a LiTS-layout folder of cases the weights were not trained on.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from LiverTumorDARNLib import Segmenter
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import read_ct, read_image, write_json
from LiverTumorDARNLib.labels import TUMOR
from LiverTumorDARNLib.pipeline import tumor_confidences
from LiverTumorDARNLib.training.data import find_lits_pairs
from LiverTumorDARNLib.weights import MANIFEST_NAME, load_manifest
from tools.validation_seeds import describe_cases, parse_comparison_args, validation_cases

FLOORS = np.round(np.arange(0.0, 0.951, 0.05), 2)


@dataclasses.dataclass
class CaseComponents:
    """One case's predicted tumor components (voxel counts) and its true tumor volume."""

    confidence: np.ndarray  # mean tumor probability of each component
    voxels: np.ndarray
    true_voxels: np.ndarray  # of each component, inside the true tumor
    truth: int


def case_components(image: sitk.Image, truth: sitk.Image, segmenter: Segmenter) -> CaseComponents:
    """The tumor components of one case segmented without a confidence floor."""
    result = segmenter.segment(image, tumor_probability=True)
    labels = sitk.GetArrayFromImage(result.labels)
    true_tumor = sitk.GetArrayFromImage(truth) == TUMOR
    components, confidence = tumor_confidences(labels, sitk.GetArrayFromImage(result.tumor_probability))
    voxels = np.bincount(components.ravel())
    inside = np.bincount(components[true_tumor], minlength=len(voxels))
    return CaseComponents(confidence[1:], voxels[1:], inside[1:], int(true_tumor.sum()))


def scores(cases: list[CaseComponents], floor: float) -> tuple[float, float, int, int]:
    """Tumor Dice per case and global, components kept and kept components that miss every tumor."""
    per_case, overlap, predicted, true, kept, false = [], 0, 0, 0, 0, 0
    for case in cases:
        keep = case.confidence >= floor
        hit, size = int(case.true_voxels[keep].sum()), int(case.voxels[keep].sum())
        per_case.append(1.0 if size + case.truth == 0 else 2 * hit / (size + case.truth))
        overlap, predicted, true = overlap + hit, predicted + size, true + case.truth
        kept, false = kept + int(keep.sum()), false + int((keep & (case.true_voxels == 0)).sum())
    return float(np.mean(per_case)), 2 * overlap / max(predicted + true, 1), kept, false


def calibration_cases(args) -> Iterator[tuple[str, sitk.Image, sitk.Image]]:
    if args.data:
        for volume, segmentation in find_lits_pairs(args.data):
            yield volume.name, read_ct(volume), read_image(segmentation)
    else:
        yield from validation_cases(args)


def calibration_source(args) -> str:
    return f"LiTS-layout folder {args.data.name}" if args.data else describe_cases(args)


def calibrate(folder: Path, cases: list[CaseComponents], source: str, write: bool) -> None:
    print(f"\n{folder} ({len(cases)} cases)\nfloor  Dice per case  Dice global  components  false components")
    table = {floor: scores(cases, floor) for floor in FLOORS}
    for floor, (per_case, overall, kept, false) in table.items():
        print(f"{floor:5.2f}  {per_case:13.3f}  {overall:11.3f}  {kept:10d}  {false:16d}")
    best = max(FLOORS, key=lambda floor: (table[floor][0], -floor))
    print(f"best floor {best:.2f}: Dice per case {table[0.0][0]:.3f} -> {table[best][0]:.3f}, "
          f"global {table[0.0][1]:.3f} -> {table[best][1]:.3f}")
    if write:
        manifest = load_manifest(folder)
        manifest["models"]["tumor"]["postprocessing"] = {
            "min_tumor_confidence": float(best), "chosen_on": f"{source} ({len(cases)} cases)",
            "tumor_dice_per_case": [round(table[0.0][0], 4), round(table[best][0], 4)],
            "tumor_dice_global": [round(table[0.0][1], 4), round(table[best][1], 4)]}
        write_json(manifest, folder / MANIFEST_NAME, overwrite=True)
        print(f"written to {folder / MANIFEST_NAME}")


def main() -> None:
    def extend(parser):
        parser.add_argument("--data", type=Path, help="a LiTS-layout folder of held-out cases instead of phantoms")
        parser.add_argument("--write", action="store_true", help="store the best floor in each FOLDER's manifest")

    args = parse_comparison_args(__doc__.splitlines()[0], cases=48, first_offset=10, extend=extend)
    try:
        run(args)
    except InputError as error:  # a wrong folder or case: one line, as the livertumordarn command says it
        sys.exit(f"calibrate_tumor_confidence: error: {error}")


def run(args) -> None:
    segmenters = {folder: Segmenter(folder, "cpu", min_tumor_confidence=0.0) for folder in args.folders}
    cases = {folder: [] for folder in args.folders}
    for name, image, truth in calibration_cases(args):
        line = name
        for folder, segmenter in segmenters.items():
            cases[folder].append(case_components(image, truth, segmenter))
            found = cases[folder][-1]
            line += f" | {folder.name}: {len(found.voxels)} components, {int((found.true_voxels > 0).sum())} on a tumor"
        print(line, flush=True)
    for folder in args.folders:
        calibrate(folder, cases[folder], calibration_source(args), args.write)


if __name__ == "__main__":
    main()

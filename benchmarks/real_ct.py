"""Accuracy of a weights folder on every labelled real CT in ../shared/realct, against issue 19's targets.

    .venv/bin/python benchmarks/real_ct.py [--models DIR] [--pictures DIR] [--record]

Each scan is segmented as a user would (the pipeline on the CT file) and compared with its label
file: liver Dice (liver plus tumor, as LiTS counts it), tumor Dice, lesion recall and precision
where the scan has a tumor label, and the tumor components lying mostly outside the liver label
(a "tumor" outside the liver is a false one whatever the label says). One picture per scan, the
truth beside the result on the slice with the most true tumor (else liver), goes to --pictures.

These scans are for measuring only: nothing is trained or tuned on them (issue 19).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk

from LiverTumorDARNLib import Segmenter
from LiverTumorDARNLib.io import read_ct, read_image, write_json
from LiverTumorDARNLib.metrics import dice, evaluate_case
from LiverTumorDARNLib.picture import axial_overlay, best_axial_slice, montage, resize, save_png
from LiverTumorDARNLib.weights import MANIFEST_NAME, bundled_models_dir, load_manifest

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "realct"
LABEL_FILES = ("labels.nii.gz", "liver.nii.gz")
"""labels.nii.gz: 1 liver, 2 tumor; liver.nii.gz: liver and tumor merged in 1 (no tumor truth)."""

TARGETS = {
    "lits-117": {"liver_dice": 0.94, "tumor_dice": 0.80, "lesion_recall": 0.50},
    "lits-volume-0": {"liver_dice": 0.93},
    "totalseg-example": {"liver_dice": 0.92, "tumors_outside_liver": 0},
}


def labelled_scans(folder: Path) -> list[tuple[str, Path, Path]]:
    """(name, CT file, label file) of every scan folder that has both."""
    scans = []
    for scan in sorted(p for p in folder.iterdir() if p.is_dir()):
        labels = next((scan / name for name in LABEL_FILES if (scan / name).is_file()), None)
        if labels is not None and (scan / "ct.nii.gz").is_file():
            scans.append((scan.name, scan / "ct.nii.gz", labels))
    return scans


def tumors_outside_liver(truth_liver: np.ndarray, predicted_tumor: np.ndarray) -> int:
    """Predicted tumor components with more than half their voxels outside the true liver."""
    components = cc3d.connected_components(predicted_tumor, connectivity=26)
    sizes = np.bincount(components.ravel())
    inside = np.bincount(components[truth_liver].ravel(), minlength=len(sizes))
    return int(sum(1 for k in range(1, len(sizes)) if inside[k] * 2 < sizes[k]))


def score(name: str, ct_path: Path, label_path: Path, segmenter: Segmenter, pictures: Path | None) -> dict:
    ct = read_ct(ct_path)
    truth_image = read_image(label_path)
    result = segmenter.segment(ct, name=name)  # speed is benchmarks/segmentation.py's, on a quiet machine
    truth = sitk.GetArrayFromImage(truth_image)
    predicted = sitk.GetArrayFromImage(result.labels)
    row = {"scan": name, "liver_dice": dice(truth > 0, predicted > 0),
           "predicted_tumors": int(cc3d.connected_components(predicted == 2, connectivity=26).max()),
           "tumors_outside_liver": tumors_outside_liver(truth > 0, predicted == 2)}
    if label_path.name == "labels.nii.gz":
        case = evaluate_case(truth, predicted, ct.GetSpacing(), name)
        row.update(tumor_dice=case.tumor_dice, true_lesions=case.truth_lesions,
                   lesion_recall=case.detected_lesions / max(case.truth_lesions, 1),
                   lesion_precision=case.true_positive_lesions / max(case.predicted_lesions, 1))
    if pictures is not None:
        k = best_axial_slice(sitk.GetArrayFromImage(sitk.DICOMOrient(truth_image, "LPS")))
        tiles = [resize(axial_overlay(ct, labels, k), 384) for labels in (truth_image, result.labels)]
        save_png(montage(tiles, 2), pictures / f"{name}.png")
    return row


def verdicts(row: dict) -> list[str]:
    lines = []
    for key, target in TARGETS.get(row["scan"], {}).items():
        value = row.get(key)
        met = value is not None and (value <= target if key == "tumors_outside_liver" else value >= target)
        lines.append(f"    {key:22s} {value!s:>8.8}  target {'<=' if key == 'tumors_outside_liver' else '>='} "
                     f"{target}  {'met' if met else 'NOT met'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=bundled_models_dir(), help="weights folder (default: bundled)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pictures", type=Path, default=Path("output/real-ct"),
                        help="folder for one truth-beside-result picture per scan (default output/real-ct)")
    parser.add_argument("--record", action="store_true", help="write the results into the weights' manifest.json")
    args = parser.parse_args()
    segmenter = Segmenter(args.models, device=args.device)
    device = segmenter.device
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, device {device}; weights {args.models}")
    rows = []
    for name, ct_path, label_path in labelled_scans(REAL_CT):
        rows.append(score(name, ct_path, label_path, segmenter, args.pictures))
        row = rows[-1]
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items() if k != "scan"), flush=True)
        print("\n".join(verdicts(row)))
    print(json.dumps(rows))
    if args.record:
        manifest = load_manifest(args.models)
        manifest["real_ct_benchmark"] = {
            "command": "benchmarks/real_ct.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, device {device}",
            "date": time.strftime("%Y-%m-%d"), "scans": rows}
        write_json(manifest, Path(args.models) / MANIFEST_NAME, overwrite=True)


if __name__ == "__main__":
    main()

"""Accuracy and speed of the bundled weights, against the issue's targets.

    .venv/bin/python benchmarks/segmentation.py [--cases 20] [--device cpu] [--skip-speed]

1. Accuracy on phantoms drawn from seeds 900000 + k, a range no training run uses, all 512x512
   (the generator's full-size cases): liver Dice, tumor Dice per case and global (LiTS measures).
2. Accuracy on real CT: ../shared/realct/lits-volume-0, whose mask merges liver and tumor, so
   only liver Dice (labels 1 or 2 against the mask) is defined. Never trained on.
3. Speed end to end for a 512x512x200 CT (read, both stages, post-processing, write), timed
   in a fresh process with its peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LiverTumorDARNLib.io import read_ct, read_image, write_image
from LiverTumorDARNLib.metrics import dice, evaluate_case, format_table, summarize
from LiverTumorDARNLib.phantom import generate_case
from LiverTumorDARNLib.pipeline import load_stages, resolve_device, segment
from LiverTumorDARNLib.weights import bundled_models_dir

REAL = Path(__file__).resolve().parents[2] / "shared" / "realct" / "lits-volume-0"
HELD_OUT_SEEDS_START = 900_000
TARGETS = {"liver_dice": 0.95, "dice_per_case": 0.80, "dice_global": 0.85, "real_liver_dice": 0.90,
           "cpu_seconds": 60.0, "cpu_peak_gb": 6.0}


def phantom_accuracy(count: int, stages, device) -> dict:
    cases = []
    for seed in range(HELD_OUT_SEEDS_START, HELD_OUT_SEEDS_START + count):
        case = generate_case(seed)
        result = segment(case.image, *stages, device)
        cases.append(evaluate_case(sitk.GetArrayViewFromImage(case.labels),
                                   sitk.GetArrayViewFromImage(result.labels), case.image.GetSpacing(), f"seed-{seed}"))
        print(f"  seed {seed}: liver Dice {cases[-1].liver_dice:.3f}, tumor Dice {cases[-1].tumor_dice:.3f}", flush=True)
    return summarize(cases)


def real_liver_dice(stages, device) -> float:
    ct = read_ct(REAL / "ct.nii.gz")
    truth = sitk.GetArrayFromImage(read_image(REAL / "liver.nii.gz")) > 0
    predicted = sitk.GetArrayFromImage(segment(ct, *stages, device).labels) > 0
    return dice(truth, predicted)


def end_to_end_speed(device: str) -> tuple[float, float]:
    """Seconds and peak GB of `livertumordarn segment` on a 512x512x200 CT in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        ct_path, out_path = Path(folder) / "ct.nii.gz", Path(folder) / "labels.nii.gz"
        write_image(generate_case(HELD_OUT_SEEDS_START, size_xyz=(512, 512, 200)).image, ct_path)
        command = [sys.executable, "-m", "LiverTumorDARNLib.cli", "segment", str(ct_path), "-o", str(out_path),
                   "--device", device]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2  # kB on Linux
    return seconds, peak_gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, device {device}")
    stages = load_stages(bundled_models_dir(), device)
    print(f"Phantoms (seeds {HELD_OUT_SEEDS_START}..{HELD_OUT_SEEDS_START + args.cases - 1}, never trained on):")
    summary = phantom_accuracy(args.cases, stages, device)
    print(format_table(summary))
    results = {"liver_dice": summary["liver_dice"], "dice_per_case": summary["dice_per_case"],
               "dice_global": summary["dice_global"], "real_liver_dice": real_liver_dice(stages, device)}
    if not args.skip_speed:
        results["cpu_seconds"], results["cpu_peak_gb"] = end_to_end_speed(args.device)
    print("\nTarget check:")
    for key, value in results.items():
        target = TARGETS[key]
        met = value <= target if key.startswith("cpu") else value >= target
        print(f"  {key:18s} {value:8.3f}   target {'<=' if key.startswith('cpu') else '>='} {target}   {'met' if met else 'NOT met'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

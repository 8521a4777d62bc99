"""Choose between DARN checkpoints on validation phantoms, never on the benchmark's.

    .venv/bin/python tools/compare_weights.py FOLDER [FOLDER ...] [--cases 12] [--first 800010]

Each FOLDER is a weights folder written by `livertumordarn export`. Every phantom runs through
the whole pipeline with each folder; the tumor Dice per case and global are printed. Training
validates on three phantoms (seeds 800000-800002), too few to tell checkpoints apart, so the
default seeds start above them, inside the validation range (800000-899999) that neither
training nor the benchmark (900000 upwards) draws from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from LiverTumorDARNLib.labels import TUMOR
from LiverTumorDARNLib.phantom import BENCHMARK_SEED_START, VALIDATION_SEED_START, generate_case
from LiverTumorDARNLib.pipeline import load_stages, segment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--first", type=int, default=VALIDATION_SEED_START + 10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (VALIDATION_SEED_START <= args.first and args.first + args.cases <= BENCHMARK_SEED_START):
        parser.error(f"seeds must lie in the validation range {VALIDATION_SEED_START}..{BENCHMARK_SEED_START - 1}")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    stages = {folder: load_stages(folder, device) for folder in args.folders}
    per_case = {folder: [] for folder in args.folders}
    overlap = {folder: np.zeros(2) for folder in args.folders}  # intersection, sum of sizes
    for seed in range(args.first, args.first + args.cases):
        case = generate_case(seed)
        truth = sitk.GetArrayFromImage(case.labels) == TUMOR
        line = f"seed {seed} ({len(case.tumors)} tumors)"
        for folder in args.folders:
            predicted = sitk.GetArrayFromImage(segment(case.image, *stages[folder], device).labels) == TUMOR
            both, total = int((predicted & truth).sum()), int(predicted.sum() + truth.sum())
            per_case[folder].append(1.0 if total == 0 else 2 * both / total)
            overlap[folder] += (both, total)
            line += f" | {folder.name} {per_case[folder][-1]:.3f}"
        print(line, flush=True)
    for folder in args.folders:
        both, total = overlap[folder]
        print(f"{folder}: tumor Dice per case {np.mean(per_case[folder]):.3f}, global {2 * both / max(total, 1):.3f}")


if __name__ == "__main__":
    main()

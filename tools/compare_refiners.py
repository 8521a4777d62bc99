"""Choose between refinement checkpoints on validation phantoms, never on the benchmark's.

    .venv/bin/python -m tools.compare_refiners FOLDER [FOLDER ...] [--cases 8] [--first 800600]

Each FOLDER is a weights folder holding a ``refine`` entry (``livertumordarn export`` into a copy
of the bundled folder). Every true tumor of every phantom goes through the refinement benchmark's
experiments (``benchmarks/refinement.py``: corrupted masks, the true mask, a click on the missed
lesion) with each folder's refiner, on the same corruptions. Training validates on patches of
two phantoms (seeds 800500-800501) and the lesion-seed rules were tuned on 800500-800523, so the
default seeds start above them, inside the validation range (800000-899999) that neither training
nor the benchmark (900000 upwards) draws from.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.refinement import print_kind_table, print_size_table, summarize_rows, tumor_experiments
from LiverTumorDARNLib.phantom import generate_case
from LiverTumorDARNLib.refine import Refiner
from tools.validation_seeds import parse_comparison_args


def main() -> None:
    args = parse_comparison_args(__doc__.splitlines()[0], cases=8, first_offset=600)
    refiners = {folder: Refiner.load(folder, torch.device("cpu")) for folder in args.folders}
    rows = {folder: [] for folder in args.folders}
    for seed in range(args.first, args.first + args.cases):
        case = generate_case(seed)
        for folder, refiner in refiners.items():  # the same corruptions for every folder
            rows[folder] += tumor_experiments(case, None, refiner, np.random.default_rng(seed))
        print(f"seed {seed}: {len(case.tumors)} tumors", flush=True)
    for folder in args.folders:
        print(f"\n{folder}")
        print_kind_table(rows[folder])
        print()
        print_size_table(rows[folder])
        summary = summarize_rows(rows[folder])
        print(f"corrupted masks {summary['dice_gain_corrupted']:+.3f}, good masks {summary['good_mask_change']:+.3f}, "
              f"click on a missed lesion {summary['click_new_lesion_dice']:.3f}")


if __name__ == "__main__":
    main()

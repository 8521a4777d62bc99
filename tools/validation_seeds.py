"""The command line the checkpoint comparisons share: weights folders and validation seeds only.

Checkpoints are chosen on validation phantoms (800000-899999); the benchmark's seeds (900000 up)
must never decide which weights ship, so a range reaching them is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from LiverTumorDARNLib.phantom import BENCHMARK_SEED_START, VALIDATION_SEED_START


def parse_comparison_args(description: str, cases: int, first_offset: int,
                          extend: Callable[[argparse.ArgumentParser], None] = lambda parser: None) -> argparse.Namespace:
    """FOLDER... --cases --first --threads, the seeds checked and the thread count applied.
    ``first_offset`` is the default first seed's distance from the validation range's start;
    ``extend`` adds a tool's own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--cases", type=int, default=cases)
    parser.add_argument("--first", type=int, default=VALIDATION_SEED_START + first_offset)
    parser.add_argument("--threads", type=int, default=2)
    extend(parser)
    args = parser.parse_args()
    if not (VALIDATION_SEED_START <= args.first and args.first + args.cases <= BENCHMARK_SEED_START):
        parser.error(f"seeds must lie in the validation range {VALIDATION_SEED_START}..{BENCHMARK_SEED_START - 1}")
    torch.set_num_threads(args.threads)
    return args

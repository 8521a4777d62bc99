"""The command line the checkpoint comparisons share: weights folders and validation cases only.

Checkpoints are chosen on validation phantoms (800000-899999) or, with --anatomy, on CT drawn on
the label maps that training holds out (``anatomy.split_maps``); the benchmark's seeds (900000 up)
and the real scans must never decide which weights ship, so a seed range reaching the benchmark's
is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterator

import SimpleITK as sitk
import torch

from LiverTumorDARNLib.anatomy import draw_case, split_maps, usable_label_maps
from LiverTumorDARNLib.phantom import BENCHMARK_SEED_START, VALIDATION_SEED_START, generate_case


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
    parser.add_argument("--anatomy", type=Path, metavar="MAPS",
                        help="CT drawn on the label maps under MAPS that training holds out, instead of phantoms")
    extend(parser)
    args = parser.parse_args()
    if not (VALIDATION_SEED_START <= args.first and args.first + args.cases <= BENCHMARK_SEED_START):
        parser.error(f"seeds must lie in the validation range {VALIDATION_SEED_START}..{BENCHMARK_SEED_START - 1}")
    torch.set_num_threads(args.threads)
    return args


def validation_cases(args: argparse.Namespace) -> Iterator[tuple[str, sitk.Image, sitk.Image]]:
    """(name, CT, labels) of each validation case: the phantoms of the seeds, or case k drawn with
    seed first + k on held-out map k (in turn)."""
    seeds = range(args.first, args.first + args.cases)
    if args.anatomy is None:
        for seed in seeds:
            case = generate_case(seed)
            yield f"seed {seed}", case.image, case.labels
        return
    maps = split_maps(usable_label_maps(args.anatomy))[1]
    for k, seed in enumerate(seeds):
        case = draw_case(maps[k % len(maps)], seed)
        yield f"{case.label_map} seed {seed}", case.image, case.labels


def describe_cases(args: argparse.Namespace) -> str:
    seeds = f"seeds {args.first}-{args.first + args.cases - 1}"
    if args.anatomy is None:
        return f"validation phantoms, {seeds}"
    return f"CT drawn on the label maps held out of {args.anatomy.name}, {seeds}"

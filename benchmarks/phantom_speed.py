"""Time the phantom generator: the issue's target is a 512x512x200 case in at most 10 s.

    .venv/bin/python benchmarks/phantom_speed.py [--seeds 5]

Times drawing (generate_case) and writing (.nii.gz, compressed) separately, because the
target is about drawing; training draws cases in memory and never writes them.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from LiverTumorDARNLib.io import write_image
from LiverTumorDARNLib.phantom import BENCHMARK_SEED_START, generate_case



def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    seeds = range(BENCHMARK_SEED_START, BENCHMARK_SEED_START + args.seeds)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            case, draw = timed(generate_case, seed, size_xyz=(512, 512, 200))
            _, write = timed(write_image, case.image, Path(folder) / f"{seed}.nii.gz")
            _, small = timed(generate_case, seed, small=True)
            rows.append((draw, write, small))
            print(f"seed {seed}: draw {draw:5.2f} s, write {write:5.2f} s, small case {small:4.2f} s")
    for name, column in zip(("512x512x200 draw", "512x512x200 write .nii.gz", "small case draw"), zip(*rows)):
        print(f"{name:28s} median {statistics.median(column):5.2f} s   max {max(column):5.2f} s")


if __name__ == "__main__":
    main()

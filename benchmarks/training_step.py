"""Seconds per training step on this machine, in float32 and with ``--amp`` (bfloat16 autocast on the CPU).

    .venv/bin/python benchmarks/training_step.py [--threads 2] [--steps 6] [--device cpu]

Each network takes optimiser steps on random inputs of its training shapes through the training
loop's own step (``training.loop.Trainer.optimise``: the stage's layout, precision and loss): the
refinement network on its default batch of 32^3 patches (image, coarse mask and the two click
maps) in channels-last memory, DARN's tumor
stage on its default batch and patch with deep supervision. The median of the steps after the
first (allocations) is printed. Drawing the training samples is not included: it depends on the
scans, not on the precision.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from LiverTumorDARNLib.patches import PATCH_SIZE
from LiverTumorDARNLib.pipeline import STAGES, resolve_device
from LiverTumorDARNLib.training.loop import WORLD_OF_ONE, Trainer, make_task
from LiverTumorDARNLib.training.options import TrainConfig


def trainer_and_batch(stage: str, device: torch.device, amp: bool):
    """A stage's trainer (default settings) and a random batch of its training shapes, on the device."""
    config = TrainConfig(stage=stage, device=str(device.type), amp=amp)
    torch.manual_seed(0)
    trainer = Trainer(config, make_task(config), device, WORLD_OF_ONE)
    if stage == "refine":
        inputs = torch.randn(config.batch_size, config.model["in_channels"], *[PATCH_SIZE] * 3).to(
            device, memory_format=torch.channels_last_3d)
        targets = torch.randint(0, 2, (config.batch_size, *[PATCH_SIZE] * 3), device=device)
    else:
        patch = STAGES[stage].patch_size
        inputs = torch.randn(config.batch_size, 1, *patch, device=device)
        targets = torch.randint(0, STAGES[stage].num_classes, (config.batch_size, *patch), device=device)
    return trainer, inputs, targets


def median_step_seconds(stage: str, device: torch.device, amp: bool, steps: int) -> float:
    trainer, inputs, targets = trainer_and_batch(stage, device, amp)
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        trainer.optimise(inputs, targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, {device}")
    print("| Network (training batch) | float32, s/step | --amp (bfloat16), s/step | Speed-up |")
    print("| --- | --- | --- | --- |")
    tumor = STAGES["tumor"].patch_size
    for name, stage in ((f"refinement ({TrainConfig(stage='refine').batch_size} x 2 x {PATCH_SIZE}^3)", "refine"),
                        (f"DARN tumor stage ({TrainConfig(stage='tumor').batch_size} x 1 x {'x'.join(map(str, tumor))})", "tumor")):
        full, mixed = (median_step_seconds(stage, device, amp, args.steps) for amp in (False, True))
        print(f"| {name} | {full:.2f} | {mixed:.2f} | {full / mixed:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

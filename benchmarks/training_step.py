"""Seconds per training step on this machine, in float32 and with ``--amp`` (bfloat16 autocast on the CPU).

    .venv/bin/python benchmarks/training_step.py [--threads 2] [--steps 6] [--device cpu]

Each network takes optimiser steps on random inputs of its training shapes, laid out as its
trainer lays them out: the refinement network on 8 patches of 2 x 32^3 in channels-last memory
(``refine_training``), DARN's tumor stage on its default batch and patch with deep supervision
(``training``). The median of the steps after the first (allocations) is printed. Drawing the
training samples is not included: it depends on the scans, not on the precision.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from LiverTumorDARNLib.models import build_model
from LiverTumorDARNLib.pipeline import STAGES, resolve_device
from LiverTumorDARNLib.patches import PATCH_SIZE
from LiverTumorDARNLib.refine_training import RefineConfig, training_logits
from LiverTumorDARNLib.training import TrainConfig, deep_supervision_loss, dice_ce_loss, model_config


def refine_step(device: torch.device, amp: bool):
    """The refinement network and its loss on one batch, computed by the trainer's own forward."""
    model = build_model({"architecture": "refine", "widths": RefineConfig.widths}).to(
        device, memory_format=torch.channels_last_3d)
    batch = RefineConfig.batch_size
    inputs = torch.randn(batch, 2, *[PATCH_SIZE] * 3)
    targets = torch.randint(0, 2, (batch, *[PATCH_SIZE] * 3), device=device)
    return model, lambda: dice_ce_loss(training_logits(model, inputs, device, amp), targets)


def darn_step(device: torch.device, amp: bool):
    """DARN's tumor stage and its deep-supervision loss, under the autocast of ``training._Trainer``
    (the device's default type: bfloat16 on the CPU, float16 on CUDA)."""
    stage = STAGES["tumor"]
    model = build_model(model_config(TrainConfig(stage="tumor"), stage)).to(device)
    batch = TrainConfig.batch_size
    images = torch.randn(batch, 1, *stage.patch_size, device=device)
    labels = torch.randint(0, stage.num_classes, (batch, *stage.patch_size), device=device)

    def loss_of_batch():
        with torch.autocast(device.type, enabled=amp):
            return deep_supervision_loss(model.forward_with_auxiliary(images), labels)

    return model, loss_of_batch


def median_step_seconds(build, device: torch.device, amp: bool, steps: int) -> float:
    torch.manual_seed(0)
    model, loss_of_batch = build(device, amp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
    for name, build in ((f"refinement ({RefineConfig.batch_size} x 2 x {PATCH_SIZE}^3)", refine_step),
                        (f"DARN tumor stage ({TrainConfig.batch_size} x 1 x {'x'.join(map(str, tumor))})", darn_step)):
        full, mixed = (median_step_seconds(build, device, amp, args.steps) for amp in (False, True))
        print(f"| {name} | {full:.2f} | {mixed:.2f} | {full / mixed:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

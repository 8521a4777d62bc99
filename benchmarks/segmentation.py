"""Accuracy and speed of the bundled weights, against the issue's targets.

    .venv/bin/python benchmarks/segmentation.py [--cases 20] [--device cpu] [--skip-speed | --skip-accuracy]
                                                [--peer-windows 1] [--record]

1. Accuracy on phantoms drawn from seeds 900000 + k, a range no training run uses, all 512x512
   (the generator's full-size cases): liver Dice, tumor Dice per case and global (LiTS measures).
2. Accuracy on real CT: ../shared/realct/lits-volume-0, whose mask merges liver and tumor, so
   only liver Dice (labels 1 or 2 against the mask) is defined. Never trained on.
3. Speed end to end for a 512x512x200 CT (read, both stages, post-processing, write), timed
   in a fresh process with its peak resident memory.
4. The speed peer, on the same CT: nnU-Net v2's 3d_fullres network (PlainConvUNet, 6 stages,
   32..320 features, random weights) on the CT resampled to LiTS's median spacing, 128^3
   windows at half-patch steps, Gaussian weights, 8 mirrorings. On a CPU one window takes
   minutes, so ``--peer-windows`` windows are run for real and the whole case is extrapolated
   from them (resampling measured, windows x measured seconds per window); the output says so.
   Needs ``pip install --no-deps dynamic-network-architectures==0.4.4`` (its unet module uses
   only torch and numpy; its declared dependencies would pull timm, torchvision and a CUDA torch).
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

import SimpleITK as sitk
import torch

from LiverTumorDARNLib import Segmenter
from LiverTumorDARNLib.io import read_ct, read_image, write_image, write_json
from LiverTumorDARNLib.metrics import dice, evaluate_case, format_table, summarize
from LiverTumorDARNLib.phantom import BENCHMARK_SEED_START, generate_case
from LiverTumorDARNLib.pipeline import (normalize_hu, resample_ct, resolve_device, sliding_window,
                                         window_starts, working_grid)
from LiverTumorDARNLib.weights import MANIFEST_NAME, bundled_models_dir, load_manifest

REAL = Path(__file__).resolve().parents[2] / "shared" / "realct" / "lits-volume-0"
SPEED_TARGETS = {"cpu": ((512, 512, 200), 60.0, 6.0), "cuda": ((512, 512, 430), 2.0, None)}
"""Per device: the speed case's size (x, y, z), the most seconds and the most peak GB (the issue's)."""
PEER_SPACING_XYZ = (0.77, 0.77, 1.0)
"""About the median voxel spacing of LiTS, which nnU-Net takes as its 3d_fullres target spacing."""
PEER_PATCH = (128, 128, 128)
PEER_MIRROR_AXES = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
ACCURACY_TARGETS = {"liver_dice": 0.95, "dice_per_case": 0.80, "dice_global": 0.85, "real_liver_dice": 0.90}


def phantom_accuracy(count: int, segmenter: Segmenter) -> dict:
    cases = []
    for seed in range(BENCHMARK_SEED_START, BENCHMARK_SEED_START + count):
        case = generate_case(seed)
        result = segmenter.segment(case.image)
        cases.append(evaluate_case(sitk.GetArrayViewFromImage(case.labels),
                                   sitk.GetArrayViewFromImage(result.labels), case.image.GetSpacing(), f"seed-{seed}"))
        print(f"  seed {seed}: liver Dice {cases[-1].liver_dice:.3f}, tumor Dice {cases[-1].tumor_dice:.3f}", flush=True)
    return summarize(cases)


def real_liver_dice(segmenter: Segmenter) -> float:
    ct = read_ct(REAL / "ct.nii.gz")
    truth = sitk.GetArrayFromImage(read_image(REAL / "liver.nii.gz")) > 0
    predicted = sitk.GetArrayFromImage(segmenter.segment(ct).labels) > 0
    return dice(truth, predicted)


def end_to_end_speed(ct: sitk.Image, device: torch.device) -> tuple[float, float]:
    """Seconds and peak GB of `livertumordarn segment` on ``ct`` in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        ct_path, out_path = Path(folder) / "ct.nii.gz", Path(folder) / "labels.nii.gz"
        write_image(ct, ct_path)
        command = [sys.executable, "-m", "LiverTumorDARNLib.cli", "segment", str(ct_path), "-o", str(out_path),
                   "--device", device.type]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2  # kB on Linux
    return seconds, peak_gb


def nnunet_peer_seconds(ct: sitk.Image, device: torch.device, windows_to_run: int) -> tuple[float, int]:
    """(seconds for the whole case, extrapolated from ``windows_to_run`` real windows; window count)."""
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:
        sys.exit("the speed peer needs: pip install --no-deps dynamic-network-architectures==0.4.4 (or pass --peer-windows 0)")
    torch.manual_seed(0)
    network = PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], torch.nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 2, 3, 2,
                            True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                            torch.nn.LeakyReLU, {"inplace": True}).to(device).eval()
    start = time.perf_counter()
    volume = normalize_hu(sitk.GetArrayFromImage(resample_ct(ct, working_grid(ct, PEER_SPACING_XYZ))))
    resample_seconds = time.perf_counter() - start
    starts = [(z, y, x) for z in window_starts(volume.shape[0], PEER_PATCH[0], 0.5)
              for y in window_starts(volume.shape[1], PEER_PATCH[1], 0.5)
              for x in window_starts(volume.shape[2], PEER_PATCH[2], 0.5)]

    def mirrored(batch: torch.Tensor) -> torch.Tensor:
        return sum(torch.flip(network(torch.flip(batch, axes)), axes) for axes in PEER_MIRROR_AXES) / len(PEER_MIRROR_AXES)

    timed = starts[len(starts) // 2:][:windows_to_run]  # central windows: the busy part of a scan
    start = time.perf_counter()
    with torch.inference_mode():
        for z, y, x in timed:  # one window each, through the same Gaussian-weighted accumulation
            window = volume[z:z + PEER_PATCH[0], y:y + PEER_PATCH[1], x:x + PEER_PATCH[2]]
            sliding_window(mirrored, window, PEER_PATCH, 3, device, batch_size=1)
    per_window = (time.perf_counter() - start) / len(timed)
    return resample_seconds + per_window * len(starts), len(starts)


def speed(device: torch.device, peer_windows: int) -> dict:
    size, most_seconds, most_gb = SPEED_TARGETS[device.type]
    ct = generate_case(BENCHMARK_SEED_START, size_xyz=size).image
    seconds, peak_gb = end_to_end_speed(ct, device)
    print(target_line(f"seconds, {'x'.join(map(str, size))}", seconds, most_seconds, at_least=False))
    if most_gb is not None:
        print(target_line("peak GB", peak_gb, most_gb, at_least=False))
    results = {"seconds": seconds, "peak_gb": peak_gb}
    if peer_windows > 0:
        peer, windows = nnunet_peer_seconds(ct, device, peer_windows)
        print(f"  nnU-Net 3d_fullres peer on the same CT: {peer:.0f} s for {windows} windows x 8 mirrorings "
              f"(extrapolated from {min(peer_windows, windows)} window(s) run), "
              f"{peer / seconds:.0f}x LiverTumorDARN's time")
        results.update(peer_seconds=peer, peer_windows=windows)
    return results


def accuracy(cases: int, device: torch.device) -> dict:
    segmenter = Segmenter(bundled_models_dir(), device)
    print(f"Phantoms (seeds {BENCHMARK_SEED_START}..{BENCHMARK_SEED_START + cases - 1}, never trained on):")
    summary = phantom_accuracy(cases, segmenter)
    print(format_table(summary))
    results = {"liver_dice": summary["liver_dice"], "dice_per_case": summary["dice_per_case"],
               "dice_global": summary["dice_global"], "real_liver_dice": real_liver_dice(segmenter)}
    print("\nTarget check:")
    for key, value in results.items():
        print(target_line(key, value, ACCURACY_TARGETS[key], at_least=True))
    return results


def target_line(name: str, value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    return f"  {name:22s} {value:8.3f}   target {'>=' if at_least else '<='} {target}   {'met' if met else 'NOT met'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-speed", action="store_true")
    skip.add_argument("--skip-accuracy", action="store_true", help="time the speed case only (parts 3 and 4)")
    parser.add_argument("--peer-windows", type=int, default=1,
                        help="nnU-Net windows run for real (default 1); 0 skips the peer")
    parser.add_argument("--record", action="store_true",
                        help="write the results into the bundled weights' manifest.json")
    args = parser.parse_args()
    if args.record and (args.skip_speed or args.skip_accuracy):
        parser.error("--record keeps the whole benchmark: run it without --skip-speed or --skip-accuracy")
    device = resolve_device(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, device {device}")
    results = {} if args.skip_accuracy else accuracy(args.cases, device)
    if not args.skip_speed:
        results.update(speed(device, args.peer_windows))
    print(json.dumps(results))
    if args.record:
        record_in_manifest(results, args.cases, device)


def record_in_manifest(results: dict, cases: int, device: torch.device) -> None:
    """The manifest carries the weights' measured accuracy and speed next to their checksums."""
    manifest = load_manifest(bundled_models_dir())
    manifest["benchmark"] = {
        "command": "benchmarks/segmentation.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, device {device}",
        "date": time.strftime("%Y-%m-%d"), "phantom_cases": cases, "results": results}
    write_json(manifest, bundled_models_dir() / MANIFEST_NAME, overwrite=True)


if __name__ == "__main__":
    main()

"""Simulated clicks on DARN's own results, as interactive segmentation is benchmarked (issue 20).

    .venv/bin/python -m benchmarks.clicks [--phantoms 6] [--anatomy 6] [--clicks 10] [--timed-clicks 10]
                                         [--real ../shared/realct/lits-117] [--seed-start 900000]
                                         [--models DIR] [--device cpu] [--threads 2] [--cache DIR] [--json FILE]

The protocol of DeepEdit's and nnInteractive's benchmarks: each scan is segmented by DARN (the
weights folder's stages, confidence floor included), then corrected one click at a time. Each
click goes to the deepest point (largest distance to its border, in mm) of the largest tumor
error, a 26-connected region where the result and the truth disagree: a missed tumor region gets
a positive click, a false tumor region a negative one. The refiner sees the click and the clicks
made before it (``Refiner.click(..., earlier=...)``), as the command line and the Slicer panel give
them. Reported per scan and per group: tumor Dice of the whole scan after 0, 1, 3, 5 and 10
clicks, the share of clicks that lower it (and the mean and largest drop), the share that change
nothing, and the median seconds of a click.

Scans:
- ``--real``: the one real scan with a tumor label (LiTS 117). For measuring only: nothing is
  tuned on it. An empty string leaves it out.
- Phantoms of seeds ``--seed-start`` + k (900000 upwards: the benchmark range, never trained on).
- CT drawn by ``anatomy.draw_case`` on the label maps training holds out
  (``anatomy.split_maps(usable_label_maps(MAPS))[1]``), scan k on held-out map k with seed
  ``--seed-start`` + k.
Tuning uses other seeds (``--seed-start 800700 --real ''``: the validation range).

Latency: the same protocol's first ``--timed-clicks`` clicks on a 512x512x200 phantom, in the
core (``Refiner.click`` on arrays) and through the Slicer panel's click session
(``tasks.ClickSession`` on slicer-core's MRML classes: segments read into a label map, the click
on the session's thread, polled as the panel's timer polls, the changed box written back, then the
report measured on the session's thread and written): the median wall time until the segments
show the click and until the report does, the median CPU time of this process (all its
threads) and the load average around them:
the development machine's two cores are shared, and CPU time does not depend on the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import cc3d
import numpy as np
import SimpleITK as sitk
import torch

from LiverTumorDARNLib import Refiner, Segmenter, pipeline
from LiverTumorDARNLib.io import read_ct, read_image
from LiverTumorDARNLib.labels import TUMOR
from LiverTumorDARNLib.phantom import BENCHMARK_SEED_START, generate_case
from LiverTumorDARNLib.pipeline import resolve_device
from LiverTumorDARNLib.regions import bounding_box, deepest_voxel
from LiverTumorDARNLib.weights import bundled_models_dir, file_sha256

ROOT = Path(__file__).resolve().parents[1]
REAL_SCAN = ROOT.parent / "shared" / "realct" / "lits-117"
ANATOMY_MAPS = ROOT.parent / "shared" / "anatomy"
REPORTED_CLICKS = (0, 1, 3, 5, 10)
LATENCY_SIZE_XYZ = (512, 512, 200)
LATENCY_SEED = BENCHMARK_SEED_START + 500
TARGETS = {"lits-117": {5: 0.80, 10: 0.85}}
LATENCY_TARGET_S = {"cpu": 0.3, "cuda": 0.1}


@dataclasses.dataclass(frozen=True)
class Scan:
    name: str
    group: str
    ct: sitk.Image
    truth: np.ndarray


@dataclasses.dataclass(frozen=True)
class Step:
    """One simulated click and what it did."""

    positive: bool
    error_voxels: int
    dice_before: float
    dice_after: float
    changed: bool
    message: str
    seconds: float


def tumor_dice(labels: np.ndarray, truth: np.ndarray) -> float:
    result, true = labels == TUMOR, truth == TUMOR
    total = int(result.sum() + true.sum())
    return 1.0 if total == 0 else 2 * int((result & true).sum()) / total


def next_click(labels: np.ndarray, truth: np.ndarray, spacing_zyx) -> tuple[tuple[int, int, int], bool, int] | None:
    """(voxel [z, y, x], positive, error size) of the protocol's next click; None without error."""
    result, true = labels == TUMOR, truth == TUMOR
    largest = None
    for positive, error in ((True, true & ~result), (False, result & ~true)):
        components, count = cc3d.connected_components(error, connectivity=26, return_N=True)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        number = int(np.argmax(sizes))
        if largest is None or sizes[number] > largest[0]:
            largest = (int(sizes[number]), positive, components, number)
    if largest is None:
        return None
    size, positive, components, number = largest
    box = bounding_box(components == number)
    deepest = deepest_voxel(components[box] == number, spacing_zyx)
    return tuple(d + b.start for d, b in zip(deepest, box)), positive, size


def click_through(scan: Scan, labels: np.ndarray, clicks: int,
                  click: Callable[[np.ndarray, tuple[int, int, int], bool, list], tuple[np.ndarray, str]]) -> list[Step]:
    """The protocol: ``clicks`` clicks, each given to ``click(labels, ijk, positive, earlier)``,
    which returns the new labels and the refiner's message."""
    spacing = tuple(scan.ct.GetSpacing()[::-1])
    steps, earlier = [], []
    for _ in range(clicks):
        chosen = next_click(labels, scan.truth, spacing)
        if chosen is None:
            break
        point, positive, size = chosen
        ijk = point[::-1]
        before = tumor_dice(labels, scan.truth)
        start = time.perf_counter()
        updated, message = click(labels, ijk, positive, list(earlier))
        seconds = time.perf_counter() - start
        steps.append(Step(positive, size, before, tumor_dice(updated, scan.truth), not np.array_equal(updated, labels),
                          message, seconds))
        earlier.append((ijk, positive))
        labels = updated
    return steps


def dice_after(start: float, steps: list[Step], count: int) -> float:
    """Dice after ``count`` clicks (a scan without errors left keeps its last Dice)."""
    if count == 0 or not steps:
        return start
    return steps[min(count, len(steps)) - 1].dice_after


def summarize(start: float, steps: list[Step]) -> dict:
    drops = [s.dice_before - s.dice_after for s in steps if s.dice_after < s.dice_before]
    return {
        "dice": {str(n): dice_after(start, steps, n) for n in REPORTED_CLICKS},
        "clicks": len(steps),
        "lowering_share": len(drops) / len(steps) if steps else 0.0,
        "mean_drop": float(np.mean(drops)) if drops else 0.0,
        "largest_drop": float(max(drops)) if drops else 0.0,
        "mean_change": float(np.mean([s.dice_after - s.dice_before for s in steps])) if steps else 0.0,
        "no_change_share": sum(not s.changed for s in steps) / len(steps) if steps else 0.0,
        "median_seconds": float(np.median([s.seconds for s in steps])) if steps else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# Scans


def real_scan(folder: Path) -> Scan:
    return Scan(folder.name, "real", read_ct(folder / "ct.nii.gz"),
                sitk.GetArrayFromImage(read_image(folder / "labels.nii.gz")))


def phantom_scans(count: int, first_seed: int) -> list[Callable[[], Scan]]:
    def draw(seed: int) -> Scan:
        case = generate_case(seed)
        return Scan(f"phantom {seed}", "phantoms", case.image, sitk.GetArrayFromImage(case.labels))

    return [lambda seed=seed: draw(seed) for seed in range(first_seed, first_seed + count)]


def anatomy_scans(count: int, first_seed: int, maps_folder: Path) -> list[Callable[[], Scan]]:
    from LiverTumorDARNLib.anatomy import draw_case, split_maps, usable_label_maps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        held_out = split_maps(usable_label_maps(maps_folder))[1]

    def draw(index: int) -> Scan:
        path, seed = held_out[index % len(held_out)], first_seed + index
        case = draw_case(path, seed)
        return Scan(f"{path.parent.name}/{path.name.split('.')[0]} seed {seed}", "anatomy", case.image,
                    sitk.GetArrayFromImage(case.labels))

    return [lambda index=index: draw(index) for index in range(count)]


def darn_key(models: Path) -> str:
    """What DARN's label maps depend on: both stages' weights and the pipeline's code (a cache
    written before a change of the post-processing must not be read after it)."""
    files = [models / "darn-liver.pt", models / "darn-tumor.pt", Path(pipeline.__file__)]
    return "".join(file_sha256(path)[:4] for path in files)


def darn_labels(scan: Scan, segmenter: Segmenter, cache: Path | None, darn_version: str) -> np.ndarray:
    """DARN's label map of the scan, read from ``cache`` when an earlier run with the same
    weights and pipeline (:func:`darn_key`) wrote it there."""
    path = None if cache is None else cache / f"{scan.name.replace('/', '_').replace(' ', '_')}-{darn_version}.npy"
    if path is not None and path.exists():
        return np.load(path)
    labels = sitk.GetArrayFromImage(segmenter.segment(scan.ct).labels)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, labels)
    return labels


# --------------------------------------------------------------------------------------------
# Latency


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(click: Callable) -> Callable:
    """``click`` with the wall and CPU seconds of each call kept in the lists ``wall`` and ``cpu``
    of the returned function."""
    def wrapper(*args):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        result = click(*args)
        wrapper.wall.append(time.perf_counter() - start)
        wrapper.cpu.append(cpu_seconds() - start_cpu)
        return result

    wrapper.wall, wrapper.cpu = [], []
    return wrapper


def timing(click: Callable) -> dict:
    """The medians of a :func:`timed` click's calls."""
    return {"median_seconds": statistics.median(click.wall), "median_cpu_seconds": statistics.median(click.cpu),
            "clicks": len(click.wall)}


def latency(refiner: Refiner, segmenter: Segmenter, clicks: int, cache: Path | None, darn_version: str) -> dict:
    """Seconds per click of the protocol on a 512x512x200 phantom: the core, and the Slicer
    panel's click session on slicer-core (left out where slicer-core is not installed)."""
    case = generate_case(LATENCY_SEED, size_xyz=LATENCY_SIZE_XYZ)
    scan = Scan(f"phantom {LATENCY_SEED} 512x512x200", "latency", case.image, sitk.GetArrayFromImage(case.labels))
    start_labels = darn_labels(scan, segmenter, cache, darn_version)
    results = {"load_before": os.getloadavg()[0]}

    @timed
    def core_click(labels, ijk, positive, earlier):
        change = refiner.click(scan.ct, labels, ijk, positive, earlier)
        return change.labels, change.message

    core_click(start_labels, next_click(start_labels, scan.truth, tuple(scan.ct.GetSpacing()[::-1]))[0][::-1], True, [])
    core_click.wall.clear(), core_click.cpu.clear()  # the first call allocates: not a click's cost
    click_through(scan, start_labels, clicks, core_click)
    results["core"] = timing(core_click)
    try:
        results["slicer"] = slicer_latency(refiner, scan, start_labels, clicks)
    except ImportError:
        pass
    results["load_after"] = os.getloadavg()[0]
    return results


def slicer_latency(refiner: Refiner, scan: Scan, start_labels: np.ndarray, clicks: int) -> dict:
    """The protocol's clicks through ``tasks.ClickSession``, as the panel runs them: the click
    given in world RAS, waited for, its result written into the segments and the report
    measured. The next click is chosen from the segments read back (not timed)."""
    from LiverTumorDARNSceneLib import scene
    from LiverTumorDARNSceneLib.tasks import PANEL_POLL_MILLISECONDS, ClickSession

    scene.register_segmentation_converters()
    mrml = scene.slicer.vtkMRMLScene()
    volume = mrml.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    scene.set_volume_from_image(volume, scan.ct)
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverTumorDARN")
    scene.write_segments(segmentation, volume, start_labels)
    ijk_to_ras = scene.world_ijk_to_ras(volume)
    session = ClickSession(lambda: refiner)

    written = []  # per click, seconds until its segments are written (the report follows)

    @timed
    def panel_edit(ijk, positive):
        start = time.perf_counter()
        session.click(volume, segmentation, (ijk_to_ras @ [*ijk, 1.0])[:3], positive)
        while session.poll() is None:  # as the panel's timer polls
            time.sleep(PANEL_POLL_MILLISECONDS / 1000)
        written.append(time.perf_counter() - start)
        return session.wait()

    def panel_click(labels, ijk, positive, earlier):
        message = panel_edit(ijk, positive).message
        return scene.labels_from_segments(segmentation, volume), message  # for the next click's choice: not timed

    first = next_click(start_labels, scan.truth, tuple(scan.ct.GetSpacing()[::-1]))
    panel_edit(first[0][::-1], first[1])  # loads nothing (the refiner is given) but warms the thread
    session.undo(volume, segmentation)
    panel_edit.wall.clear(), panel_edit.cpu.clear(), written.clear()
    click_through(scan, scene.labels_from_segments(segmentation, volume), clicks, panel_click)
    return {**timing(panel_edit), "median_seconds_to_segments": statistics.median(written)}


# --------------------------------------------------------------------------------------------
# The run


def machine(device: torch.device) -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, device {device}"


def print_table(rows: list[tuple[str, dict]]) -> None:
    print(f"| scan | tumor Dice after {' / '.join(map(str, REPORTED_CLICKS))} clicks | clicks lowering Dice "
          f"(mean, largest drop) | clicks changing nothing | median s per click |")
    print("| --- | --- | --- | --- | --- |")
    for name, summary in rows:
        dice = " / ".join(f"{summary['dice'][str(n)]:.3f}" for n in REPORTED_CLICKS)
        print(f"| {name} | {dice} | {summary['lowering_share']:.0%} ({summary['mean_drop']:.3f}, "
              f"{summary['largest_drop']:.3f}) | {summary['no_change_share']:.0%} | {summary['median_seconds']:.2f} |")


def group_summary(cases: list[dict]) -> dict:
    """The mean of each measure over a group's scans (the median of their seconds per click, over
    the scans that had an error to click)."""
    steps = sum(case["clicks"] for case in cases)
    clicked = [case["median_seconds"] for case in cases if case["clicks"]]
    return {
        "dice": {str(n): float(np.mean([case["dice"][str(n)] for case in cases])) for n in REPORTED_CLICKS},
        "clicks": steps,
        "lowering_share": sum(case["lowering_share"] * case["clicks"] for case in cases) / max(steps, 1),
        "mean_drop": float(np.mean([case["mean_drop"] for case in cases if case["mean_drop"] > 0] or [0.0])),
        "largest_drop": max(case["largest_drop"] for case in cases),
        "mean_change": sum(case["mean_change"] * case["clicks"] for case in cases) / max(steps, 1),
        "no_change_share": sum(case["no_change_share"] * case["clicks"] for case in cases) / max(steps, 1),
        "median_seconds": float(np.median(clicked)) if clicked else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=6)
    parser.add_argument("--anatomy", type=int, default=6, help="scans drawn on held-out label maps")
    parser.add_argument("--anatomy-maps", type=Path, default=ANATOMY_MAPS)
    parser.add_argument("--real", default=str(REAL_SCAN), help="the real scan's folder ('' to leave it out)")
    parser.add_argument("--seed-start", type=int, default=BENCHMARK_SEED_START)
    parser.add_argument("--clicks", type=int, default=max(REPORTED_CLICKS))
    parser.add_argument("--timed-clicks", type=int, default=10, help="clicks timed on the 512x512x200 scan (0: none)")
    parser.add_argument("--models", type=Path, default=bundled_models_dir())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping DARN's label maps between runs")
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    parser.add_argument("--verbose", action="store_true", help="print every click")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"machine: {machine(device)}; {time.strftime('%Y-%m-%d %H:%M')}; load average {os.getloadavg()[0]:.1f}")
    print("command: python -m benchmarks.clicks " + " ".join(sys.argv[1:]))
    segmenter, refiner = Segmenter(args.models, device), Refiner.load(args.models, device)
    darn_version = darn_key(Path(args.models))
    sources = ([lambda: real_scan(Path(args.real))] if args.real else []) + phantom_scans(args.phantoms, args.seed_start)
    if args.anatomy:
        sources += anatomy_scans(args.anatomy, args.seed_start, args.anatomy_maps)
    results: dict = {"cases": {}, "groups": {}}
    rows: list[tuple[str, dict]] = []
    by_group: dict[str, list[dict]] = {}
    for source in sources:
        scan = source()
        labels = darn_labels(scan, segmenter, args.cache, darn_version)

        def core_click(labels, ijk, positive, earlier, scan=scan):
            change = refiner.click(scan.ct, labels, ijk, positive, earlier)
            return change.labels, change.message

        steps = click_through(scan, labels, args.clicks, core_click)
        summary = summarize(tumor_dice(labels, scan.truth), steps)
        if args.verbose:
            for number, step in enumerate(steps, start=1):
                print(f"  {scan.name} click {number} {'+' if step.positive else '-'} on {step.error_voxels} voxels: "
                      f"{step.message}; Dice {step.dice_before:.3f} -> {step.dice_after:.3f} ({step.seconds:.2f} s)")
        results["cases"][scan.name] = {**summary, "group": scan.group, "steps": [dataclasses.asdict(s) for s in steps]}
        rows.append((scan.name, summary))
        by_group.setdefault(scan.group, []).append(summary)
        print_table(rows[-1:])
        sys.stdout.flush()
    for group, cases in by_group.items():
        results["groups"][group] = group_summary(cases)
    print("\nAll scans:")
    print_table(rows)
    print("\nMeans by group:")
    print_table([(f"{group} ({len(by_group[group])} scans)", summary) for group, summary in results["groups"].items()])
    for name, targets in TARGETS.items():
        if name in results["cases"]:
            for clicks, target in targets.items():
                value = results["cases"][name]["dice"][str(clicks)]
                print(f"target {name} after {clicks} clicks: {value:.3f} (>= {target}: {'met' if value >= target else 'NOT met'})")
    if args.timed_clicks:
        results["latency"] = latency(refiner, segmenter, args.timed_clicks, args.cache, darn_version)
        limit = LATENCY_TARGET_S[device.type]
        for where in ("core", "slicer"):
            if where in results["latency"]:
                measured = results["latency"][where]
                print(f"seconds per click on 512x512x200, {where}: median {measured['median_seconds']:.3f} wall, "
                      f"{measured['median_cpu_seconds']:.3f} CPU ({measured['clicks']} clicks; target <= {limit} wall "
                      f"through the Slicer scene)")
        if "slicer" in results["latency"]:
            print(f"seconds per click through the Slicer scene until the segments show it: median "
                  f"{results['latency']['slicer']['median_seconds_to_segments']:.3f} (the report follows)")
        print(f"load average (1 min) before and after the timing: {results['latency']['load_before']:.1f}, "
              f"{results['latency']['load_after']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

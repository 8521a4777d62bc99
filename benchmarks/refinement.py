"""Boundary refinement with the bundled weights, against issue 4's targets.

    .venv/bin/python benchmarks/refinement.py [--cases 8] [--device cpu] [--clicks 10] [--record]

On full-size phantoms from seeds 900000 + k (never trained on), for every true tumor:
1. Corrupted coarse masks: the tumor eroded, dilated, shifted, smoothed, with a piece missing,
   with an extra piece, merged with a neighbouring blob (training.refine_task.corrupt). Dice and VOE
   of the coarse mask, of its refinement, and of DARN's own prediction ("re-running DARN"), in
   the tumor's neighbourhood (its box widened by 15 mm).
2. Good masks (coarse Dice >= 0.9, the true mask included): they must stay as good on average.
3. A click on empty liver where the tumor was removed from the map: Dice of the added lesion.
   Measures 1-3 are also given by the true tumor's volume (``SIZE_CLASSES_ML``): lesions of a
   few voxels, small and large ones do not gain alike, and one mean hides which fail.
4. Whole cases: DARN's label map against DARN followed by "refine all" (LiTS tumor Dice per
   case and global).
5. Latency of one click (patch extraction, network, paste-back) on a 512x512x200 volume, by the
   core alone and through the Slicer module's scene logic (segments read and written back), with
   the tumors in one segment and with one segment per tumor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import cc3d
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from LiverTumorDARNLib import Segmenter
from LiverTumorDARNLib.io import write_json
from LiverTumorDARNLib.labels import LIVER, TUMOR
from LiverTumorDARNLib.phantom import BENCHMARK_SEED_START, generate_case
from LiverTumorDARNLib.pipeline import resolve_device
from LiverTumorDARNLib.refine import Refiner
from LiverTumorDARNLib.regions import widened_mm
from LiverTumorDARNLib.training.refine_task import corrupted_map
from LiverTumorDARNLib.weights import MANIFEST_NAME, bundled_models_dir, load_manifest

CORRUPTIONS = ("erode", "dilate", "shift", "smooth", "missing", "extra", "merged")
NEIGHBOURHOOD_MM = 15.0
SIZE_CLASSES_ML = (0.1, 5.0)
TARGETS = {"dice_gain_corrupted": 0.08, "good_mask_change": 0.0, "click_new_lesion_dice": 0.70}
LATENCY_TARGETS_S = {"cpu": 1.0, "cuda": 0.1}


def overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Dice, VOE) of two masks; both empty counts as perfect."""
    union, both = (a | b).sum(), (a & b).sum()
    if union == 0:
        return 1.0, 0.0
    return float(2 * both / (a.sum() + b.sum())), float(1 - both / union)


def score(labels: np.ndarray, truth: np.ndarray, region) -> tuple[float, float]:
    return overlap(labels[region] == TUMOR, truth[region] == TUMOR)


def tumor_experiments(case, darn_labels: np.ndarray | None, refiner: Refiner, rng) -> list[dict]:
    """One row per (tumor, experiment): coarse, refined and DARN scores in the tumor's neighbourhood
    (DARN's NaN where ``darn_labels`` is None)."""
    ct, truth = case.image, sitk.GetArrayFromImage(case.labels)
    spacing = tuple(ct.GetSpacing()[::-1])
    components = cc3d.connected_components(truth == TUMOR, connectivity=26)
    rows = []
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        region = widened_mm(box, NEIGHBOURHOOD_MM, spacing, truth.shape)
        true_tumor = components[region] == number
        volume_ml = float(true_tumor.sum() * np.prod(spacing) / 1000)
        darn = (math.nan, math.nan) if darn_labels is None else score(darn_labels, truth, region)
        for kind in (*CORRUPTIONS, "good"):
            coarse, coarse_tumor = corrupted_map(truth, region, true_tumor, kind, spacing, rng)
            if not coarse_tumor.any():
                continue
            refined = refiner.refine_tumor(ct, coarse, coarse_tumor, region).labels
            rows.append({"seed": case.seed, "tumor": number, "volume_ml": volume_ml, "kind": kind,
                         "coarse": score(coarse, truth, region), "refined": score(refined, truth, region), "darn": darn})
        missed = truth.copy()
        missed[region][true_tumor] = LIVER
        depth = ndimage.distance_transform_edt(true_tumor, sampling=spacing)
        deepest = np.unravel_index(np.argmax(depth), depth.shape)
        point = [int(d + r.start) for d, r in zip(deepest, region)][::-1]
        added = refiner.click(ct, missed, point).labels
        rows.append({"seed": case.seed, "tumor": number, "volume_ml": volume_ml, "kind": "click on missed lesion",
                     "coarse": score(missed, truth, region), "refined": score(added, truth, region), "darn": darn})
    return rows


def case_scores(truth: np.ndarray, labels: np.ndarray) -> tuple[float, int, int, int]:
    """(per-case tumor Dice, intersection, prediction voxels, truth voxels) for global Dice."""
    a, b = labels == TUMOR, truth == TUMOR
    both, total = int((a & b).sum()), int(a.sum() + b.sum())
    return (1.0 if total == 0 else 2 * both / total), both, int(a.sum()), int(b.sum())


def click_latency(refiner: Refiner, clicks: int) -> dict:
    """Median seconds of a positive click on a tumor and on empty liver, 512x512x200 volume: the
    core alone (``click_seconds_*``) and through the Slicer module's scene logic on slicer-core's
    MRML classes, where the segments are read into a label map first and the changed box is
    written back (``slicer_click_seconds_*``, and ``slicer_per_tumor_click_seconds_*`` with one
    segment per tumor; left out where slicer-core is not installed)."""
    case = generate_case(BENCHMARK_SEED_START + 500, size_xyz=(512, 512, 200))
    truth = sitk.GetArrayFromImage(case.labels)
    coarse = np.where(ndimage.binary_erosion(truth == TUMOR), TUMOR, np.minimum(truth, LIVER)).astype(np.uint8)
    points = {"tumor": np.argwhere(coarse == TUMOR), "liver": np.argwhere(coarse == LIVER)}
    refiner.click(case.image, coarse, points["tumor"][0][::-1])  # first call: allocations, not a click's cost
    results = {f"click_seconds_{name}": seconds for name, seconds in
               median_seconds(lambda ijk: refiner.click(case.image, coarse, ijk), None, points, clicks).items()}
    try:
        from LiverTumorDARNSceneLib import scene
    except ImportError:
        return results
    for layout, per_tumor in (("slicer", False), ("slicer_per_tumor", True)):
        results |= {f"{layout}_click_seconds_{name}": seconds for name, seconds in
                    slicer_click_latency(scene, case.image, coarse, refiner, points, clicks, per_tumor).items()}
    return results


def slicer_click_latency(scene, ct: sitk.Image, coarse: np.ndarray, refiner: Refiner, points: dict,
                         clicks: int, per_tumor: bool) -> dict:
    """``median_seconds`` of a click through the panel's click session (``tasks.ClickSession``: the
    segments read into a label map, the click on the session's thread, the changed box written back
    and the report measured) on a scene holding ``ct`` and ``coarse`` as segments, the tumors in one
    segment or (``per_tumor``) one segment each."""
    from LiverTumorDARNSceneLib.tasks import ClickSession

    scene.register_segmentation_converters()
    mrml = scene.slicer.vtkMRMLScene()
    volume = mrml.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    scene.set_volume_from_image(volume, ct)
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverTumorDARN")
    ijk_to_ras = scene.world_ijk_to_ras(volume)
    session = ClickSession(lambda: refiner)

    def slicer_click(ijk):
        session.click(volume, segmentation, (ijk_to_ras @ [*ijk, 1.0])[:3])
        session.wait()

    def reset():  # every click starts from the same segments, untimed
        scene.write_segments(segmentation, volume, coarse, per_tumor)

    reset()
    slicer_click(points["tumor"][0][::-1])  # first call: allocations, not a click's cost
    return median_seconds(slicer_click, reset, points, clicks)


def median_seconds(click, reset, points: dict, clicks: int) -> dict:
    """Median seconds of ``click`` at random voxels (i, j, k) of each kind of ``points`` ([z, y, x])."""
    rng = np.random.default_rng(0)
    times = {name: [] for name, found in points.items() if len(found)}
    for _ in range(clicks):
        for name in times:
            if reset is not None:
                reset()
            point = points[name][rng.integers(len(points[name]))][::-1]
            start = time.perf_counter()
            click(point)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def mean(rows, key, index=0, where=lambda row: True) -> float:
    values = [row[key][index] for row in rows if where(row)]
    return float(np.mean(values)) if values else float("nan")


def print_kind_table(rows: list[dict]) -> None:
    print(f"{'experiment':26s} {'n':>4s} {'coarse Dice':>12s} {'refined Dice':>13s} {'DARN Dice':>10s} "
          f"{'coarse VOE':>11s} {'refined VOE':>12s}")
    for kind in (*CORRUPTIONS, "good", "click on missed lesion"):
        subset = [row for row in rows if row["kind"] == kind]
        print(f"{kind:26s} {len(subset):4d} {mean(subset, 'coarse'):12.3f} {mean(subset, 'refined'):13.3f} "
              f"{mean(subset, 'darn'):10.3f} {mean(subset, 'coarse', 1):11.3f} {mean(subset, 'refined', 1):12.3f}")


def size_class(volume_ml: float) -> str:
    small, large = SIZE_CLASSES_ML
    if volume_ml < small:
        return f"under {small:g} mL"
    return f"{small:g} to {large:g} mL" if volume_ml < large else f"{large:g} mL and over"


def print_size_table(rows: list[dict]) -> None:
    """The issue's three measures for tumors of each size class (true volume)."""
    print(f"{'true tumor volume':26s} {'tumors':>6s} {'corrupted coarse':>17s} {'refined':>8s} "
          f"{'good masks change':>18s} {'click Dice':>11s}")
    classes: dict[str, list[dict]] = {}  # smallest class first
    for row in sorted(rows, key=lambda row: row["volume_ml"]):
        classes.setdefault(size_class(row["volume_ml"]), []).append(row)
    for name, subset in classes.items():
        summary = summarize_rows(subset)
        tumors = len({(row["seed"], row["tumor"]) for row in subset})
        print(f"{name:26s} {tumors:6d} {summary['corrupted_coarse_dice']:17.3f} {summary['corrupted_refined_dice']:8.3f} "
              f"{summary['good_mask_change']:+18.3f} {summary['click_new_lesion_dice']:11.3f}")


def summarize_rows(rows: list[dict]) -> dict:
    """The issue's measures over the experiment rows: corrupted masks, good masks, clicks."""
    corrupted = [row for row in rows if row["kind"] in CORRUPTIONS]
    good = [row for row in rows if row["kind"] != "click on missed lesion" and row["coarse"][0] >= 0.9]
    clicked = [row for row in rows if row["kind"] == "click on missed lesion"]
    results = {
        "corrupted_coarse_dice": mean(corrupted, "coarse"), "corrupted_refined_dice": mean(corrupted, "refined"),
        "corrupted_coarse_voe": mean(corrupted, "coarse", 1), "corrupted_refined_voe": mean(corrupted, "refined", 1),
        "darn_dice": mean(corrupted, "darn"),
        "good_coarse_dice": mean(good, "coarse"), "good_refined_dice": mean(good, "refined"),
        "click_new_lesion_dice": mean(clicked, "refined")}
    results["dice_gain_corrupted"] = results["corrupted_refined_dice"] - results["corrupted_coarse_dice"]
    results["good_mask_change"] = results["good_refined_dice"] - results["good_coarse_dice"]
    return results


def print_tables(rows: list[dict], whole: dict) -> dict:
    print_kind_table(rows)
    print()
    print_size_table(rows)
    print(f"\nWhole cases, tumor Dice per case / global: DARN {whole['darn_dice_per_case']:.3f} / "
          f"{whole['darn_dice_global']:.3f}; DARN + refine all {whole['refined_dice_per_case']:.3f} / "
          f"{whole['refined_dice_global']:.3f}")
    return summarize_rows(rows) | whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clicks", type=int, default=10, help="timed clicks of each kind")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--record", action="store_true", help="write the results into the bundled manifest")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, device {device}")
    segmenter, refiner = Segmenter(bundled_models_dir(), device), Refiner.load(bundled_models_dir(), device)
    rng = np.random.default_rng(0)
    rows, per_case = [], {"darn": [], "refined": []}
    for seed in range(BENCHMARK_SEED_START, BENCHMARK_SEED_START + args.cases):
        case = generate_case(seed)
        truth = sitk.GetArrayFromImage(case.labels)
        darn_labels = sitk.GetArrayFromImage(segmenter.segment(case.image).labels)
        rows += tumor_experiments(case, darn_labels, refiner, rng)
        per_case["darn"].append(case_scores(truth, darn_labels))
        per_case["refined"].append(case_scores(truth, refiner.refine_all(case.image, darn_labels).labels))
        print(f"seed {seed}: {len(case.tumors)} tumors drawn", file=sys.stderr)
    whole = {}
    for name, scores in per_case.items():
        whole[f"{name}_dice_per_case"] = float(np.mean([s[0] for s in scores]))
        both, predicted, true = (sum(s[i] for s in scores) for i in (1, 2, 3))
        whole[f"{name}_dice_global"] = 2 * both / max(predicted + true, 1)
    print(f"Phantoms (seeds {BENCHMARK_SEED_START}..{BENCHMARK_SEED_START + args.cases - 1}, never trained on), "
          f"per tumor, in its neighbourhood (box + {NEIGHBOURHOOD_MM:.0f} mm):")
    results = print_tables(rows, whole)
    results.update(click_latency(refiner, args.clicks))
    print("\nTarget check:")
    for key, target in TARGETS.items():
        print(f"  {key:26s} {results[key]:8.3f}   target >= {target}   {'met' if results[key] >= target else 'NOT met'}")
    for key in [key for key in results if "click_seconds" in key]:
        limit = LATENCY_TARGETS_S[device.type]
        print(f"  {key:26s} {results[key]:8.3f}   target <= {limit}   {'met' if results[key] <= limit else 'NOT met'}")
    print(json.dumps(results))
    if args.record:
        manifest = load_manifest(bundled_models_dir())
        manifest["models"]["refine"]["metrics"]["benchmark"] = {
            "command": "benchmarks/refinement.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, device {device}",
            "date": time.strftime("%Y-%m-%d"), "phantom_cases": args.cases, "results": results}
        write_json(manifest, bundled_models_dir() / MANIFEST_NAME, overwrite=True)


if __name__ == "__main__":
    main()

"""Training the boundary-refinement network: (image patch, coarse-mask patch, clicks) in, true tumor out.

The coarse masks are what the network will be given in use:
- DARN's own predictions on the training scans (the bundled weights, or ``--models``), and
- synthetic corruptions of each true tumor (``CORRUPTIONS``): eroded, dilated, shifted, smoothed,
  a missing piece, an extra piece, merged with a neighbouring blob, the seed of a click on the
  tumor as if it were missed (``lesion_seeds.lesion_seed`` at a point inside it: "click"), the seed ball
  (such a click where the contrast gives no seed: "seed"), a blob in tumor-free liver (a false
  positive, target: nothing), and the truth itself (a good mask must stay good).
Patches are cut by the same ``patches.patch_around`` / ``patch_inputs`` as inference, around the
coarse mask, so training sees exactly the geometry a click produces. The target is every true
tumor voxel in the patch. The loss is DARN's Dice + cross-entropy over two classes.

A network with click channels (``in_channels`` 4, the default) is trained on simulated click
sequences, as interactive segmentation networks are (:func:`simulated_clicks`): up to
``MAX_SIMULATED_CLICKS`` clicks on the coarse mask's errors, largest first, each at the error's
deepest point or at another deep point (people do not click on the exact centre), positive on
missed tumor and negative on false tumor, the largest last (the newest click, on which
inference centres the patch), and at times a click on a part already right (an earlier click
that was followed). A good mask mostly gets no click, so good masks stay good. ``--init-from``
starts from a weights folder's refinement network; a 2-channel one (trained before clicks) gets
zero weights for the click channels, so the run starts from exactly that network.

Scans come from phantoms, from CT drawn on real label maps (``--anatomy``: ``anatomy.draw_case``
on the maps ``anatomy.split_maps`` keeps for training, validation on the maps it holds out; a
``phantom_fraction`` of phantoms all the same) or from a LiTS-layout ``--data`` folder.

Phantoms are full-size, half of them domain-randomised. A pool of scans is held in memory and one
is replaced every ``refresh_every`` steps. Many
scans matter more than many steps: on a pool replaced slowly the network learned the pool's
tumors by heart (training loss falling, held-out Dice falling with it). A DARN run costs twice
the drawing of a phantom, so only ``darn_fraction`` of the training scans get DARN's masks.
Validation: a fixed set of samples from held-out seeds, scored by mean patch Dice; ``best.pt``
keeps the best. ``export`` turns a checkpoint into ``refine.pt`` in the weights manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

import cc3d
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .errors import InputError
from .io import read_ct, read_image
from .labels import LIVER, TUMOR
from .metrics import dice
from .models import build_model
from .phantom import VALIDATION_SEED_START, generate_case
from .pipeline import load_stages, segment
from .label_edits import paste_tumor
from .lesion_seeds import SEED_RADIUS_MM, lesion_seed
from .patches import (CLICK_CHANNELS, IMAGE_CHANNELS, PATCH_SIZE, Click, index_bounds, labels_to_patch, liver_hu,
                      patch_around, patch_inputs)
from .regions import Box, ball, on_region, widened_mm
from .training import dice_ce_loss, find_lits_pairs, poly_learning_rate, resolve_amp, save_checkpoint, split_lits_pairs

CORRUPTIONS = ("darn", "erode", "dilate", "shift", "smooth", "missing", "extra", "merged", "click", "seed", "good",
               "false")
MAX_GRADIENT_NORM = 12.0
MAX_SIMULATED_CLICKS = 4
CLICK_CONTEXT_MM = 12.0
"""Clicks are simulated on the errors within this margin of the coarse tumor's box."""
MIN_CLICKED_ERROR_VOXELS = 8
"""Error regions smaller than this get no click: nobody clicks on a voxel or two."""
RIGHT_CLICK_SHARE = 0.25
"""Samples that get a click on a part the mask has right besides."""


@dataclasses.dataclass
class RefineConfig:
    out_dir: Path
    data: Path | None = None
    models_dir: Path | None = None
    """DARN weights for the coarse predictions; None: the bundled ones."""
    iterations: int = 2000
    batch_size: int = 8
    learning_rate: float = 1e-3
    pool_size: int = 8
    refresh_every: int = 100
    val_cases: int = 3
    val_every: int = 200
    widths: tuple[int, ...] = (12, 24, 48, 96)
    phantom_seed_start: int = 0
    randomize_fraction: float = 0.5
    darn_fraction: float = 0.25
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    num_threads: int | None = None
    amp: bool | None = None
    """bfloat16 autocast; None: on for CUDA only (see ``train_refiner``)."""
    in_channels: int = IMAGE_CHANNELS + CLICK_CHANNELS
    """4: the network takes the click channels; 2: image and coarse mask only."""
    anatomy: Path | None = None
    """A folder of real label maps to draw training CT on (``anatomy.draw_case``); None: phantoms."""
    phantom_fraction: float = 0.2
    """With ``anatomy``: the share of training scans that are phantoms all the same."""
    init_from: Path | None = None
    """A weights folder whose refinement network starts the run."""


@dataclasses.dataclass(eq=False)
class Scan:
    """A training scan and what sampling needs of it, computed once (a scan has ~80 M voxels;
    a sample touches only a patch of them)."""

    ct: sitk.Image
    truth: np.ndarray
    organ: np.ndarray  # liver and tumor, true
    tumors: np.ndarray  # 26-connected components of the true tumor
    tumor_boxes: list
    darn: np.ndarray | None  # 26-connected components of DARN's tumor; None: not segmented by DARN
    darn_boxes: list
    liver_points: np.ndarray  # a sample of tumor-free liver voxels, for false positives
    liver_hu: float  # the image channel's reference
    spacing_zyx: tuple[float, float, float]


def make_scan(ct: sitk.Image, truth: sitk.Image, stages) -> Scan:
    """The scan, with DARN's coarse tumors when ``stages`` (liver, tumor) are given."""
    truth_array = sitk.GetArrayFromImage(truth)
    tumors = cc3d.connected_components(truth_array == TUMOR, connectivity=26)
    darn = None
    if stages is not None:
        coarse = sitk.GetArrayFromImage(segment(ct, *stages, torch.device("cpu")).labels)
        darn = cc3d.connected_components(coarse == TUMOR, connectivity=26)
    liver_points = np.argwhere(truth_array == LIVER)
    liver_points = liver_points[np.random.default_rng(0).permutation(len(liver_points))[:1000]]
    return Scan(ct, truth_array, truth_array > 0, tumors, ndimage.find_objects(tumors), darn,
                [] if darn is None else ndimage.find_objects(darn), liver_points, liver_hu(ct, truth_array),
                tuple(ct.GetSpacing()[::-1]))


# --------------------------------------------------------------------------------------------
# Coarse masks


def corrupt(truth: np.ndarray, organ: np.ndarray, kind: str, spacing_zyx, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong mask made from the true tumor ``truth`` (bool, on a crop with room around it)."""
    spacing = np.asarray(spacing_zyx)
    if kind == "good":
        return truth
    if kind == "erode":
        eroded = ndimage.distance_transform_edt(truth, sampling=spacing) > rng.uniform(0.8, 3.0)
        return eroded if eroded.any() else truth
    if kind == "dilate":
        return (ndimage.distance_transform_edt(~truth, sampling=spacing) <= rng.uniform(0.8, 4.0)) & organ
    if kind == "shift":
        offset = rng.normal(size=3)
        offset *= rng.uniform(1.0, 4.0) / np.linalg.norm(offset) / spacing
        return ndimage.shift(truth, offset, order=0) & organ
    if kind == "smooth":
        sigma = rng.uniform(1.0, 3.0) / spacing
        return (ndimage.gaussian_filter(truth.astype(np.float32), sigma) > rng.uniform(0.3, 0.7)) & organ
    if kind == "missing":
        points = np.argwhere(truth)
        normal = rng.normal(size=3)
        side = (np.indices(truth.shape).reshape(3, -1).T - points[rng.integers(len(points))]) * spacing @ normal
        kept = truth & (side.reshape(truth.shape) < 0)
        return kept if kept.any() else truth
    if kind in ("extra", "merged"):
        points = np.argwhere(truth)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        distance = rng.uniform(2.0, 6.0) if kind == "extra" else rng.uniform(6.0, 12.0)
        centre = np.clip(np.round(points.mean(0) + direction * (distance + _radius_mm(truth, spacing)) / spacing),
                         0, np.array(truth.shape) - 1).astype(int)
        blob, box = ball(tuple(centre), rng.uniform(2.0, 5.0), spacing, truth.shape)
        added = np.zeros_like(truth)
        added[box] = blob
        if kind == "merged":  # a bridge: the blob and the tumor grown into each other
            added |= ndimage.binary_dilation(added | truth, iterations=2) & ~truth & _segment_mask(truth, centre)
        return (truth | added) & organ
    if kind == "seed":
        sphere, box = ball(_inner_point(truth, spacing, rng), SEED_RADIUS_MM, spacing, truth.shape)
        seeded = np.zeros_like(truth)
        seeded[box] = sphere
        return seeded & organ
    raise ValueError(f"unknown corruption {kind!r}")


def _inner_point(mask: np.ndarray, spacing_zyx, rng: np.random.Generator) -> tuple[int, int, int]:
    """A voxel of ``mask`` at 30-90 % of its greatest depth: where a radiologist clicks a lesion."""
    depth = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    inner = np.argwhere(depth >= depth.max() * rng.uniform(0.3, 0.9))
    return tuple(int(i) for i in inner[rng.integers(len(inner))])


def corrupted_map(truth: np.ndarray, region: tuple, true_tumor: np.ndarray, kind: str, spacing_zyx,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The label map ``truth`` with one true tumor (``true_tumor``, bool on ``region``) replaced by
    its corruption ``kind``: (the map, the corrupted tumor on ``region``). What the tumor loses
    becomes liver."""
    coarse_tumor = corrupt(true_tumor, truth[region] > 0, kind, spacing_zyx, rng)
    return paste_tumor(truth, region, true_tumor, coarse_tumor, kind).labels, coarse_tumor


def _radius_mm(mask: np.ndarray, spacing: np.ndarray) -> float:
    return float((mask.sum() * np.prod(spacing) * 3 / (4 * np.pi)) ** (1 / 3))


def _segment_mask(mask: np.ndarray, point) -> np.ndarray:
    """The voxels near the straight line from ``mask``'s centre to ``point`` (a bridge's path)."""
    start = np.argwhere(mask).mean(0)
    grid = np.indices(mask.shape).reshape(3, -1).T
    direction = np.asarray(point) - start
    t = np.clip((grid - start) @ direction / max(direction @ direction, 1e-6), 0, 1)
    return (np.linalg.norm(grid - (start + t[:, None] * direction), axis=1) <= 2.0).reshape(mask.shape)


# --------------------------------------------------------------------------------------------
# Samples


def draw_sample(scan: Scan, rng: np.random.Generator, with_clicks: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(inputs [2, P, P, P], or [4, P, P, P] ``with_clicks``; target [P, P, P]) for one corrupted
    tumor of ``scan``, or None when the scan offers none of the drawn kind."""
    kind = CORRUPTIONS[rng.integers(len(CORRUPTIONS))]
    clicked: list[Click] = []
    if kind == "false":
        drawn = _false_positive(scan, rng)
    elif not scan.tumor_boxes:
        return None
    else:
        number = int(rng.integers(1, len(scan.tumor_boxes) + 1))
        if kind == "darn":
            drawn = _darn_component(scan, number)
        elif kind == "click":
            *drawn, point = _click_seed(scan, number, rng)
            clicked = [Click(point, True)]
        else:
            box = widened_mm(scan.tumor_boxes[number - 1], 12.0, scan.spacing_zyx, scan.truth.shape)
            drawn = corrupt(scan.tumors[box] == number, scan.organ[box], kind, scan.spacing_zyx, rng), box
    if drawn is None or not drawn[0].any():
        return None
    coarse, box = drawn
    clicks = (simulated_clicks(scan, coarse, box, rng) + clicked) if with_clicks else None
    focus = [clicks[-1].point] if clicks else []
    patch = patch_around(scan.ct, *index_bounds(coarse, box, focus), context=rng.uniform(1.3, 1.8))
    inputs = patch_inputs(scan.ct, on_region(coarse, box, patch.region), patch, scan.liver_hu, clicks)
    target = (labels_to_patch(scan.truth, scan.ct, patch) == TUMOR).astype(np.int64)
    return inputs, target


def simulated_clicks(scan: Scan, coarse: np.ndarray, box: Box, rng: np.random.Generator) -> list[Click]:
    """The clicks a person might have made on ``coarse`` (bool on ``box``) so far: up to
    ``MAX_SIMULATED_CLICKS`` on its errors against the truth, the largest error last, and at times
    one on a part it has right (see the module's docstring)."""
    region = widened_mm(box, CLICK_CONTEXT_MM, scan.spacing_zyx, scan.truth.shape)
    mask, true = on_region(coarse, box, region), scan.truth[region] == TUMOR
    errors = []
    for positive, error in ((True, true & ~mask), (False, mask & ~true)):
        components = cc3d.connected_components(error, connectivity=26)
        sizes = np.bincount(components.ravel())
        errors += [(int(sizes[n]), positive, components == n) for n in range(1, len(sizes))
                   if sizes[n] >= MIN_CLICKED_ERROR_VOXELS]
    errors.sort(key=lambda error: error[0])
    count = int(rng.integers(0, MAX_SIMULATED_CLICKS + 1))
    clicks = [Click(_global(_click_point(part, scan.spacing_zyx, rng), region), positive)
              for _, positive, part in errors[len(errors) - min(count, len(errors)):]]
    right = mask & true
    if right.any() and rng.random() < RIGHT_CLICK_SHARE:
        clicks.insert(0, Click(_global(_click_point(right, scan.spacing_zyx, rng), region), True))
    return clicks


def _click_point(mask: np.ndarray, spacing_zyx, rng: np.random.Generator) -> tuple[int, int, int]:
    """Where a click on ``mask`` lands: half the time its deepest point (the benchmark's
    protocol), else another deep point (:func:`_inner_point`)."""
    if rng.random() < 0.5:
        depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
        return tuple(int(i) for i in np.unravel_index(np.argmax(depth), depth.shape))
    return _inner_point(mask, spacing_zyx, rng)


def _global(point: tuple[int, int, int], region: Box) -> tuple[int, int, int]:
    return tuple(int(p + r.start) for p, r in zip(point, region))


def _darn_component(scan: Scan, number: int) -> tuple[np.ndarray, tuple] | None:
    """DARN's tumor that overlaps true tumor ``number`` most, on its box."""
    if scan.darn is None:
        return None
    box = scan.tumor_boxes[number - 1]
    overlap = np.bincount(scan.darn[box][scan.tumors[box] == number], minlength=1)
    overlap[0] = 0
    if overlap.max() == 0:
        return None
    found = int(np.argmax(overlap))
    darn_box = scan.darn_boxes[found - 1]
    return scan.darn[darn_box] == found, darn_box


def _click_seed(scan: Scan, number: int, rng) -> tuple[np.ndarray, tuple, tuple[int, int, int]]:
    """What a click inside true tumor ``number`` starts from were the tumor missed (the seed, its
    box), and the click: the seed reads only the CT and where the liver is, so the true map serves."""
    box = scan.tumor_boxes[number - 1]
    point = _global(_inner_point(scan.tumors[box] == number, scan.spacing_zyx, rng), box)
    return (*lesion_seed(scan.ct, scan.truth, point, scan.liver_hu), point)


def _false_positive(scan: Scan, rng) -> tuple[np.ndarray, tuple] | None:
    if len(scan.liver_points) == 0:
        return None
    sphere, box = ball(tuple(scan.liver_points[rng.integers(len(scan.liver_points))]), rng.uniform(3.0, 8.0),
                       scan.spacing_zyx, scan.truth.shape)
    return sphere & scan.organ[box], box


def draw_batch(scans: list[Scan], size: int, rng: np.random.Generator,
               with_clicks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = [], []
    while len(inputs) < size:
        sample = draw_sample(scans[rng.integers(len(scans))], rng, with_clicks)
        if sample is None:
            continue
        image, target = sample
        for axis in range(3):  # the volume's own flips are in the phantoms; these add the patch's
            if rng.random() < 0.5:
                image, target = np.flip(image, axis + 1), np.flip(target, axis)
        inputs.append(np.ascontiguousarray(image))
        targets.append(np.ascontiguousarray(target))
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))


# --------------------------------------------------------------------------------------------
# The run


def _scan_source(config: RefineConfig) -> tuple[Callable[[int], tuple], Callable[[int], tuple]]:
    """(training, validation) scan sources: index -> (CT, labels)."""
    if config.data is not None:
        train_pairs, val_pairs = split_lits_pairs(find_lits_pairs(config.data), config.val_cases, config.seed)
        return lambda i: _read_pair(train_pairs[i % len(train_pairs)]), lambda i: _read_pair(val_pairs[i])

    def phantom(seed: int):
        case = generate_case(seed, randomize=_randomized(seed, config))
        return case.image, case.labels

    if config.anatomy is None:
        return (lambda i: phantom(config.phantom_seed_start + i), lambda i: phantom(VALIDATION_SEED_START + 500 + i))
    from .anatomy import draw_case, split_maps, usable_label_maps

    train_maps, val_maps = split_maps(usable_label_maps(Path(config.anatomy)))
    if not train_maps or not val_maps:
        raise InputError(f"{config.anatomy}: too few usable label maps to hold some out for validation")

    def drawn(seed: int, path: Path):
        case = draw_case(path, seed, randomize=_randomized(seed, config))
        return case.image, case.labels

    def training(i: int):
        seed = config.phantom_seed_start + i
        choice = np.random.default_rng([seed, 3])
        if choice.random() < config.phantom_fraction:
            return phantom(seed)
        return drawn(seed, train_maps[int(choice.integers(len(train_maps)))])

    return training, lambda i: drawn(VALIDATION_SEED_START + 500 + i, val_maps[i % len(val_maps)])


def _randomized(seed: int, config: RefineConfig) -> bool:
    return bool(np.random.default_rng([seed, 2]).random() < config.randomize_fraction)


def _read_pair(pair):
    return read_ct(pair[0]), read_image(pair[1])


def train_refiner(config: RefineConfig) -> Path:
    """Train (or resume) the refinement network; returns ``last.pt``.

    The network runs in channels-last memory, and with ``amp`` under bfloat16 autocast (no loss
    scaling: bfloat16 has float32's range). Both are oneDNN's fast path on the CPU: on the 2-core
    development machine (AVX-512 BF16) a step of 8 patches takes about 0.42 s with ``amp`` and 0.65-0.72 s
    without (``benchmarks/training_step.py``); in the default layout a float32 step took about
    0.9 s. Whether bfloat16 trains this network as well as float32 has not been measured.
    """
    from tqdm import tqdm

    from .pipeline import resolve_device
    from .weights import bundled_models_dir

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.phantom_seed_start + 100_000 > VALIDATION_SEED_START and config.data is None:
        raise InputError(f"--phantom-seed-start must stay below {VALIDATION_SEED_START - 100_000}: the seeds above are held out")
    if config.data is not None and config.anatomy is not None:
        raise InputError("train on a LiTS-layout folder or on label maps to draw CT on, not both")
    if not 0 <= config.phantom_fraction <= 1:
        raise InputError(f"the phantom share must lie in 0..1, got {config.phantom_fraction}")
    if config.in_channels not in (IMAGE_CHANNELS, IMAGE_CHANNELS + CLICK_CHANNELS):
        raise InputError(f"a refinement network takes {IMAGE_CHANNELS} or {IMAGE_CHANNELS + CLICK_CHANNELS} input "
                         f"channels, not {config.in_channels}")
    out_dir = Path(config.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if last_path.exists() and not config.resume:
        raise InputError(f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose another --out")
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device)
    stages = load_stages(config.models_dir or bundled_models_dir(), torch.device("cpu"))
    architecture = {"architecture": "refine", "widths": list(config.widths), "in_channels": config.in_channels}
    with_clicks = config.in_channels == IMAGE_CHANNELS + CLICK_CHANNELS
    torch.manual_seed(config.seed)
    model = build_model(architecture)
    iteration, best, scores, checkpoint = 0, None, {}, None
    if config.resume:
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        iteration, best, scores = checkpoint["iteration"], checkpoint["best_val_dice"], checkpoint["val_scores"] or {}
    elif config.init_from is not None:
        start_from(model, Path(config.init_from))
    model = model.to(device, memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    rng = np.random.default_rng([config.seed, iteration])
    train_source, val_source = _scan_source(config)
    next_scan = iteration // config.refresh_every

    def training_scan(index: int) -> Scan:
        return make_scan(*train_source(index), stages if rng.random() < config.darn_fraction else None)

    scans = [training_scan(next_scan + i) for i in range(config.pool_size)]
    next_scan += config.pool_size
    val_samples = _validation_samples([make_scan(*val_source(i), stages) for i in range(config.val_cases)], with_clicks)

    def checkpoint_payload() -> dict:
        return {"model": model.state_dict(), "model_config": architecture, "optimizer": optimizer.state_dict(),
                "iteration": iteration, "best_val_dice": best, "val_scores": scores,
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
                "stage": {"name": "refine", "patch_size": [PATCH_SIZE] * 3, "num_classes": 2}}

    with tqdm(total=config.iterations, initial=iteration, desc="train refine", unit="it", dynamic_ncols=True) as progress:
        while iteration < config.iterations:
            for group in optimizer.param_groups:
                group["lr"] = poly_learning_rate(config.learning_rate, iteration, config.iterations)
            model.train()
            inputs, targets = draw_batch(scans, config.batch_size, rng, with_clicks)
            loss = dice_ce_loss(training_logits(model, inputs, device, amp), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRADIENT_NORM)
            optimizer.step()
            iteration += 1
            if iteration % config.refresh_every == 0:
                scans[iteration // config.refresh_every % len(scans)] = training_scan(next_scan)
                next_scan += 1
            if iteration % config.val_every == 0 or iteration == config.iterations:
                scores = _validate(model, val_samples, device)
                if best is None or scores["refined"] > best:
                    best = scores["refined"]
                    save_checkpoint(checkpoint_payload(), best_path)
                save_checkpoint(checkpoint_payload(), last_path)
            progress.set_postfix(loss=f"{loss.item():.3f}", **{f"val_{k}": f"{v:.3f}" for k, v in scores.items()})
            progress.update()
    return last_path


def training_logits(model: torch.nn.Module, inputs: torch.Tensor, device: torch.device, amp: bool) -> torch.Tensor:
    """The model's logits on a training batch, as ``train_refiner`` computes them: channels-last,
    under bfloat16 autocast when ``amp``."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model(inputs.to(device, memory_format=torch.channels_last_3d))


def start_from(model: torch.nn.Module, models_dir: Path) -> None:
    """Load the refinement network of a weights folder into ``model``, which may take the click
    channels where the folder's network does not: their weights start at zero, so ``model``
    computes exactly what that network did until training teaches it the clicks. Any other
    difference of architecture is refused."""
    from .weights import load_model

    module, entry = load_model(models_dir, "refine")
    weights = module.state_dict()
    ours = model.state_dict()
    first = next(key for key, value in ours.items() if value.dim() == 5)
    if weights.keys() != ours.keys() or any(weights[key].shape != ours[key].shape for key in ours if key != first):
        raise InputError(f"{models_dir}: its refine network is {entry.get('model')}; this run builds another "
                         f"architecture (choose the same --widths)")
    given, wanted = weights[first].shape[1], ours[first].shape[1]
    if given > wanted:
        raise InputError(f"{models_dir}: its refine network takes {given} input channels; this run builds one "
                         f"that takes {wanted}")
    widened = torch.zeros_like(ours[first])
    widened[:, :given] = weights[first]
    model.load_state_dict({**weights, first: widened})


def _validation_samples(scans: list[Scan], with_clicks: bool, per_scan: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(12345)  # the same samples every validation and every run
    samples = []
    for number, scan in enumerate(scans, start=1):
        for _ in range(50 * per_scan):  # a scan without tumors offers only false positives
            if len(samples) == per_scan * number:
                break
            sample = draw_sample(scan, rng, with_clicks)
            if sample is not None:
                samples.append(sample)
    return samples


def _validate(model: torch.nn.Module, samples, device) -> dict[str, float]:
    """Mean patch Dice of the coarse masks and of their refinements."""
    model.eval()
    coarse, refined = [], []
    with torch.inference_mode():
        for inputs, target in samples:
            probability = torch.softmax(model(torch.from_numpy(inputs)[None].to(device)).float(), 1)[0, 1].cpu().numpy()
            truth = target.astype(bool)
            coarse.append(dice(inputs[1] > 0.5, truth))
            refined.append(dice(probability > 0.5, truth))
    return {"coarse": float(np.mean(coarse)), "refined": float(np.mean(refined))}


def config_from_args(args: argparse.Namespace) -> RefineConfig:
    """A RefineConfig from ``livertumordarn train --stage refine`` options."""
    for option in ("order", "patch_size"):
        if getattr(args, option, None) is not None:
            raise InputError(f"--{option.replace('_', '-')} is an option of the DARN stages, not of --stage refine")
    if args.small_phantoms:
        raise InputError("--small-phantoms is an option of the DARN stages: refinement needs full-resolution scans")
    given = {field: getattr(args, option) for option, field in (
        ("data", "data"), ("models", "models_dir"), ("iterations", "iterations"), ("batch_size", "batch_size"),
        ("lr", "learning_rate"), ("pool_size", "pool_size"), ("refresh_every", "refresh_every"),
        ("val_cases", "val_cases"), ("val_every", "val_every"), ("widths", "widths"),
        ("phantom_seed_start", "phantom_seed_start"), ("randomize_fraction", "randomize_fraction"),
        ("darn_fraction", "darn_fraction"), ("amp", "amp"), ("anatomy", "anatomy"),
        ("phantom_fraction", "phantom_fraction"), ("init_from", "init_from"),
        ("seed", "seed"), ("device", "device"), ("threads", "num_threads")) if getattr(args, option, None) is not None}
    return RefineConfig(out_dir=args.out, resume=args.resume, **given)


def run(args: argparse.Namespace) -> int:
    print(train_refiner(config_from_args(args)))
    return 0

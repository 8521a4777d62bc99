"""Boundary refinement of one tumor at a time, and the clicks a radiologist corrects with.

    label map + CT -> one coarse tumor -> patch around it (``patches``: image, coarse mask, clicks)
                   -> refinement network -> its correction of the coarse mask on the patch
                   -> onto the volume's voxels inside the patch, added to the full-resolution coarse mask
                   -> updated label map (``label_edits``), changed box

The method is the boundary-optimisation network of the second paper (``models.BoundaryRefinementNet``):
the coarse mask is an input channel, so the network attends to the boundary and may shrink or grow it.
A network whose manifest entry declares click channels (``"in_channels": 4``) also sees the
clicks, as interactive segmentation networks do; one without them (the 2-channel networks
trained before) is given none.

Choices and why:
- The network adds the coarse mask to its logits (``models.BoundaryRefinementNet``: +/- its
  ``mask_prior``), so its own output is a correction of the mask. Only the correction is brought
  back to the volume's voxels; the mask term is added there, at full resolution. Resampling the
  whole answer from the patch grid (up to 3 mm for a large tumor) blurs every boundary and loses
  tumors of a few voxels even where the network changes nothing (docs/click-to-refine.md).
- Paste-back writes only the voxels whose centres lie inside the patch, so nothing outside the
  patch changes, and the other tumors inside the patch are kept as they were. Tumor grows into
  liver only, as everywhere else in the pipeline, except where a click put it outside.
- The patch grows with the result: when the refined tumor touches the patch's edge, the patch is
  extracted again around the result (at most ``MAX_GROWTH_STEPS`` times). A click on a missed
  lesion starts from a small seed (``lesion_seeds``) and ends with a patch that fits the lesion.

What a click does is what the person clicking means, and never nothing without saying so:
- A positive click on tumor refines that tumor. A positive click anywhere else marks missed tumor:
  the lesion under it is seeded from its contrast (``lesion_seeds``), also outside the liver of
  the label map (the liver stage leaves large lesions at its edge out), refined, and added; near
  a tumor (``label_edits.NEAR_MM``) it grows that tumor, which keeps its other boundaries. The
  clicked voxel is tumor afterwards even where the network disagrees, so a click repeated where
  the error remains always changes something.
- A negative click removes the false part under it, not true tumor that happens to be connected
  to it (``label_edits.false_part``): an edit, not a network call, for a network without clicks.
- A click keeps what earlier clicks of the other sign said (``label_edits.split_between_clicks``):
  a negative click removes no voxel nearer an earlier positive click in the piece it removes, and
  a positive click adds none nearer an earlier negative click in what it adds.
- A click on air or bone, or a positive click farther than ``LIVER_REACH_MM`` from the liver,
  changes nothing and says why.
"""

from __future__ import annotations

from typing import Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .errors import InputError
from .label_edits import Change, component_at, false_part, find_tumor_near, paste_tumor, split_between_clicks
from .labels import TUMOR
from .lesion_seeds import lesion_seed, smoothed_hu_on
from .patches import (CLICK_CHANNELS, IMAGE_CHANNELS, Click, index_bounds, liver_hu, patch_around, patch_inputs,
                      patch_to_region, voxels_above)
from .pipeline import MIN_TUMOR_MM3
from .regions import Box, bounding_box, local, on_region, touches_edge, union, voxel_box, widened, widened_mm

__all__ = ["Change", "Refiner"]

MAX_GROWTH_STEPS = 3
LIVER_REACH_MM = 15.0
"""A positive click outside the liver marks a liver lesion only this close to the liver."""
BEYOND_SEED_MM = 3.0
"""Outside the liver, a lesion may grow this far beyond the seed of its click."""
AIR_HU, BONE_HU = -400.0, 350.0
"""Clicks whose 3x3x3 voxels' mean HU lies outside these bounds are on air or lung, or on bone."""
NOTHING_TO_REFINE = ("tumor refined (no change): the network keeps this boundary; click on tissue the tumor "
                     "misses to grow it, or make a negative click on a part that is not tumor")


class Refiner:
    """The refinement network and the edits made with it. ``labels`` arrays are [z, y, x] on the
    CT's grid (0 background, 1 liver, 2 tumor) and are never modified in place: each edit returns
    a new map, so the caller keeps the old one for undo. ``takes_clicks``: the network has the two
    click channels besides the image and the coarse mask."""

    def __init__(self, model: torch.jit.ScriptModule, device: torch.device, takes_clicks: bool = False):
        self.model, self.device, self.takes_clicks = model, device, takes_clicks
        self.mask_prior = float(torch.as_tensor(model.mask_prior).detach())

    @classmethod
    def load(cls, models_dir=None, device: str | torch.device = "auto") -> Refiner:
        """The refinement network of a weights folder (default: the bundled weights) on ``device``
        ("auto", "cpu", "cuda" or a torch.device); whether it takes clicks comes from its manifest
        entry, checked against the network itself."""
        from .pipeline import resolve_device
        from .weights import bundled_models_dir, load_model

        device = device if isinstance(device, torch.device) else resolve_device(device)
        folder = models_dir if models_dir is not None else bundled_models_dir()
        module, entry = load_model(folder, "refine", str(device))
        takes_clicks = _takes_clicks(module, entry, folder)
        return cls(_for_inference(module, device), device, takes_clicks)

    def correction(self, inputs: np.ndarray) -> np.ndarray:
        """What the network adds to the coarse mask's vote, on the patch grid, from the inputs
        ([2 or 4, P, P, P], see ``patches.patch_inputs``): its tumor-minus-background logit
        without the ``mask_prior`` term."""
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = self.model(torch.from_numpy(inputs)[None].to(self.device))[0].float()
        return (logits[1] - logits[0]).cpu().numpy() - self.mask_vote(inputs[1])

    def mask_vote(self, mask: np.ndarray) -> np.ndarray:
        """The logit the coarse mask alone contributes: +mask_prior inside, -mask_prior outside."""
        return self.mask_prior * (2 * mask.astype(np.float32) - 1)

    def refine_mask(self, ct: sitk.Image, labels: np.ndarray, coarse: np.ndarray, coarse_box: Box,
                    reference_hu: float | None = None, clicks: Sequence[Click] = (),
                    beyond_liver: tuple[np.ndarray, Box] | None = None) -> tuple[np.ndarray, Box]:
        """The refined tumor (bool, on the returned region) for one coarse tumor given on ``coarse_box``.

        The patch holds the coarse tumor and the last of ``clicks``, and is re-centred on the
        result while the result touches the patch's edge. ``reference_hu`` is the liver's HU
        (:func:`liver_hu` of ``labels`` when not given). The result lies in the liver of
        ``labels`` and in ``beyond_liver`` (a mask on its box) where that is given.
        """
        mask, box = coarse, coarse_box
        reference_hu = liver_hu(ct, labels) if reference_hu is None else reference_hu
        focus = [clicks[-1].point] if clicks else []
        for _ in range(MAX_GROWTH_STEPS):
            patch = patch_around(ct, *index_bounds(mask, box, focus))
            coarse_here = on_region(mask, box, patch.region)
            inputs = patch_inputs(ct, coarse_here, patch, reference_hu, clicks if self.takes_clicks else None)
            refined = self._vote(self.correction(inputs), coarse_here, ct, patch)
            allowed = labels[patch.region] > 0
            if beyond_liver is not None:
                allowed |= on_region(*beyond_liver, patch.region)
            refined = _without_new_specks(refined & allowed, coarse_here, ct.GetSpacing())
            if not refined.any() or not touches_edge(refined, patch.region, labels.shape):
                return refined, patch.region
            mask, box = refined, patch.region
        return refined, patch.region

    def _vote(self, correction: np.ndarray, coarse: np.ndarray, ct: sitk.Image, patch) -> np.ndarray:
        """The refined tumor on ``patch.region``: the network's ``correction`` interpolated onto
        the volume's voxels plus the coarse mask's vote, above zero. Outside the coarse mask a
        voxel needs a correction above ``mask_prior``, so the interpolation runs only on the box
        of the coarse mask and of the patch samples above it, not on the whole region (three
        times the tumor's size across)."""
        boxes = [box for box in (bounding_box(coarse), voxels_above(correction, self.mask_prior, ct, patch))
                 if box is not None and all(b.stop > b.start for b in box)]
        refined = np.zeros(coarse.shape, bool)
        if boxes:
            box = union(boxes)
            refined[box] = patch_to_region(correction, ct, patch, box) + self.mask_vote(coarse[box]) > 0
        return refined

    def refine_tumor(self, ct: sitk.Image, labels: np.ndarray, component: np.ndarray, box: Box,
                     reference_hu: float | None = None, clicks: Sequence[Click] = ()) -> Change:
        """Refine the tumor ``component`` (bool on ``box``) and paste it back."""
        refined, region = self.refine_mask(ct, labels, component, box, reference_hu, clicks)
        return paste_tumor(labels, region, on_region(component, box, region), refined, "tumor refined")

    def click(self, ct: sitk.Image, labels: np.ndarray, point_ijk: Sequence[int], positive: bool = True,
              earlier: Sequence[tuple[Sequence[int], bool]] = ()) -> Change:
        """One click at voxel (i, j, k) of the CT (see the module's docstring for what each kind of
        click does). ``earlier`` holds the clicks made before it on this map, ((i, j, k), positive)
        in order: a network that takes clicks sees those in its patch.

        A map on another grid and a click outside the CT are refused (InputError) before anything
        changes; a click on air or bone, or too far from the liver to be on a liver lesion, changes
        nothing and says so in its message.
        """
        _check_grid(ct, labels)
        point = _check_point(ct, point_ijk)
        clicks = [*(Click(_check_point(ct, ijk), bool(sign)) for ijk, sign in earlier), Click(point, positive)]
        refusal = _refusal(ct, labels, point)
        if refusal is not None:
            return Change(labels, None, refusal)
        if positive:
            return self._positive_click(ct, labels, point, clicks)
        return self._negative_click(ct, labels, point, clicks)

    def _positive_click(self, ct: sitk.Image, labels: np.ndarray, point: tuple[int, int, int],
                        clicks: Sequence[Click]) -> Change:
        """On a tumor: that tumor refined. Elsewhere the click marks missed tumor: the click's
        lesion (``lesion_seeds``) refined by the network and added, joined to the tumor it
        grows when one is near; the click's own voxel is tumor afterwards whatever the network
        says."""
        if labels[point] == TUMOR:
            change = self.refine_tumor(ct, labels, *component_at(labels, point), clicks=clicks)
            if change.box is None:
                return Change(labels, None, NOTHING_TO_REFINE)
            return change
        spacing = _spacing_zyx(ct)
        distance = _distance_to_liver(labels, point, spacing)
        if distance is None:
            return Change(labels, None, f"the click is more than {LIVER_REACH_MM:.0f} mm from the liver: "
                                        f"no lesion added")
        reference_hu = liver_hu(ct, labels)
        seed, seed_box = lesion_seed(ct, labels, point, reference_hu)
        near = find_tumor_near(labels, point, ct.GetSpacing())
        boxes = [seed_box] if near is None else [seed_box, near[1]]
        region = union(boxes)
        old = np.zeros([r.stop - r.start for r in region], bool) if near is None else on_region(*near, region)
        seed_here = on_region(seed, seed_box, region)
        refined, refined_region = self.refine_mask(ct, labels, old | seed_here, region, reference_hu, clicks,
                                                   beyond_liver=_reach_beyond_liver(labels, seed, seed_box, spacing))
        seed_there, old_there = on_region(seed, seed_box, refined_region), on_region(old, region, refined_region)
        added = _components_touching(refined & ~old_there, seed_there)
        message = "lesion added" if near is None else "tumor grown to the click"
        if not added[local(point, refined_region)]:  # the click's tissue is tumor: the person clicking knows
            added |= seed_there & ~old_there
            message += " as seeded from the click (the network did not confirm it)"
        added = split_between_clicks(added, refined_region, point, _points(clicks[:-1], positive=False), spacing)
        return paste_tumor(labels, refined_region, np.zeros_like(added), added, message)

    def _negative_click(self, ct: sitk.Image, labels: np.ndarray, point: tuple[int, int, int],
                        clicks: Sequence[Click]) -> Change:
        """The false part of the tumor at or near the click removed (``label_edits.false_part``);
        a network that takes clicks then refines what is left, never bringing the removed part back."""
        found = find_tumor_near(labels, point, ct.GetSpacing())
        if found is None:
            return Change(labels, None, "no tumor at the click: nothing to remove")
        component, box = found
        hu = smoothed_hu_on(ct, box)
        spacing = _spacing_zyx(ct)
        removed, message = false_part(component, local(point, box), hu, spacing)
        split = split_between_clicks(removed, box, point, _points(clicks[:-1], positive=True), spacing)
        if not np.array_equal(split, removed):
            removed, message = split, "false part removed up to your earlier positive click"
        kept = component & ~removed
        if not self.takes_clicks or not kept.any():
            return paste_tumor(labels, box, component, kept, message)
        refined, region = self.refine_mask(ct, labels, kept, box, clicks=clicks)
        refined &= ~on_region(removed, box, region)
        return paste_tumor(labels, region, on_region(component, box, region), refined, message)

    def refine_all(self, ct: sitk.Image, labels: np.ndarray) -> Change:
        """Every tumor of the map refined in turn; the box covers all changes."""
        components = cc3d.connected_components(labels == TUMOR, connectivity=26)
        reference_hu = liver_hu(ct, labels)  # once: each tumor moves the liver's median by a hair
        changed: list[Box] = []
        for number, component_box in enumerate(ndimage.find_objects(components), start=1):
            change = self.refine_tumor(ct, labels, components[component_box] == number, component_box, reference_hu)
            labels = change.labels
            if change.box is not None:
                changed.append(change.box)
        box = union(changed)
        count = int(components.max())
        return Change(labels, box, f"{count} tumor{'s' if count != 1 else ''} refined")


# --------------------------------------------------------------------------------------------
# Small helpers


def _check_point(ct: sitk.Image, point_ijk: Sequence[int]) -> tuple[int, int, int]:
    size = ct.GetSize()
    if len(point_ijk) != 3 or not all(0 <= int(p) < n for p, n in zip(point_ijk, size)):
        raise InputError(f"click {','.join(map(str, point_ijk))} is outside the volume (0..{size[0] - 1}, "
                         f"0..{size[1] - 1}, 0..{size[2] - 1})")
    i, j, k = (int(p) for p in point_ijk)
    return k, j, i


def _points(clicks: Sequence[Click], positive: bool) -> list[tuple[int, int, int]]:
    return [click.point for click in clicks if click.positive == positive]


def _spacing_zyx(ct: sitk.Image) -> tuple[float, float, float]:
    return tuple(ct.GetSpacing()[::-1])


def _without_new_specks(mask: np.ndarray, coarse: np.ndarray, spacing_xyz) -> np.ndarray:
    """``mask`` without the pieces smaller than the pipeline's smallest tumor that the coarse mask
    did not have: a small tumor someone drew stays unless the network votes it away."""
    components = cc3d.connected_components(mask, connectivity=26)
    if components.max() == 0:
        return mask
    sizes = np.bincount(components.ravel()) * float(np.prod(spacing_xyz))
    keep = sizes >= MIN_TUMOR_MM3
    keep[np.unique(components[coarse])] = True
    keep[0] = False
    return keep[components]


def _components_touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    components = cc3d.connected_components(mask, connectivity=26)
    touched = np.unique(components[seed & mask])
    return np.isin(components, touched[touched > 0])


def _check_grid(ct: sitk.Image, labels: np.ndarray) -> None:
    if labels.shape != ct.GetSize()[::-1]:
        raise InputError(f"the label map ({' x '.join(map(str, labels.shape[::-1]))} voxels) is not on the CT's grid "
                         f"({' x '.join(map(str, ct.GetSize()))}); refine a label map made for this CT")


def _refusal(ct: sitk.Image, labels: np.ndarray, point: tuple[int, int, int]) -> str | None:
    """Why a click on ``point`` can mean nothing (on air or bone, not on tumor); None when it can."""
    if labels[point] == TUMOR:
        return None  # a click on the segmentation is about the segmentation, whatever lies under it
    hu = float(sitk.GetArrayViewFromImage(ct)[widened(voxel_box(point), labels.shape, 1)].mean())  # its 3x3x3 neighbourhood
    if hu < AIR_HU:
        return f"the click is on air or lung ({hu:.0f} HU): nothing changed"
    if hu > BONE_HU:
        return f"the click is on bone ({hu:.0f} HU): nothing changed"
    return None


def _distance_to_liver(labels: np.ndarray, point: tuple[int, int, int], spacing_zyx) -> float | None:
    """The distance (mm) from ``point`` to the nearest liver or tumor voxel; None beyond ``LIVER_REACH_MM``."""
    window = widened_mm(voxel_box(point), LIVER_REACH_MM, spacing_zyx, labels.shape)
    organ = np.argwhere(labels[window] > 0)
    if len(organ) == 0:
        return None
    distance = float(np.sqrt((((organ - local(point, window)) * np.asarray(spacing_zyx)) ** 2).sum(1)).min())
    return distance if distance <= LIVER_REACH_MM else None


def _reach_beyond_liver(labels: np.ndarray, seed: np.ndarray, box: Box, spacing_zyx) -> tuple[np.ndarray, Box] | None:
    """Where a lesion seeded by ``seed`` (on ``box``) may grow outside the liver: its seed and
    ``BEYOND_SEED_MM`` around it; None for a seed inside the liver."""
    if (labels[box][seed] > 0).all():
        return None
    region = widened_mm(tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, bounding_box(seed))),
                        BEYOND_SEED_MM, spacing_zyx, labels.shape)
    distance = ndimage.distance_transform_edt(~on_region(seed, box, region), sampling=spacing_zyx)
    return distance <= BEYOND_SEED_MM, region


def _for_inference(module: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    """On the CPU, the network frozen and rewritten for inference (oneDNN's convolutions and
    layouts, ``torch.jit.optimize_for_inference``): the same answers, several times sooner on one
    or two threads, which is what a click waits for. ``mask_prior`` stays readable."""
    if device.type != "cpu":
        return module
    return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval(), preserved_attrs=["mask_prior"]))


def _takes_clicks(module: torch.jit.ScriptModule, entry: dict, folder) -> bool:
    """Whether the refinement network of a manifest ``entry`` takes the click channels: its entry
    says so (``model.in_channels`` 4; without the key, 2), and its first convolution agrees."""
    declared = int(entry.get("model", {}).get("in_channels", IMAGE_CHANNELS))
    first = next(value for value in module.state_dict().values() if value.dim() == 5)
    if declared not in (IMAGE_CHANNELS, IMAGE_CHANNELS + CLICK_CHANNELS) or first.shape[1] != declared:
        raise InputError(f"{folder}: the refine network takes {first.shape[1]} input channels and its manifest entry "
                         f"declares {declared}; this version feeds {IMAGE_CHANNELS} (image, coarse mask) or "
                         f"{IMAGE_CHANNELS + CLICK_CHANNELS} (with positive and negative clicks): export the weights again")
    return declared == IMAGE_CHANNELS + CLICK_CHANNELS

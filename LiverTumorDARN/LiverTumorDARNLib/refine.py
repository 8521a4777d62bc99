"""Boundary refinement of one tumor at a time, and the clicks a radiologist corrects with.

    label map + CT -> one coarse tumor -> patch around it (``patches``: image, coarse mask)
                   -> refinement network -> its correction of the coarse mask on the patch
                   -> onto the volume's voxels inside the patch, added to the full-resolution coarse mask
                   -> updated label map (``label_edits``), changed box

The method is the boundary-optimisation network of the second paper (``models.BoundaryRefinementNet``):
the coarse mask is an input channel, so the network attends to the boundary and may shrink or grow it.

Choices and why:
- The network adds the coarse mask to its logits (``models.BoundaryRefinementNet``: +/- its
  ``mask_prior``), so its own output is a correction of the mask. Only the correction is brought
  back to the volume's voxels; the mask term is added there, at full resolution. Resampling the
  whole answer from the patch grid (up to 3 mm for a large tumor) blurs every boundary and loses
  tumors of a few voxels even where the network changes nothing.
- Paste-back writes only the voxels whose centres lie inside the patch, so nothing outside the
  patch changes; tumor may only grow into liver, as everywhere else in the pipeline, and the other
  tumors inside the patch are kept as they were.
- The patch grows with the result: when the refined tumor touches the patch's edge, the patch is
  extracted again around the result (at most ``MAX_GROWTH_STEPS`` times). A click on a missed
  lesion starts from a small seed (``lesion_seeds``) and ends with a patch that fits the lesion.
- A negative click is an edit, not a network call: on the body of a tumor it removes the tumor;
  on a thin offshoot (a leak) it removes the offshoot only (``label_edits.trim_at``), which keeps
  the result predictable for the person clicking.
"""

from __future__ import annotations

from typing import Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .errors import InputError
from .label_edits import Change, find_tumor_near, paste_tumor, trim_at
from .labels import TUMOR
from .lesion_seeds import lesion_seed
from .patches import index_bounds, liver_hu, patch_around, patch_inputs, patch_to_region
from .pipeline import MIN_TUMOR_MM3
from .regions import Box, on_region, touches_edge, union

__all__ = ["Change", "Refiner"]

MAX_GROWTH_STEPS = 3


class Refiner:
    """The refinement network and the edits made with it. ``labels`` arrays are [z, y, x] on the
    CT's grid (0 background, 1 liver, 2 tumor) and are never modified in place: each edit returns
    a new map, so the caller keeps the old one for undo."""

    def __init__(self, model: torch.jit.ScriptModule, device: torch.device):
        self.model, self.device = model, device
        self.mask_prior = float(torch.as_tensor(model.mask_prior).detach())

    @classmethod
    def load(cls, models_dir=None, device: str | torch.device = "auto") -> Refiner:
        """The refinement network of a weights folder (default: the bundled weights) on ``device``
        ("auto", "cpu", "cuda" or a torch.device)."""
        from .pipeline import resolve_device
        from .weights import bundled_models_dir, load_model

        device = device if isinstance(device, torch.device) else resolve_device(device)
        module, _ = load_model(models_dir if models_dir is not None else bundled_models_dir(), "refine", str(device))
        return cls(module, device)

    def correction(self, inputs: np.ndarray) -> np.ndarray:
        """What the network adds to the coarse mask's vote, on the patch grid, from the [2, P, P, P]
        inputs: its tumor-minus-background logit without the ``mask_prior`` term."""
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = self.model(torch.from_numpy(inputs)[None].to(self.device))[0].float()
        return (logits[1] - logits[0]).cpu().numpy() - self.mask_vote(inputs[1])

    def mask_vote(self, mask: np.ndarray) -> np.ndarray:
        """The logit the coarse mask alone contributes: +mask_prior inside, -mask_prior outside."""
        return self.mask_prior * (2 * mask.astype(np.float32) - 1)

    def refine_mask(self, ct: sitk.Image, labels: np.ndarray, coarse: np.ndarray, coarse_box: Box,
                    reference_hu: float | None = None) -> tuple[np.ndarray, Box]:
        """The refined tumor (bool, on the returned region) for one coarse tumor given on ``coarse_box``.

        The patch is re-centred on the result while the result touches the patch's edge.
        ``reference_hu`` is the liver's HU (:func:`liver_hu` of ``labels`` when not given).
        """
        mask, box = coarse, coarse_box
        reference_hu = liver_hu(ct, labels) if reference_hu is None else reference_hu
        for _ in range(MAX_GROWTH_STEPS):
            patch = patch_around(ct, *index_bounds(mask, box))
            coarse_here = on_region(mask, box, patch.region)
            correction = patch_to_region(self.correction(patch_inputs(ct, coarse_here, patch, reference_hu)), ct, patch)
            refined = correction + self.mask_vote(coarse_here) > 0
            refined &= labels[patch.region] > 0  # tumors grow into liver only
            refined = _without_new_specks(refined, coarse_here, ct.GetSpacing())
            if not refined.any() or not touches_edge(refined, patch.region, labels.shape):
                return refined, patch.region
            mask, box = refined, patch.region
        return refined, patch.region

    def refine_tumor(self, ct: sitk.Image, labels: np.ndarray, component: np.ndarray, box: Box,
                     reference_hu: float | None = None) -> Change:
        """Refine the tumor ``component`` (bool on ``box``) and paste it back."""
        refined, region = self.refine_mask(ct, labels, component, box, reference_hu)
        return paste_tumor(labels, region, on_region(component, box, region), refined, "tumor refined")

    def click(self, ct: sitk.Image, labels: np.ndarray, point_ijk: Sequence[int], positive: bool = True) -> Change:
        """One click at voxel (i, j, k) of the CT: refine the tumor under or near it, add a lesion
        where none is near, or (negative) remove the tumor or trim its offshoot."""
        point = _check_point(ct, point_ijk)
        tumors = find_tumor_near(labels, point, ct.GetSpacing())
        if tumors is None:
            if not positive:
                return Change(labels, None, "no tumor at the click: nothing to remove")
            return self.add_lesion(ct, labels, point)
        component, box = tumors
        if positive:
            return self.refine_tumor(ct, labels, component, box)
        kept = trim_at(component, tuple(p - s.start for p, s in zip(point, box)), _spacing_zyx(ct))
        message = "tumor removed" if not kept.any() else "offshoot trimmed"
        return paste_tumor(labels, box, component, kept, message)

    def add_lesion(self, ct: sitk.Image, labels: np.ndarray, point: tuple[int, int, int]) -> Change:
        """A new lesion grown by the network from :func:`lesion_seed` at ``point`` ([z, y, x])."""
        if labels[point] == 0:
            return Change(labels, None, "the click is outside the liver: no lesion added")
        reference_hu = liver_hu(ct, labels)
        seed, box = lesion_seed(ct, labels, point, reference_hu)
        refined, region = self.refine_mask(ct, labels, seed, box, reference_hu)
        refined = _components_touching(refined, on_region(seed, box, region))
        if not refined.any():
            return Change(labels, None, "no lesion found at the click")
        return paste_tumor(labels, region, np.zeros_like(refined), refined, "lesion added")

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

"""Where a click on a missed lesion starts: the region of the click's contrast, found without a network.

A click on a missed lesion starts from the voxels around it that are nearer the click's HU
than the liver's (the half-way threshold of the CT smoothed by ``SEED_SMOOTHING_MM``), inside
the liver, connected to the click: a lesion is defined by its contrast against the parenchyma,
whichever sign it has. A click outside the liver of the label map (a lesion the liver stage left
out, as it often leaves out a large hypodense one at the liver's edge) also takes the voxels
outside the liver whose HU lies as near the click's, on either side (a band: a one-sided
threshold would take all the fat and air around a hypodense lesion). Where that region leaks
(it reaches ``SEED_REACH_MM`` from the click, for instance into a vessel of like HU or along the
liver's partial-volume rim) it is opened with growing radii, fractions (``SEED_OPENING_FRACTIONS``)
of the click's depth inside it, until the click's piece is enclosed: what is thinner than the
lesion is cut off. Holes (noise below the threshold inside the lesion) are filled first, else the
click looks shallow. Where no radius encloses it, the seed is its part within ``LOCAL_SEED_MM`` of
the click. Where there is no contrast, a ``SEED_RADIUS_MM`` ball is the seed: from the ball alone
the network grows no lesion beyond a few mL (docs/click-to-refine.md). The click's HU is the
median of the soft tissue around it (``LESION_SAMPLE_MM``, above ``FAT_MAX_HU``).

On a thin-slice scan all this runs on blocks of voxels about ``SEED_GRID_MM`` wide (their mean
HU), and the piece found is drawn again on the CT's own voxels near it: the 100 mm cube around a
click holds 2 million voxels at 0.7-0.9 mm, and their distance transforms cost half a second.
"""

from __future__ import annotations

import math

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .patches import crop
from .regions import Box, ball, bounding_box, inner_faces, on_region, touches_faces, voxel_box, widened, widened_mm

SEED_RADIUS_MM = 4.0
"""The coarse mask of a new lesion where its contrast gives none: a ball around the click."""
SEED_REACH_MM = 50.0
"""A new lesion's seed grows at most this far from the click; reaching it counts as a leak."""
SEED_SMOOTHING_MM = 1.0
LESION_SAMPLE_MM = 3.0
"""A click's HU is the median within this distance: a heterogeneous lesion (a necrotic core, a
brighter rim) is then drawn whole, not only its part as dark as the clicked spot."""
FAT_MAX_HU = -30.0
"""Adipose tissue lies between -190 and -30 HU, the window of CT body-composition studies
(Mitsiopoulos et al., J Appl Physiol 1998;85:115, muscle from -29 HU up)."""
LOCAL_SEED_MM = 10.0
"""Where no opening encloses the contrast region (a liver full of lesions, a faint one in noisy
parenchyma), the seed is its part within this distance of the click."""
SEED_MIN_CONTRAST_HU = 15.0
"""A click nearer the liver's HU than this seeds the ball: at 10 HU, clicks on plain parenchyma
grew noise across the liver and cost up to 0.6 s to cut it back."""
SEED_OPENING_FRACTIONS = (0.25, 0.5, 0.75)
"""Opening radii tried on a leaking seed, as fractions of the click's depth inside it."""
SEED_GRID_MM = 1.5
"""The contrast region is found on blocks of voxels about this size: the seed is a coarse mask for
the network, and on a 0.7-0.9 mm scan the full grid cost half a second a click."""
SMOOTHING_CONTEXT_VOXELS = 3


def lesion_seed(ct: sitk.Image, labels: np.ndarray, point: tuple[int, int, int],
                reference_hu: float) -> tuple[np.ndarray, Box]:
    """The coarse mask (bool, on the returned box) of a new lesion at ``point`` ([z, y, x]): the
    region of the click's contrast (see the module's docstring), else a ball. The region is found
    on the CT averaged over blocks of about ``SEED_GRID_MM`` (:func:`block_factors`)."""
    spacing = tuple(ct.GetSpacing()[::-1])
    region = widened_mm(voxel_box(point), SEED_REACH_MM, spacing, labels.shape)
    factors = block_factors(spacing)
    coarse_spacing = tuple(d * f for d, f in zip(spacing, factors))
    coarse_ct = sitk.GetImageFromArray(block_mean(sitk.GetArrayViewFromImage(ct)[region], factors))
    coarse_ct.SetSpacing(coarse_spacing[::-1])
    coarse_local = tuple((p - r.start) // f for p, r, f in zip(point, region, factors))
    coarse_liver = block_mean(labels[region] > 0, factors) >= 0.5
    grown = contrast_region(coarse_ct, coarse_liver, coarse_local, reference_hu)
    inner = inner_faces(region, labels.shape)
    enclosed = None if grown is None else _enclosed_piece(grown, coarse_local, inner, coarse_spacing)
    if enclosed is None and grown is not None:
        enclosed = _piece_near(grown, coarse_local, coarse_spacing)
    if enclosed is None:
        return ball(point, SEED_RADIUS_MM, spacing, labels.shape)
    return _on_fine_grid(ct, labels, point, reference_hu, enclosed, region, factors)


def block_factors(spacing_zyx) -> tuple[int, int, int]:
    """Per axis, the whole number of voxels that is nearest ``SEED_GRID_MM`` (at least one): a
    thin-slice scan's seed is found on 8 times fewer voxels, a 1.5 mm scan's on its own."""
    return tuple(max(1, int(SEED_GRID_MM / d + 0.5)) for d in spacing_zyx)


def block_mean(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """``array`` averaged over blocks of ``factors`` voxels (float32, SimpleITK's BinShrink); the
    last block of an axis that ``factors`` does not divide repeats the edge voxels."""
    padded = np.pad(array.astype(np.float32), [(0, -n % f) for n, f in zip(array.shape, factors)], mode="edge")
    return sitk.GetArrayFromImage(sitk.BinShrink(sitk.GetImageFromArray(padded), factors[::-1]))


def _on_fine_grid(ct: sitk.Image, labels: np.ndarray, point: tuple[int, int, int], reference_hu: float,
                  blocks: np.ndarray, region: Box, factors: tuple[int, int, int]) -> tuple[np.ndarray, Box]:
    """The seed found on blocks (``blocks`` on the block grid of ``region``) drawn again on the
    CT's own voxels: the click's contrast region of the full-resolution CT within half a block of
    the blocks (where a block's mean crosses the threshold, the edge runs through it), on their
    box. A lesion's edge would otherwise show steps of a block; the blocks alone are the seed
    where the full resolution finds no contrast at the click."""
    inner = bounding_box(blocks)
    box = tuple(slice(r.start + i.start * f, min(r.stop, r.start + i.stop * f)) for r, i, f in zip(region, inner, factors))
    fine = blocks[inner]
    for axis, factor in enumerate(factors):
        fine = np.repeat(fine, factor, axis=axis)
    fine = fine[tuple(slice(0, b.stop - b.start) for b in box)]
    if factors == (1, 1, 1):
        return fine, box
    around = widened(box, labels.shape, max(factors))
    near = ndimage.maximum_filter(on_region(fine, box, around), size=[2 * math.ceil(f / 2) + 1 for f in factors])
    click = tuple(p - a.start for p, a in zip(point, around))
    grown = contrast_region(crop(ct, around, pad=0), labels[around] > 0, click, reference_hu)
    piece = None if grown is None else component_at_voxel(grown & near, click)
    return (piece, around) if piece is not None and piece.any() else (fine, box)


def contrast_region(ct: sitk.Image, liver: np.ndarray, local: tuple[int, int, int],
                    reference_hu: float) -> np.ndarray | None:
    """Liver voxels nearer the click's HU than ``reference_hu``, holes filled, and for a click
    outside ``liver`` the voxels outside it in the band as near the click's HU; None without
    contrast. The click's HU is the median of the smoothed CT's soft tissue within
    ``LESION_SAMPLE_MM`` (:func:`clicked_hu`): a lesion's, not that of the darkest or brightest spot
    the click may fall on, nor of the fat around a click on a small lesion at the liver's surface."""
    hu = smoothed_hu(ct)
    clicked = clicked_hu(hu, local, tuple(ct.GetSpacing()[::-1]), within=hu > FAT_MAX_HU)  # no lesion is fat
    if abs(clicked - reference_hu) < SEED_MIN_CONTRAST_HU:
        return None
    half_way = (clicked + reference_hu) / 2
    contrast = (hu < half_way) if clicked < reference_hu else (hu > half_way)
    where = liver
    if not liver[local]:
        where = liver | (np.abs(hu - clicked) < abs(clicked - reference_hu) / 2)
    return ndimage.binary_fill_holes(contrast) & where  # noise leaves holes that make the click look shallow


def clicked_hu(hu: np.ndarray, point: tuple[int, int, int], spacing_zyx, within: np.ndarray | None = None) -> float:
    """The HU of the tissue a click at ``point`` is on: the median of ``hu`` (the smoothed CT)
    within ``LESION_SAMPLE_MM`` of it, over the voxels of ``within`` there where it has any. The
    clicked voxel alone may be a spot of another tissue (a vessel, a speck of necrosis)."""
    near, box = ball(point, LESION_SAMPLE_MM, spacing_zyx, hu.shape)
    if within is not None and (near & within[box]).any():
        near = near & within[box]
    return float(np.median(hu[box][near]))


def smoothed_hu(ct: sitk.Image) -> np.ndarray:
    """The CT smoothed by ``SEED_SMOOTHING_MM``, as the seeds read it: a click's HU is that of
    its neighbourhood, not of one noisy voxel."""
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.Cast(ct, sitk.sitkFloat32), SEED_SMOOTHING_MM))


def smoothed_hu_on(ct: sitk.Image, region: Box) -> np.ndarray:
    """:func:`smoothed_hu` on ``region`` of the volume, smoothed with the voxels around it (the
    filter needs four voxels along each axis, and a region's edge its neighbours)."""
    pad = SMOOTHING_CONTEXT_VOXELS
    around = widened(region, ct.GetSize()[::-1], pad)
    return smoothed_hu(crop(ct, around, pad=0))[tuple(slice(r.start - a.start, r.stop - a.start) for r, a in zip(region, around))]


def _enclosed_piece(mask: np.ndarray, local: tuple[int, int, int], inner: list[tuple[int, int]],
                    spacing_zyx) -> np.ndarray | None:
    """The piece of ``mask`` at ``local`` that touches none of the ``inner`` faces of its region
    (``regions.inner_faces``: those that are not the volume's border), opening ``mask`` with
    growing radii to cut the bridges it leaks through; None where no radius encloses it. The
    opening dilates only the click's part of the eroded mask, in a box within the radius of it,
    which is cheaper than the whole region once the bridges are cut."""
    def enclosed(piece: np.ndarray) -> bool:
        return piece.any() and not touches_faces(piece, inner)

    piece = component_at_voxel(mask, local)
    if enclosed(piece):
        return piece
    depth = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    for fraction in SEED_OPENING_FRACTIONS:
        radius_mm = fraction * depth[local]
        core = component_at_voxel(depth > radius_mm, local)
        near = widened_mm(bounding_box(core), radius_mm, spacing_zyx, mask.shape)  # the dilation's reach
        opened = np.zeros_like(mask)
        opened[near] = (ndimage.distance_transform_edt(~core[near], sampling=spacing_zyx) <= radius_mm) & mask[near]
        piece = component_at_voxel(opened, local)
        if enclosed(piece):
            return piece
    return None


def _piece_near(mask: np.ndarray, local: tuple[int, int, int], spacing_zyx) -> np.ndarray | None:
    """The piece of ``mask`` within ``LOCAL_SEED_MM`` of the click, connected to it; None when
    that is no more than the click's voxel."""
    near, box = ball(local, LOCAL_SEED_MM, spacing_zyx, mask.shape)
    within = np.zeros_like(mask)
    within[box] = near & mask[box]
    piece = component_at_voxel(within, local)
    return piece if piece.sum() > 1 else None


def component_at_voxel(mask: np.ndarray, voxel: tuple[int, int, int]) -> np.ndarray:
    """The 6-connected piece of ``mask`` at ``voxel``: a seed must not leak through corners."""
    components = cc3d.connected_components(mask, connectivity=6)
    number = components[voxel]
    return components == number if number else np.zeros_like(mask)

"""Liver lesions drawn into a CT in Hounsfield units, for training on real liver shapes.

The recipe starts from Hu et al., "Label-Free Liver Tumor Segmentation" (CVPR 2023; code
MrGiovanni/SyntheticTumors), whose synthetic tumors alone trained a network to a tumor Dice of
about 0.55-0.60 on LiTS:

- a size class per liver: tiny, small, medium, large (base radius 4 / 8 / 16 / 32 mm, semi-axes
  drawn from 0.75-1.25 times it) or a mix of all four, with their lesion counts;
- deformed ellipsoids, a smooth speckled texture (noise smoothed, thresholded at random and
  smoothed again), a blurred edge, placed at random liver voxels;
- hypodense by a texture-weighted 65-145 HU, i.e. about 30-80 HU below the liver on average.

Widened to what a reader meets, because the real scans this project misses show them:

- cysts (0-20 HU, sharp edge; "homogeneous low attenuation <= 20 HU", ACR incidental-findings
  criteria), rim-enhancing metastases (an enhancing rim in 73-84 % of colorectal metastases, Ann
  Acad Med Singapore 2003;32:191), hepatocellular carcinoma that enhances in the arterial phase and
  washes out with a capsule in the portal phase (96 % hypervascular, washout in 76 %, AJR
  triple-phase MDCT study), necrotic lesions and calcifications;
- lesions at the surface that bulge out of the liver outline (the label then grows with them:
  LiTS counts them as liver tumor) and lesions over vessels (no collision check, as Hu et al.);
- expert-labelled tumors of a real map (LiTS layout, label 2) keep their shape and get a drawn
  appearance.

Tumor voxels are labelled tumor wherever the lesion's own mask holds (before the edge blur), in
the liver or bulging from it. Noise is added later by the caller over the whole image, so a lesion
has the same noise texture as the liver around it (a known flaw of pasted lesions).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from .labels import LIVER, TUMOR
from .phantom import Box, Canvas, TumorInfo, Wobble, ellipsoid, random_rotation

SIZE_CLASSES = {"tiny": (4.0, (3, 10)), "small": (8.0, (3, 10)), "medium": (16.0, (2, 5)), "large": (32.0, (1, 3))}
"""Base radius (mm) and lesion count range of Hu et al.'s size classes."""

LIVER_MIXES = {"none": 0.08, "tiny": 0.14, "small": 0.18, "medium": 0.2, "large": 0.18, "mix": 0.22}
"""How often a liver gets each size class; 'mix' draws a few of every class."""

KINDS = {"hypodense": 0.36, "rim_enhancing": 0.16, "cyst": 0.14, "hcc": 0.14, "necrotic": 0.08, "hyperdense": 0.06,
         "isodense_rim": 0.06}
"""Lesion appearance and how often it is drawn. 'isodense_rim' is a faint lesion seen mostly by its rim."""

AT_SURFACE = 0.3
BULGE = 0.6
"""Share of lesions centred on the liver surface, and of those, the share that bulge out of it."""


@dataclasses.dataclass
class _Lesion:
    kind: str
    radius_mm: float
    center: np.ndarray  # (z, y, x) mm
    at_surface: bool
    bulges: bool
    edge_mm: float
    calcified: bool


def plan_lesions(rng: np.random.Generator, liver: np.ndarray, canvas: Canvas) -> list[_Lesion]:
    """Where and what each lesion of one liver is (nothing drawn yet)."""
    mix = rng.choice(list(LIVER_MIXES), p=list(LIVER_MIXES.values()))
    if mix == "none":
        return []
    classes = list(SIZE_CLASSES) if mix == "mix" else [mix]
    inside = np.argwhere(liver)
    surface = np.argwhere(liver & ~ndimage.binary_erosion(liver))
    if len(inside) == 0:
        return []
    lesions = []
    for size_class in classes:
        base, (low, high) = SIZE_CLASSES[size_class]
        count = int(rng.integers(low, high + 1))
        if mix == "mix":
            count = max(1, count // 2)
        for _ in range(count):
            at_surface = rng.random() < AT_SURFACE and len(surface) > 0
            pool = surface if at_surface else inside
            center = canvas.origin + pool[rng.integers(len(pool))] * canvas.spacing
            kind = str(rng.choice(list(KINDS), p=list(KINDS.values())))
            edge = rng.uniform(2.0, 4.0) if rng.random() < 0.25 else rng.uniform(0.5, 1.5)
            if kind == "cyst":
                edge = rng.uniform(0.3, 0.8)
            lesions.append(_Lesion(kind, base * rng.uniform(0.75, 1.25), center, at_surface,
                                   at_surface and rng.random() < BULGE, edge, rng.random() < 0.08))
    return lesions


def draw_lesions(canvas: Canvas, hu: np.ndarray, labels: np.ndarray, tissue: np.ndarray, lesions: Sequence[_Lesion],
                 liver_hu: float, phase: str, rng: np.random.Generator, blockers: Sequence[int]) -> list[TumorInfo]:
    """Paint each planned lesion into ``hu`` (float32, edited in place) and label it in ``labels``.

    ``tissue`` is the case's tissue map: a bulging lesion never grows into ``blockers`` (air,
    lung, bone, ...). Returns what was drawn, for the case's manifest.
    """
    liver = labels == LIVER
    infos: list[TumorInfo] = []
    for lesion in lesions:
        reach = lesion.radius_mm * 1.6 + 3 * lesion.edge_mm + 3
        box = canvas.box(lesion.center - reach, lesion.center + reach)
        if box.empty:
            continue
        allowed = liver[box.slices] | (labels[box.slices] == TUMOR)
        if lesion.bulges:
            allowed = allowed | ~np.isin(tissue[box.slices], blockers)
        mask = (_shape(box, lesion, rng) < 0) & allowed
        _paint(canvas, hu, labels, box.slices, mask, allowed, lesion, liver_hu, phase, rng, infos)
    return infos


def draw_real_lesions(canvas: Canvas, hu: np.ndarray, labels: np.ndarray, tumors: np.ndarray, liver_hu: float,
                      phase: str, rng: np.random.Generator) -> list[TumorInfo]:
    """Give each expert-labelled tumor component of a real map a drawn appearance and label it."""
    components, _ = ndimage.label(tumors)
    infos: list[TumorInfo] = []
    for index, found in enumerate(ndimage.find_objects(components), 1):
        if found is None:
            continue
        slices = tuple(slice(max(0, s.start - 6), s.stop + 6) for s in found)
        mask = components[slices] == index
        radius = (3 * mask.sum() * float(np.prod(canvas.spacing)) / (4 * math.pi)) ** (1 / 3)
        centre = canvas.origin + np.argwhere(mask).mean(0) * canvas.spacing + [s.start * d for s, d in zip(slices, canvas.spacing)]
        lesion = _Lesion(str(rng.choice(list(KINDS), p=list(KINDS.values()))), radius, centre, False, False,
                         rng.uniform(0.5, 2.0), rng.random() < 0.08)
        _paint(canvas, hu, labels, slices, mask, np.ones_like(mask), lesion, liver_hu, phase, rng, infos)
    return infos


def _paint(canvas: Canvas, hu: np.ndarray, labels: np.ndarray, slices, mask: np.ndarray, allowed: np.ndarray,
           lesion: _Lesion, liver_hu: float, phase: str, rng, infos: list[TumorInfo]) -> None:
    """Blend the lesion's intensities in through its blurred mask, label it, and record it."""
    if not mask.any():
        return
    weight = ndimage.gaussian_filter(mask.astype(np.float32), lesion.edge_mm / canvas.spacing, truncate=3.0)
    weight *= allowed
    block = hu[slices]
    block += weight * (_lesion_hu(lesion, mask, liver_hu, phase, rng, canvas.spacing) - block)
    labels[slices][mask] = TUMOR
    infos.append(TumorInfo(id=len(infos) + 1, kind=lesion.kind, border="ill_defined" if lesion.edge_mm > 2 else "sharp",
                           diameter_mm=round(2 * lesion.radius_mm, 1),
                           volume_ml=round(float(mask.sum()) * float(np.prod(canvas.spacing)) / 1000, 3),
                           center_mm=tuple(round(float(c), 1) for c in lesion.center[::-1]),
                           touches_liver_surface=lesion.at_surface))


def _shape(box: Box, lesion: _Lesion, rng) -> np.ndarray:
    """Implicit function of a deformed ellipsoid on the box (< 0 inside)."""
    radii = lesion.radius_mm * rng.uniform(0.75, 1.25, 3)
    f = ellipsoid(box, lesion.center, radii, random_rotation(rng, 180))
    amplitude = 0.08 if lesion.kind == "cyst" else rng.uniform(0.1, 0.3)
    return f + Wobble(rng, amplitude, (lesion.radius_mm, lesion.radius_mm * 4 + 1), 6)(box)


def _texture(shape: tuple[int, ...], rng, spacing) -> np.ndarray:
    """Hu et al.'s speckled texture in about [0, 1], mean about 0.5: smoothed uniform noise used
    as a probability, sampled, and smoothed again."""
    sigma_a = rng.uniform(3, 15) / np.asarray(spacing)
    sigma_b = (rng.uniform(3, 5) if rng.random() < 0.7 else rng.uniform(5, 8)) / np.asarray(spacing) / 2
    a = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), sigma_a)
    a = (a - a.min()) / (np.ptp(a) + 1e-6) * rng.uniform(0.19, 0.21) + rng.uniform(0.04, 0.06)
    b = ndimage.gaussian_filter((a > rng.random(shape, dtype=np.float32)).astype(np.float32), sigma_b)
    textured = b > 0.12
    mean = float(b[textured].mean()) if textured.any() else 1.0
    return np.clip(b * rng.uniform(0.5, 0.55) / max(mean, 1e-6), 0, 1)


def _lesion_hu(lesion: _Lesion, mask: np.ndarray, liver_hu: float, phase: str, rng, spacing) -> np.ndarray:
    """Target HU inside the lesion (the caller blends it in with the blurred mask)."""
    depth_mm = ndimage.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    rim_mm = rng.uniform(1.5, 4.0)
    rim = depth_mm < rim_mm
    shape = mask.shape
    texture = _texture(shape, rng, spacing)
    kind = lesion.kind
    if kind == "hypodense":
        target = liver_hu - texture * rng.uniform(65, 145)
    elif kind == "rim_enhancing":
        core = liver_hu - texture * rng.uniform(65, 145)
        target = np.where(rim, liver_hu + rng.uniform(-10, 40), core)
    elif kind == "isodense_rim":
        target = np.where(rim, liver_hu + rng.uniform(15, 45), liver_hu - rng.uniform(5, 20) * texture)
    elif kind == "cyst":
        target = np.full(shape, rng.uniform(0, 20), np.float32)
    elif kind == "hcc":
        if phase == "arterial":
            target = liver_hu + rng.uniform(20, 70) * (0.6 + 0.8 * texture)
        else:
            washout = liver_hu - rng.uniform(5, 35) * (0.6 + 0.8 * texture)
            target = np.where(rim & (rng.random() < 0.7), liver_hu + rng.uniform(5, 30), washout)
    elif kind == "necrotic":
        core = rng.uniform(10, 35) + 10 * texture
        target = np.where(depth_mm < rim_mm * 2, liver_hu - rng.uniform(5, 30), core)
    else:  # hyperdense
        target = liver_hu + rng.uniform(15, 55) * (0.6 + 0.8 * texture)
    target = np.asarray(target, np.float32)
    if lesion.calcified:
        spots = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 1.0 / np.asarray(spacing))
        threshold = np.quantile(spots[mask], 0.97) if mask.any() else 1.0
        target = np.where(mask & (spots > threshold), np.float32(rng.uniform(200, 600)), target)
    return target

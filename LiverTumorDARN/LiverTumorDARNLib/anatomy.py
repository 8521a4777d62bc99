"""Synthetic CT drawn on real label maps: real organ shapes, drawn appearance.

The phantoms of :mod:`phantom` draw every organ from simple shapes, and weights trained on them
learn the phantom rather than the abdomen. Here the organs come from real segmentations
(``../shared/anatomy``: BTCV abdomens, LiTS liver shapes, MSD livers with expert vessels and
tumors, an AbdomenAtlas abdomen) and only the image is drawn on top of them: the idea of SynthSeg
(Billot et al., MedIA 2023), applied to abdominal CT.

How a case is drawn, and why:

- The map is read into organ codes (:data:`LAYOUTS` says what each data set's numbers mean) and
  brought into the canonical LPS frame. Two header errors of the shared maps are found from the
  anatomy, not from the file names: a left-right mirror (the liver's thin left lobe must point to
  the patient's left: its x coordinates are skewed that way in every correctly stored map) and
  a front-back mirror (kidneys lie behind the stomach).
- A random placement maps the canvas onto the map: scaling (which also brings every liver into
  a normal adult volume range, whatever its header spacing claimed), a turn about the long axis,
  a small tilt and a smooth elastic displacement; the left-right order is never mirrored, because
  the pipeline relies on the liver lying on the patient's right.
- What the map lacks is drawn with the phantom's parts, fitted to the real organs: the body
  (skin, subcutaneous fat, abdominal wall, ribs, table) is the smallest that holds every organ
  inside its wall; the spine lies behind the aorta where the map has one; lungs and heart lie
  above a diaphragm that rests on the real liver, spleen and stomach; bowel fills the rest of
  the abdomen; a map with only a liver also gets the phantom's stomach, spleen, pancreas and
  kidneys around it. Concavities that the liver outline encloses are filled with blood (the
  intrahepatic IVC and the portal vein are left out of most liver masks), and portal and
  hepatic vein trees are drawn inside livers whose map has no vessels.
- Intensities come from the phantom's phase tables, or are drawn at random per tissue
  (SynthSeg's domain randomisation); lesions from :mod:`lesions`; noise, blur and the scanner's
  field of view from the phantom's finish, so a lesion carries the same noise as its liver.

The same map and seed always give the same voxels.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, spatial

from .errors import InputError
from .io import IMAGE_SUFFIXES, read_image, to_canonical
from .labels import LIVER
from .lesions import draw_lesions, draw_real_lesions, plan_lesions
from .phantom import (ORIENTATIONS, Body, Canvas, PhantomCase, Tissue, diaphragm_height, draw_bowel, draw_bowel_segment,
                      draw_chest, draw_great_vessels, draw_kidneys, draw_spine, draw_upper_organs, draw_vessel_trees,
                      finish, intensity_table, paint_body, smooth_field, to_image)
from .regions import depth_mm


class Organ(enum.IntEnum):
    """What a label-map voxel is, whatever number its data set gave it."""

    NONE = 0
    LIVER = 1
    SPLEEN = 2
    KIDNEY = 3
    GALLBLADDER = 4
    STOMACH = 5
    AORTA = 6
    PANCREAS = 7
    IVC = 8
    LIVER_VESSEL = 9
    LIVER_TUMOR = 10
    PORTAL_VEIN = 11


LAYOUTS: dict[str, dict[int, Organ]] = {
    "btcv": {1: Organ.SPLEEN, 2: Organ.KIDNEY, 3: Organ.KIDNEY, 4: Organ.GALLBLADDER, 5: Organ.LIVER,
             6: Organ.STOMACH, 7: Organ.AORTA, 8: Organ.PANCREAS},
    "abdomenatlas": {1: Organ.LIVER, 2: Organ.SPLEEN, 3: Organ.KIDNEY, 4: Organ.KIDNEY, 5: Organ.STOMACH,
                     6: Organ.GALLBLADDER, 7: Organ.PANCREAS, 8: Organ.AORTA, 9: Organ.IVC},
    "msd-hepaticvessel": {1: Organ.LIVER, 2: Organ.LIVER_VESSEL, 3: Organ.PORTAL_VEIN},
}
"""Label numbers of each data set in ``../shared/anatomy``, by folder name (see its README).

The README calls the MSD maps' label 3 "tumor", but in all three it is one tree-shaped component
(1-1.4 % of its bounding box) that leaves the liver towards the spleen: the portal and splenic
veins. It is drawn as portal vein; the liver label keeps the part of it inside the liver outline."""

LITS_LAYOUT = {1: Organ.LIVER, 2: Organ.LIVER_TUMOR}
"""Any other folder: the LiTS convention (1 liver, 2 tumor), as ``lits-liver`` and LiTS itself."""

LIVER_PARTS = (Organ.LIVER, Organ.LIVER_VESSEL, Organ.LIVER_TUMOR)

SOURCES = {
    "btcv": "BTCV Multi-Atlas Labeling Beyond the Cranial Vault (Synapse), research use under Synapse's terms",
    "lits-liver": "LiTS training masks (Bilic et al., MedIA 2023), CC BY-NC-SA 4.0",
    "msd-hepaticvessel": "Medical Segmentation Decathlon Task08 (hepatic vessel), CC BY-SA 4.0",
    "abdomenatlas": "AbdomenAtlas-style case, CC BY-NC-SA 4.0",
}
"""Where the shared label maps come from and their licences: weights trained on them inherit these."""

CROPPED_SHARE = 0.1
"""Share of scans cut to the liver's box plus a few centimetres, as cropped volumes come."""

LIVER_VOLUME_ML = (1000.0, 2600.0)
"""Adult liver volumes the placement scales into (log-uniform); real maps keep their own shape."""

IN_PLANE_MM = (0.6, 1.0)
SLICE_MM = (0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
MAX_VOXELS = 36_000_000
"""Thin slices are drawn only where the scan stays under this size (a few seconds to draw)."""

_BLOCKERS = (Tissue.AIR, Tissue.LUNG, Tissue.BONE_CORTEX, Tissue.BONE_MARROW, Tissue.DISC, Tissue.CSF,
             Tissue.TABLE, Tissue.SKIN, Tissue.GAS)
"""Tissues a lesion bulging out of the liver never grows into."""


@dataclasses.dataclass
class AnatomyCase(PhantomCase):
    """A synthetic scan on a real label map; ``label_map`` names the map it was drawn on."""

    label_map: str = ""

    def manifest_entry(self) -> dict:
        return {**super().manifest_entry(), "label_map": self.label_map}


# --------------------------------------------------------------------------------------------
# Label maps: finding, reading, orienting


def find_label_maps(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (sorted), or the file itself."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise InputError(f"{folder}: no such file or folder; give a label map or a folder of them")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise InputError(f"{folder}: holds no label map ({', '.join(IMAGE_SUFFIXES)})")
    return found


def layout_of(path: Path) -> dict[int, Organ]:
    return LAYOUTS.get(Path(path).parent.name, LITS_LAYOUT)


def read_label_map(path: Path) -> sitk.Image:
    """The map as :class:`Organ` codes in the canonical frame, mirrors in its header undone.

    A missing or unreadable file, or one without liver, is an :class:`InputError` naming it.
    """
    path = Path(path)
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError(f"{path}: not a 3D label map")
    values = sitk.GetArrayFromImage(image)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.array_equal(values, np.round(values)):
            raise InputError(f"{path}: holds non-integer values; expected a label map")
        values = values.astype(np.int64)
    table = np.zeros(int(max(values.max(), max(layout_of(path)))) + 1, np.uint8)
    for label, organ in layout_of(path).items():
        table[label] = organ
    organs = table[np.clip(values, 0, None)]
    if not (organs == Organ.LIVER).any():
        raise InputError(f"{path}: label map has no liver (label {_liver_number(path)})")
    oriented = sitk.GetImageFromArray(organs)
    oriented.CopyInformation(image)
    canonical = to_canonical(oriented)
    array = sitk.GetArrayFromImage(canonical)
    array = _undo_mirrors(array, np.array(canonical.GetSpacing()[::-1]))
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(canonical.GetSpacing())
    return result


def _liver_number(path: Path) -> int:
    return next(label for label, organ in layout_of(path).items() if organ == Organ.LIVER)


def _undo_mirrors(organs: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Flip the array where the anatomy says its header mirrored an axis (see the module docstring)."""
    kidneys, stomach = organs == Organ.KIDNEY, organs == Organ.STOMACH
    if kidneys.any() and stomach.any():
        if np.argwhere(kidneys)[:, 1].mean() < np.argwhere(stomach)[:, 1].mean():
            organs = organs[:, ::-1, :]
    liver_x = np.argwhere(organs[::4, ::4, ::4] == Organ.LIVER)[:, 2].astype(float)
    spread = liver_x.std()
    if spread > 0 and ((liver_x - liver_x.mean()) ** 3).mean() / spread ** 3 < -0.15:
        organs = organs[:, :, ::-1]
    return np.ascontiguousarray(organs)


# --------------------------------------------------------------------------------------------
# Placement: where the map lies on the canvas


@dataclasses.dataclass
class _Placement:
    """Canvas mm (z, y, x) -> map mm: q = matrix @ (p + elastic(p)) + offset."""

    matrix: np.ndarray  # 3x3, zyx
    offset: np.ndarray  # zyx
    elastic_mm: float

    def to_canvas(self, q: np.ndarray) -> np.ndarray:
        """Map points (n, 3) to canvas points, ignoring the small elastic part."""
        return (np.linalg.solve(self.matrix, (q - self.offset).T)).T


def _place(organs: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> tuple[_Placement, np.ndarray]:
    """A random placement with the liver's top at canvas z = 0; also returns the organ points
    (a subsample, canvas mm, with their organ codes in a fourth column)."""
    points = np.argwhere(organs[::2, ::2, ::2] > 0) * 2
    codes = organs[tuple(points.T)]
    q = points * spacing
    liver_ml = (organs == Organ.LIVER).sum() * float(np.prod(spacing)) / 1000
    target_ml = math.exp(rng.uniform(*np.log(LIVER_VOLUME_ML)))
    scale = float(np.clip((target_ml / max(liver_ml, 1.0)) ** (1 / 3), 0.6, 1.4)) * rng.uniform(0.93, 1.07, 3)
    turn = math.radians(rng.uniform(-12, 12))
    tilt_y, tilt_x = (math.radians(a) for a in rng.uniform(-5, 5, 2))
    rotation = _about(0, turn) @ _about(1, tilt_y) @ _about(2, tilt_x)
    matrix = rotation @ np.diag(1 / scale)  # canvas -> map
    placement = _Placement(matrix, np.zeros(3), rng.uniform(0, 6))
    canvas_points = placement.to_canvas(q)
    top = canvas_points[codes == Organ.LIVER, 0].max()
    placement.offset = matrix @ np.array([top, 0.0, 0.0])
    canvas_points[:, 0] -= top
    return placement, np.column_stack([canvas_points, codes])


def _about(axis: int, angle: float) -> np.ndarray:
    """A rotation about one axis of (z, y, x)."""
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = math.cos(angle)
    r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
    return r


# --------------------------------------------------------------------------------------------
# The body around the organs


@dataclasses.dataclass
class _Frame:
    """The drawn body's parameters plus what only a fitted body has: the organs' outline (2D
    points, mm) and the gap between the organs and the abdominal wall."""

    body: Body
    outline: np.ndarray
    margin: float


def _fit_body(points: np.ndarray, rng: np.random.Generator) -> _Frame:
    """Where the phantom's body parts go around the real organs.

    The spine lies behind the aorta (or, for a liver alone, beside the liver's back, with the
    liver's right edge against the wall); the phantom's standard-adult offsets are scaled by the
    organs' width. The body outline itself is drawn around the organs by :func:`_draw_fitted_body`.
    """
    zyx, codes = points[:, :3], points[:, 3]
    liver = zyx[codes == Organ.LIVER]
    aorta = zyx[(codes == Organ.AORTA) & (zyx[:, 0] < -20) & (zyx[:, 0] > -200)]
    # The organs' outline in the axial plane (a liver alone: only its own, not vessels leaving
    # it), rounded to 4 mm: enough points to fit, few enough to be fast.
    held = zyx if len(aorta) else zyx[np.isin(codes, LIVER_PARTS)]
    outline = np.unique(np.round(held[:, 1:] / 4), axis=0) * 4
    if len(aorta):
        aorta_y, aorta_x = float(np.median(aorta[:, 1])), float(np.median(aorta[:, 2]))
        scale = float(np.clip((aorta_x - outline[:, 1].min()) / 150, 0.8, 1.2))
        spine_y, center_x = aorta_y + 28 * scale, aorta_x - 15 * scale
    else:
        scale = float(np.clip(np.ptp(liver[:, 2]) / 170, 0.8, 1.2))
        spine_y = liver[:, 1].max() - rng.uniform(15, 45) * scale
        center_x = liver[:, 2].min() + rng.uniform(120, 150) * scale
    # Bodies are nearly symmetric: what holds the organs on one side holds their mirror image.
    outline = np.vstack([outline, outline * [1, -1] + [0, 2 * center_x]])
    front, back = outline[:, 0].min(), max(outline[:, 0].max(), spine_y + 60 * scale)
    body = Body(scale=scale, half_width=float(np.ptp(outline[:, 1]) / 2), half_depth=float(back - front) / 2,
                center_x=center_x, center_y=(front + back) / 2, fat_mm=rng.uniform(5, 40) * scale,
                muscle_mm=rng.uniform(6, 14) * scale, spine_y=spine_y)
    return _Frame(body, outline, rng.uniform(0, 12))


def _draw_fitted_body(canvas: Canvas, frame: _Frame) -> np.ndarray:
    """Skin, fat, wall, ribs and table around the convex hull of the organs and the spine with
    its back muscles, a random gap between the organs and the wall; returns the 2D cavity."""
    body, s = frame.body, frame.body.scale
    spine = [[body.spine_y + dy * s, body.center_x + dx * s] for dy, dx in
             ((-25, 0), (75, 0), (45, -70), (45, 70), (20, -45), (20, 45))]
    corners = np.vstack([frame.outline, spine])
    y, x = canvas.axes[1], canvas.axes[2]
    grid = np.stack(np.meshgrid(y, x, indexing="ij"), axis=-1).reshape(-1, 2)
    hull = spatial.Delaunay(corners[spatial.ConvexHull(corners).vertices])
    core = (hull.find_simplex(grid) >= 0).reshape(len(y), len(x))
    spacing = canvas.spacing[1:]
    cavity = ndimage.distance_transform_edt(~core, sampling=spacing) <= frame.margin
    outside = ndimage.distance_transform_edt(~cavity, sampling=spacing)
    theta = np.arctan2(y[:, None] - body.center_y, x[None, :] - body.center_x)
    wall = 2.5 + body.fat_mm * (0.6 + 0.8 * np.clip(-np.sin(theta), 0, 1)) + body.muscle_mm
    depth = np.where(cavity, wall + ndimage.distance_transform_edt(cavity, sampling=spacing), wall - outside)
    back = corners[:, 0].max() + 2.5 + 0.6 * body.fat_mm + body.muscle_mm  # the patient lies on a flat back
    depth = np.minimum(depth, back - y[:, None])
    return paint_body(canvas, body, depth, theta, depth > 0, back - body.center_y)


def _organ_top(organs: np.ndarray, canvas: Canvas) -> np.ndarray:
    """z (mm) of the highest liver, spleen or stomach voxel over each (y, x); -inf where none."""
    solid = np.isin(organs, (Organ.LIVER, Organ.SPLEEN, Organ.STOMACH, Organ.LIVER_TUMOR, Organ.LIVER_VESSEL))
    any_ = solid.any(axis=0)
    highest = solid.shape[0] - 1 - np.argmax(solid[::-1], axis=0)
    top = np.where(any_, canvas.axes[0][highest], -np.inf)
    return ndimage.maximum_filter(top, size=5)


# --------------------------------------------------------------------------------------------
# Drawing


def draw_case(path: Path, seed: int, randomize: bool = False) -> AnatomyCase:
    """One synthetic CT on the label map at ``path``; the same path and seed give the same voxels."""
    rng = np.random.default_rng(seed)
    map_image = read_label_map(path)
    spacing = np.array(map_image.GetSpacing()[::-1])
    organs = sitk.GetArrayFromImage(map_image)
    placement, points = _place(organs, spacing, rng)
    frame = _fit_body(points, rng)
    cropped = rng.random() < CROPPED_SHARE
    canvas = _canvas(points, organs.shape, spacing, placement, frame, cropped, rng)
    on_canvas = _resample(organs, spacing, placement, canvas, rng)
    _draw_surroundings(canvas, frame, on_canvas, rng)
    _paint_organs(canvas, on_canvas, rng)
    _fill_liver_recesses(canvas, on_canvas, rng)
    _pack_bowel(canvas, rng)
    if not (on_canvas == Organ.LIVER_VESSEL).any():
        _draw_liver_vessels(canvas, on_canvas, frame.body.scale, rng)

    phase = "arterial" if rng.random() < 0.25 else "portal"
    labels = np.where(_liver_label(on_canvas), LIVER, 0).astype(np.uint8)
    table = intensity_table(phase, randomize, rng)
    hu = table[canvas.tissue] + _tissue_texture(canvas, rng)
    liver_hu = float(table[Tissue.LIVER])
    tumors = draw_real_lesions(canvas, hu, labels, on_canvas == Organ.LIVER_TUMOR, liver_hu, phase, rng)
    tumors += draw_lesions(canvas, hu, labels, canvas.tissue, plan_lesions(rng, labels == LIVER, canvas), liver_hu,
                           phase, rng, _BLOCKERS)
    ct = finish(hu, canvas, rng, randomize, may_cut_circle=not cropped)
    orientation = str(rng.choice(ORIENTATIONS))
    image, label_image = (to_image(a, canvas, orientation) for a in (ct, labels))
    return AnatomyCase(image, label_image, seed, phase, orientation, randomize, tumors, label_map=Path(path).name)


def _canvas(points: np.ndarray, map_shape, spacing: np.ndarray, placement: _Placement, frame: _Frame,
            cropped: bool, rng: np.random.Generator) -> Canvas:
    """The scan's grid: the body plus a margin in-plane, from above the liver to below it in z,
    within the map's own coverage when the map holds more than a liver; or, ``cropped``, the
    liver's box plus up to 3 cm."""
    zyx, codes = points[:, :3], points[:, 3]
    liver_bottom = zyx[codes == Organ.LIVER, 0].min()
    top, bottom = rng.uniform(20, 100), liver_bottom - rng.uniform(20, 220)
    if not np.isin(codes, (*LIVER_PARTS, Organ.PORTAL_VEIN)).all():  # an abdomen: stay within it
        corners = np.array([[z, y, x] for z in (0, map_shape[0] - 1) for y in (0, map_shape[1] - 1)
                            for x in (0, map_shape[2] - 1)]) * spacing
        z_range = placement.to_canvas(corners)[:, 0]
        top, bottom = min(top, z_range.max()), max(bottom, z_range.min())
    in_plane = rng.uniform(*IN_PLANE_MM)
    native_z = spacing[0] / abs(placement.matrix[0, 0])
    choices = [s for s in SLICE_MM if s >= 0.75 * native_z] or [SLICE_MM[-1]]
    body = frame.body
    wall = 2.5 + 1.4 * body.fat_mm + body.muscle_mm + frame.margin
    half_fov = max(body.half_width, body.half_depth + 30 * body.scale) + wall + rng.uniform(5, 40)
    low_yx, high_yx = np.array([body.center_y, body.center_x]) - half_fov, np.array([body.center_y, body.center_x]) + half_fov
    if cropped:
        liver = zyx[codes == Organ.LIVER]
        low_yx, high_yx = liver[:, 1:].min(0) - rng.uniform(0, 30, 2), liver[:, 1:].max(0) + rng.uniform(0, 30, 2)
        top, bottom = min(top, rng.uniform(0, 30)), max(bottom, liver_bottom - rng.uniform(0, 30))
    n_yx = np.ceil((high_yx - low_yx) / in_plane).astype(int)
    affordable = [s for s in choices if (top - bottom) / s * n_yx.prod() <= MAX_VOXELS] or [max(choices)]
    slice_mm = float(rng.choice(affordable))
    n_z = max(16, int(math.ceil((top - bottom) / slice_mm)))
    origin = (top - (n_z - 1) * slice_mm, low_yx[0], low_yx[1])
    return Canvas((n_z, int(n_yx[0]), int(n_yx[1])), (slice_mm, in_plane, in_plane), origin)


def _resample(organs: np.ndarray, spacing: np.ndarray, placement: _Placement, canvas: Canvas,
              rng: np.random.Generator) -> np.ndarray:
    """The organ codes on the canvas (nearest neighbour through the placement and a smooth
    random displacement of up to ``placement.elastic_mm``)."""
    source = sitk.GetImageFromArray(organs)
    source.SetSpacing([float(s) for s in spacing[::-1]])
    grid = sitk.Image([len(a) for a in canvas.axes[::-1]], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in canvas.spacing[::-1]])
    grid.SetOrigin([float(o) for o in canvas.origin[::-1]])
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(placement.matrix[::-1, ::-1].ravel().tolist())  # zyx -> xyz
    affine.SetTranslation(placement.offset[::-1].tolist())
    transform = sitk.CompositeTransform(3)
    transform.AddTransform(affine)
    transform.AddTransform(_elastic(canvas, placement.elastic_mm, rng))  # applied first
    moved = sitk.Resample(source, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(moved)


def _elastic(canvas: Canvas, amplitude_mm: float, rng: np.random.Generator) -> sitk.Transform:
    """A smooth random displacement field on a coarse grid (control points about 50 mm apart)."""
    extent = np.array([a[-1] - a[0] for a in canvas.axes[::-1]])  # xyz
    size = np.maximum(3, np.ceil(extent / 50).astype(int) + 1)
    displacement = rng.normal(0, amplitude_mm, size=(*size[::-1], 3))
    field = sitk.GetImageFromArray(ndimage.gaussian_filter(displacement, (1, 1, 1, 0)), isVector=True)
    field.SetSpacing((extent / (size - 1)).tolist())
    field.SetOrigin([float(o) for o in canvas.origin[::-1]])
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


_DRAWN_ORGANS = (Tissue.BOWEL_WALL, Tissue.GAS, Tissue.FLUID, Tissue.STOOL, Tissue.ORAL_CONTRAST, Tissue.SPLEEN,
                 Tissue.PANCREAS, Tissue.KIDNEY_CORTEX, Tissue.KIDNEY_MEDULLA, Tissue.RENAL_SINUS)
"""The phantom's organs, which the fitted body keeps inside its wall."""


def _draw_surroundings(canvas: Canvas, frame: _Frame, organs: np.ndarray, rng: np.random.Generator) -> None:
    """Everything the map lacks, in the phantom's order (later parts cover earlier ones). The
    phantom places its organs for its own body: what lands in this one's wall or outside it is
    given back to the wall or the air."""
    body = frame.body
    cavity = _draw_fitted_body(canvas, frame)
    layers = canvas.tissue[0].copy()  # every slice holds the same body layers so far
    draw_bowel(canvas, body, rng)
    if not np.isin(organs, (Organ.SPLEEN, Organ.STOMACH, Organ.KIDNEY)).any():
        draw_upper_organs(canvas, body, rng)
        draw_kidneys(canvas, body, rng)
    stray = ~cavity[None] & np.isin(canvas.tissue, _DRAWN_ORGANS)
    canvas.tissue[stray] = np.broadcast_to(layers, canvas.tissue.shape)[stray]
    draw_great_vessels(canvas, body, rng)
    draw_spine(canvas, body)
    diaphragm = np.maximum(diaphragm_height(canvas, body), _organ_top(organs, canvas) + 3)
    draw_chest(canvas, body, cavity, diaphragm)


def _paint_organs(canvas: Canvas, organs: np.ndarray, rng: np.random.Generator) -> None:
    """The map's organs over the drawn body, with the inner structure CT shows."""
    simple = {Organ.LIVER: Tissue.LIVER, Organ.LIVER_TUMOR: Tissue.LIVER, Organ.SPLEEN: Tissue.SPLEEN,
              Organ.GALLBLADDER: Tissue.GALLBLADDER, Organ.AORTA: Tissue.AORTA, Organ.PANCREAS: Tissue.PANCREAS,
              Organ.IVC: Tissue.IVC, Organ.PORTAL_VEIN: Tissue.PORTAL_VEIN}
    for organ, tissue in simple.items():
        canvas.tissue[organs == organ] = tissue
    vessel = Tissue.PORTAL_VEIN if rng.random() < 0.5 else Tissue.HEPATIC_VEIN
    canvas.tissue[organs == Organ.LIVER_VESSEL] = vessel
    _paint_layered(canvas, organs == Organ.KIDNEY, [(2.0, Tissue.KIDNEY_CORTEX), (7.0, Tissue.KIDNEY_MEDULLA),
                                                      (np.inf, Tissue.RENAL_SINUS)], rng)
    content = Tissue.ORAL_CONTRAST if rng.random() < 0.2 else (Tissue.FLUID if rng.random() < 0.7 else Tissue.STOOL)
    _paint_layered(canvas, organs == Organ.STOMACH, [(rng.uniform(3, 6), Tissue.BOWEL_WALL), (np.inf, content)], rng,
                   gas=True)


def _paint_layered(canvas: Canvas, mask: np.ndarray, layers, rng, gas: bool = False) -> None:
    """Paint ``mask`` in layers by depth below its surface (mm): [(up to depth, tissue), ...].
    With ``gas``, the lumen's front part (the patient lies supine) holds gas."""
    if not mask.any():
        return
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    inside = mask[box]
    depth = depth_mm(inside, canvas.spacing)
    jitter = rng.uniform(0.8, 1.25)
    block = canvas.tissue[box]
    low = 0.0
    for limit, tissue in layers:
        block[inside & (depth > low) & (depth <= limit * jitter)] = tissue
        low = limit * jitter
    if gas:
        lumen = inside & (depth > layers[0][0] * jitter)
        y = canvas.axes[1][box[1]][None, :, None]
        rows = np.nonzero(lumen.any(axis=(0, 2)))[0]
        if len(rows):
            level = canvas.axes[1][box[1]][rows[0]] + rng.uniform(0, 0.5) * (rows[-1] - rows[0]) * canvas.spacing[1]
            block[lumen & (y < level)] = Tissue.GAS


def _liver_label(organs: np.ndarray) -> np.ndarray:
    """The liver as LiTS labels it: parenchyma, its tumors and the vessels inside its outline."""
    liver = np.isin(organs, LIVER_PARTS)
    inside = np.stack([ndimage.binary_fill_holes(s) for s in liver])
    return liver | (inside & (organs == Organ.PORTAL_VEIN))


def _fill_liver_recesses(canvas: Canvas, organs: np.ndarray, rng: np.random.Generator) -> None:
    """Where the liver outline encloses voxels no organ claims: the intrahepatic IVC, the portal
    vein at the hilum, or the fat of a fissure, one of them per enclosed piece."""
    liver = np.isin(organs, LIVER_PARTS)
    box = ndimage.find_objects(liver.astype(np.uint8))[0]
    filled = np.stack([ndimage.binary_fill_holes(s) for s in liver[box]])
    closed = ndimage.binary_closing(liver[box], structure=np.ones((1, 5, 5), bool))
    pieces, count = ndimage.label((filled | closed) & (organs[box] == Organ.NONE))
    contents = rng.choice([Tissue.IVC, Tissue.PORTAL_VEIN, Tissue.VISCERAL_FAT], size=count + 1, p=[0.3, 0.35, 0.35])
    block = canvas.tissue[box]
    block[pieces > 0] = contents[pieces[pieces > 0]]


def _pack_bowel(canvas: Canvas, rng: np.random.Generator) -> None:
    """Bowel loops packed into the fat left between the organs: an abdomen is mostly bowel and
    mesentery, not empty fat, around the liver too."""
    fat = np.argwhere(canvas.tissue[::4, ::4, ::4] == Tissue.VISCERAL_FAT) * 4
    if len(fat) == 0:
        return
    free_ml = len(fat) * 64 * float(np.prod(canvas.spacing)) / 1000
    for index in rng.choice(len(fat), size=int(rng.uniform(0.2, 0.8) * free_ml / 25)):
        start = canvas.origin + fat[index] * canvas.spacing
        end = start + rng.normal(0, 30, 3)
        draw_bowel_segment(canvas, start, end, rng.uniform(8, 18), rng, where=(Tissue.VISCERAL_FAT,))


def _tissue_texture(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Slow variation of soft-tissue HU over a few centimetres (perfusion, fat content): organs
    are not flat in CT even where noise is low. Zero outside -200..400 HU tissues."""
    coarse_mm = rng.uniform(15, 40)
    shape = tuple(max(2, int(n * s / coarse_mm)) for n, s in zip(canvas.tissue.shape, canvas.spacing))
    field = smooth_field(rng.normal(0, rng.uniform(0, 8), shape).astype(np.float32), canvas.tissue.shape)
    soft = ~np.isin(canvas.tissue, (Tissue.AIR, Tissue.LUNG, Tissue.GAS, Tissue.BONE_CORTEX, Tissue.TABLE))
    return np.where(soft, field, np.float32(0))


def _draw_liver_vessels(canvas: Canvas, organs: np.ndarray, scale: float, rng: np.random.Generator) -> None:
    """The phantom's portal and hepatic vein trees, rooted at the real liver's hilum and dome."""
    liver = np.argwhere(organs == Organ.LIVER)
    if len(liver) == 0:
        return
    mm = canvas.origin + liver * canvas.spacing
    low, high = mm[:, 0].min(), mm[:, 0].max()
    band = mm[(mm[:, 0] > low + 0.25 * (high - low)) & (mm[:, 0] < low + 0.55 * (high - low))]
    band = band if len(band) else mm
    medial = band[band[:, 2] > np.median(band[:, 2])]
    hilum = np.median(medial if len(medial) else band, axis=0)
    dome = mm[mm[:, 0] > high - 30]
    confluence = np.array([dome[:, 0].mean(), np.percentile(dome[:, 1], 60), np.percentile(dome[:, 2], 70)])
    inlet = hilum + np.array([-35, 10, 25]) * scale
    draw_vessel_trees(canvas, rng, inlet, hilum, confluence, scale)


# --------------------------------------------------------------------------------------------
# Many maps


def usable_label_maps(folder: Path, warn=warnings.warn) -> list[Path]:
    """The maps under ``folder`` that read and hold a liver; the others are skipped with one
    warning that counts them (and names the first), so one bad file never stops a training run."""
    good, bad = [], []
    for path in find_label_maps(folder):
        try:
            read_label_map(path)
        except InputError as error:
            bad.append(str(error))
        else:
            good.append(path)
    if bad:
        warn(f"skipped {len(bad)} of {len(bad) + len(good)} label maps under {folder}: {bad[0]}")
    if not good:
        raise InputError(f"{folder}: none of its {len(bad)} label maps is usable: {bad[0]}")
    return good


def label_map_sources(folder: Path) -> dict[str, str]:
    """The data sets under ``folder`` (by sub-folder name) with their source and licence, where
    known: what weights trained on them inherit."""
    names = {path.parent.name for path in find_label_maps(folder)} if Path(folder).exists() else set()
    return {name: SOURCES.get(name, "unknown source: state its licence before sharing weights") for name in sorted(names)}


def split_maps(paths: Iterable[Path], every: int = 10) -> tuple[list[Path], list[Path]]:
    """(training, validation): every ``every``-th map of each data set is held out, so validation
    scans show anatomy training never saw, from every source."""
    by_folder: dict[str, list[Path]] = {}
    for path in sorted(paths):
        by_folder.setdefault(path.parent.name, []).append(path)
    train, validation = [], []
    for maps in by_folder.values():
        for i, path in enumerate(maps):
            (validation if i % every == every // 2 else train).append(path)
    return train, validation

"""Synthetic contrast-enhanced abdominal CT with known liver and tumor labels.

No LiTS data can be shipped or downloaded here, yet the tests, the demo and the bundled weights
all need CT with a ground truth. This module draws one: a body in Hounsfield units with skin,
subcutaneous fat, abdominal wall, spine, ribs, aorta, IVC, kidneys, spleen, stomach, pancreas,
gallbladder, bowel with gas and fluid, lung bases, heart, and a lobed liver with portal and
hepatic veins, in an arterial or portal-venous phase. Tumors (0 to many, 3 mm to 10 cm) are
hypodense, hyperdense, rim-enhancing or necrotic, with sharp or ill-defined borders, some at
the liver surface. The scan has anisotropic spacing, a varied field of view and slice count,
flipped axes, CT noise and partial-volume blur.

How it is drawn, and why:
- Every structure is an implicit shape (an ellipsoid, a tube or a band) evaluated only inside
  its own bounding box on the output grid, and written into a tissue map in anatomical order
  (later structures cover earlier ones). That keeps a 512x512x200 case within a few seconds on
  two cores, and makes the labels exact: the liver label is the liver tissue that survives.
- Shapes are made irregular by a few random Fourier modes added to their implicit function:
  smooth, lobulated surfaces without any per-voxel random field.
- The volume is drawn in the canonical orientation (identity direction, LPS; array [z, y, x]
  with x to patient left, y posterior, z superior) and re-oriented at the end with
  SimpleITK, so physical positions never change.
- Intensities come from one table per phase. ``randomize=True`` draws them instead, adds a
  bias field and random resolution and noise (SynthSeg, Billot et al., MedIA 2023), so that
  trained weights learn shape and context rather than the table's exact numbers.

Everything is deterministic in the seed.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .io import write_image, write_json
from .labels import LIVER, TUMOR

# Seed ranges: training draws below VALIDATION_SEED_START (training refuses more), validation
# from it, the sample case from SAMPLE_SEED, the benchmarks from BENCHMARK_SEED_START.
VALIDATION_SEED_START = 800_000
SAMPLE_SEED = 850_000
"""The project's sample case: the demo's, the Slicer panel's default and the Sample Data module's
phantom. Between the validation and benchmark seeds, so no training run ever draws it."""
BENCHMARK_SEED_START = 900_000

ORIENTATIONS = ("LPS", "RAS", "LAI", "RAI", "LPI", "RPS")
"""Axis codes the scans are stored in (DICOM convention); LAI is the LiTS layout."""


class Tissue(enum.IntEnum):
    AIR = 0
    SKIN = enum.auto()
    FAT = enum.auto()
    MUSCLE = enum.auto()
    VISCERAL_FAT = enum.auto()
    BONE_CORTEX = enum.auto()
    BONE_MARROW = enum.auto()
    DISC = enum.auto()
    CSF = enum.auto()
    LUNG = enum.auto()
    MYOCARDIUM = enum.auto()
    BLOOD = enum.auto()
    AORTA = enum.auto()
    IVC = enum.auto()
    LIVER = enum.auto()
    PORTAL_VEIN = enum.auto()
    HEPATIC_VEIN = enum.auto()
    GALLBLADDER = enum.auto()
    SPLEEN = enum.auto()
    KIDNEY_CORTEX = enum.auto()
    KIDNEY_MEDULLA = enum.auto()
    RENAL_SINUS = enum.auto()
    PANCREAS = enum.auto()
    BOWEL_WALL = enum.auto()
    GAS = enum.auto()
    FLUID = enum.auto()
    STOOL = enum.auto()
    ORAL_CONTRAST = enum.auto()
    TABLE = enum.auto()


LIVER_TISSUES = (Tissue.LIVER, Tissue.PORTAL_VEIN, Tissue.HEPATIC_VEIN)

# Mean HU per tissue in the two contrast phases (portal-venous: liver ~110-130 HU, as in LiTS).
_HU = {
    "portal": {
        Tissue.AIR: -1000, Tissue.SKIN: 30, Tissue.FAT: -105, Tissue.MUSCLE: 55,
        Tissue.VISCERAL_FAT: -95, Tissue.BONE_CORTEX: 750, Tissue.BONE_MARROW: 230,
        Tissue.DISC: 85, Tissue.CSF: 12, Tissue.LUNG: -860, Tissue.MYOCARDIUM: 95,
        Tissue.BLOOD: 150, Tissue.AORTA: 160, Tissue.IVC: 140, Tissue.LIVER: 115,
        Tissue.PORTAL_VEIN: 175, Tissue.HEPATIC_VEIN: 160, Tissue.GALLBLADDER: 10,
        Tissue.SPLEEN: 120, Tissue.KIDNEY_CORTEX: 175, Tissue.KIDNEY_MEDULLA: 160,
        Tissue.RENAL_SINUS: -60, Tissue.PANCREAS: 100, Tissue.BOWEL_WALL: 90, Tissue.GAS: -950,
        Tissue.FLUID: 15, Tissue.STOOL: -40, Tissue.ORAL_CONTRAST: 280, Tissue.TABLE: -300,
    },
    "arterial": {
        Tissue.AIR: -1000, Tissue.SKIN: 25, Tissue.FAT: -105, Tissue.MUSCLE: 50,
        Tissue.VISCERAL_FAT: -95, Tissue.BONE_CORTEX: 750, Tissue.BONE_MARROW: 230,
        Tissue.DISC: 85, Tissue.CSF: 12, Tissue.LUNG: -860, Tissue.MYOCARDIUM: 110,
        Tissue.BLOOD: 260, Tissue.AORTA: 300, Tissue.IVC: 90, Tissue.LIVER: 75,
        Tissue.PORTAL_VEIN: 120, Tissue.HEPATIC_VEIN: 65, Tissue.GALLBLADDER: 10,
        Tissue.SPLEEN: 125, Tissue.KIDNEY_CORTEX: 210, Tissue.KIDNEY_MEDULLA: 95,
        Tissue.RENAL_SINUS: -60, Tissue.PANCREAS: 120, Tissue.BOWEL_WALL: 95, Tissue.GAS: -950,
        Tissue.FLUID: 15, Tissue.STOOL: -40, Tissue.ORAL_CONTRAST: 280, Tissue.TABLE: -300,
    },
}

TUMOR_KINDS = ("hypodense", "hyperdense", "rim_enhancing", "necrotic")

_FULL_SIZE_XY = 512
_SMALL_SIZE_XY = 96
_SLICE_SPACINGS_MM = (0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)


@dataclasses.dataclass
class TumorInfo:
    """One drawn tumor; ``center_mm`` is its physical (x, y, z) in ITK's LPS frame, and
    ``volume_ml`` counts its own voxels (where two tumors overlap, both count them)."""

    id: int
    kind: str
    border: str
    diameter_mm: float
    volume_ml: float
    center_mm: tuple[float, float, float]
    touches_liver_surface: bool


@dataclasses.dataclass
class PhantomCase:
    """One synthetic scan: the CT in HU (int16), its labels (uint8), and what was drawn."""

    image: sitk.Image
    labels: sitk.Image
    seed: int
    phase: str
    orientation: str
    randomized: bool
    tumors: list[TumorInfo]

    def manifest_entry(self) -> dict:
        """What a reader of the data set needs without opening the images."""
        return {
            "seed": self.seed,
            "phase": self.phase,
            "orientation": self.orientation,
            "randomized": self.randomized,
            "size": list(self.image.GetSize()),
            "spacing_mm": [round(s, 4) for s in self.image.GetSpacing()],
            "origin_mm": [round(o, 3) for o in self.image.GetOrigin()],
            "direction": [round(d, 6) for d in self.image.GetDirection()],
            "tumors": [dataclasses.asdict(t) for t in self.tumors],
        }


# --------------------------------------------------------------------------------------------
# The canvas: a grid in millimetres and a tissue map painted one bounding box at a time.


@dataclasses.dataclass
class Box:
    """A sub-block of the canvas with broadcastable coordinate arrays (mm) of its voxels."""

    slices: tuple[slice, slice, slice]
    z: np.ndarray  # (nz, 1, 1)
    y: np.ndarray  # (1, ny, 1)
    x: np.ndarray  # (1, 1, nx)

    @property
    def empty(self) -> bool:
        return self.z.size == 0 or self.y.size == 0 or self.x.size == 0


class Canvas:
    def __init__(self, size_zyx: tuple[int, int, int], spacing_zyx, origin_zyx):
        self.spacing = np.asarray(spacing_zyx, dtype=float)
        self.origin = np.asarray(origin_zyx, dtype=float)
        self.axes = [
            (o + s * np.arange(n)).astype(np.float32)
            for n, s, o in zip(size_zyx, self.spacing, self.origin)
        ]
        self.tissue = np.full(size_zyx, Tissue.AIR, dtype=np.uint8)

    def box(self, low_zyx, high_zyx) -> Box:
        """The voxels whose centres lie inside [low, high] (mm), clipped to the grid."""
        slices = []
        for axis, lo, hi, s, o in zip(self.axes, low_zyx, high_zyx, self.spacing, self.origin):
            start = max(0, int(math.ceil((lo - o) / s)))
            stop = min(len(axis), int(math.floor((hi - o) / s)) + 1)
            slices.append(slice(start, max(start, stop)))
        z, y, x = (axis[s] for axis, s in zip(self.axes, slices))
        return Box(tuple(slices), z[:, None, None], y[None, :, None], x[None, None, :])

    def box_around(self, center_zyx, radius_mm: float) -> Box:
        c = np.asarray(center_zyx, dtype=float)
        return self.box(c - radius_mm, c + radius_mm)

    def paint(self, box: Box, mask: np.ndarray, tissue: Tissue, where=None) -> None:
        """Write ``tissue`` where ``mask`` holds; ``where`` limits it to voxels of given tissues."""
        block = self.tissue[box.slices]
        mask = np.broadcast_to(mask, block.shape)
        if where is not None:
            mask = mask & np.isin(block, where)
        block[mask] = tissue


# --------------------------------------------------------------------------------------------
# Implicit shapes. Each returns f on a box: f < 0 inside, f = 0 on the surface, in units of the
# shape's own radius, so one perturbation amplitude means the same for small and large shapes.


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_angle_deg, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def rotation_about_z(angle_deg: float) -> np.ndarray:
    """A rotation in the axial plane, in (z, y, x) component order."""
    a = math.radians(angle_deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _local_coords(box: Box, center_zyx, rotation: np.ndarray | None):
    dz, dy, dx = box.z - center_zyx[0], box.y - center_zyx[1], box.x - center_zyx[2]
    if rotation is None:
        return dz, dy, dx
    r = rotation.astype(np.float32)
    return tuple(r[0, i] * dz + r[1, i] * dy + r[2, i] * dx for i in range(3))


def ellipsoid(box: Box, center_zyx, radii_zyx, rotation=None) -> np.ndarray:
    qz, qy, qx = _local_coords(box, center_zyx, rotation)
    rz, ry, rx = (np.float32(r) for r in radii_zyx)
    return np.sqrt((qz / rz) ** 2 + (qy / ry) ** 2 + (qx / rx) ** 2) - 1


def tube(box: Box, start_zyx, end_zyx, radius: float) -> np.ndarray:
    """A capsule around the segment start-end, f in units of its radius."""
    a = np.asarray(start_zyx, dtype=np.float32)
    d = np.asarray(end_zyx, dtype=np.float32) - a
    length2 = max(float(d @ d), 1e-6)
    pz, py, px = box.z - a[0], box.y - a[1], box.x - a[2]
    t = np.clip((pz * d[0] + py * d[1] + px * d[2]) / length2, 0, 1)
    dist = np.sqrt((pz - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (px - t * d[2]) ** 2)
    return dist / np.float32(radius) - 1


def tube_box(canvas: Canvas, start_zyx, end_zyx, radius: float) -> Box:
    lo = np.minimum(start_zyx, end_zyx) - radius
    hi = np.maximum(start_zyx, end_zyx) + radius
    return canvas.box(lo, hi)


class Wobble:
    """A smooth random field: a sum of a few plane waves with random direction and phase."""

    def __init__(self, rng: np.random.Generator, amplitude: float, wavelength_mm, n_modes=4):
        directions = rng.normal(size=(n_modes, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=n_modes)
        self.k = (2 * np.pi * directions / wavelengths[:, None]).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=n_modes).astype(np.float32)
        self.amplitude = np.float32(amplitude / math.sqrt(n_modes))

    def __call__(self, box: Box) -> np.ndarray:
        field = np.zeros(np.broadcast_shapes(box.z.shape, box.y.shape, box.x.shape), np.float32)
        for (kz, ky, kx), phase in zip(self.k, self.phase):
            field += np.sin(kz * box.z + ky * box.y + kx * box.x + phase)
        return field * self.amplitude


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float = 0.25) -> np.ndarray:
    """Union of two implicit shapes that blends them over ``k`` instead of a crease."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
    return b + (a - b) * h - k * h * (1 - h)


# --------------------------------------------------------------------------------------------
# Anatomy. Positions are in millimetres of a standard adult (body half-widths 165 x 125 mm)
# relative to the body centre in-plane and to the top of the right diaphragm dome in z; each
# case scales them by its own body size.


@dataclasses.dataclass
class Body:
    scale: float
    half_width: float  # x, mm
    half_depth: float  # y, mm
    center_x: float
    center_y: float
    fat_mm: float
    muscle_mm: float
    spine_y: float

    def at(self, z_, y_, x_):
        """A standard-adult position (z, y, x) in this body's millimetres."""
        s = self.scale
        return (z_ * s, self.center_y + y_ * s, self.center_x + x_ * s)


def draw_body(canvas: Canvas, body: Body, rng: np.random.Generator) -> np.ndarray:
    """An elliptic body with a flat back (skin, fat, wall, ribs, table); returns the 2D cavity."""
    y = canvas.axes[1][:, None] - body.center_y
    x = canvas.axes[2][None, :] - body.center_x
    theta = np.arctan2(y, x)
    modes = rng.normal(0, 0.02, size=(4, 2))
    radius = 1 / np.sqrt((np.cos(theta) / body.half_width) ** 2 + (np.sin(theta) / body.half_depth) ** 2)
    radius *= 1 + sum(a * np.cos((m + 2) * theta) + b * np.sin((m + 2) * theta) for m, (a, b) in enumerate(modes))
    depth = radius - np.hypot(x, y)  # mm below the skin along the ray from the body centre
    back = body.half_depth * 0.92
    inside = (depth > 0) & (y < back)
    depth = np.minimum(depth, back - y)
    return paint_body(canvas, body, depth, theta, inside, back)


def paint_body(canvas: Canvas, body: Body, depth: np.ndarray, theta: np.ndarray, inside: np.ndarray,
               back: float) -> np.ndarray:
    """Fill every slice with the body's layers by ``depth`` (mm below the skin; 2D, like ``theta``,
    the direction from the body centre, and ``inside``), the table under the back (``back`` mm
    behind the centre) and the ribs; returns the 2D cavity inside the muscle wall."""
    y = canvas.axes[1][:, None] - body.center_y
    x = canvas.axes[2][None, :] - body.center_x
    anterior = np.clip(-np.sin(theta), 0, 1)  # 1 at the front, 0 at the sides and back
    fat = body.fat_mm * (0.6 + 0.8 * anterior)
    wall = 2.5 + fat + body.muscle_mm
    layers = np.full(depth.shape, Tissue.AIR, np.uint8)
    layers[inside] = Tissue.VISCERAL_FAT
    layers[inside & (depth < wall)] = Tissue.MUSCLE
    layers[inside & (depth < 2.5 + fat)] = Tissue.FAT
    layers[inside & (depth < 2.5)] = Tissue.SKIN
    table = (y > back + 8 * body.scale) & (y < back + 30 * body.scale) & (np.abs(x) < 230)
    layers[table] = Tissue.TABLE
    canvas.tissue[:] = layers[None]
    _draw_ribs(canvas, body, depth, wall, theta, inside)
    return inside & (depth > wall)


def _draw_ribs(canvas, body: Body, depth, wall, theta, inside) -> None:
    """Ribs: thin curved bands just inside the wall, tilted down towards the front."""
    ring = inside & (depth > wall - 3) & (depth < wall + 7) & (np.sin(theta) > -0.75)
    rows, cols = np.nonzero(ring)
    anterior = -np.sin(theta[rows, cols])
    tilt = 40 * body.scale * anterior  # ribs run caudally towards the front
    pitch, width = 24 * body.scale, 9 * body.scale
    z = canvas.axes[0][:, None]
    lowest = -150 * body.scale + 60 * body.scale * np.clip(anterior, 0, 1)
    in_rib = (np.mod(z + tilt + 1000, pitch) < width) & (z > lowest) & (z < 80 * body.scale)
    cortex_depth = np.abs(depth[rows, cols] - wall[rows, cols] - 2)
    tissue = np.where(cortex_depth > 3, Tissue.BONE_CORTEX, Tissue.BONE_MARROW).astype(np.uint8)
    k, n = np.nonzero(in_rib)
    canvas.tissue[k, rows[n], cols[n]] = tissue[n]


def draw_spine(canvas: Canvas, body: Body) -> None:
    """Vertebral bodies with discs, the spinal canal, posterior elements and back muscles."""
    s, cz = body.scale, body.center_x
    vy = body.spine_y
    box = canvas.box((-1e4, vy - 60 * s, cz - 90 * s), (1e4, vy + 90 * s, cz + 90 * s))
    if box.empty:
        return
    r = np.hypot(box.y - vy, box.x - cz)
    disc = np.mod(box.z + 1000, 32 * s) < 7 * s
    vertebra = r < 20 * s
    back_muscles = np.hypot((box.x - cz) / (70 * s), (box.y - vy - 45 * s) / (30 * s)) < 1
    canvas.paint(box, back_muscles, Tissue.MUSCLE, where=(Tissue.VISCERAL_FAT, Tissue.FAT))
    canvas.paint(box, vertebra & disc, Tissue.DISC)
    canvas.paint(box, vertebra & ~disc, Tissue.BONE_MARROW)
    canvas.paint(box, (r >= 17.5 * s) & vertebra & ~disc, Tissue.BONE_CORTEX)
    arch = (np.hypot(box.y - vy - 30 * s, box.x - cz) < 15 * s) & ~disc
    canvas.paint(box, arch, Tissue.BONE_CORTEX)
    canvas.paint(box, np.hypot(box.y - vy - 30 * s, box.x - cz) < 8 * s, Tissue.CSF)
    spinous = (np.abs(box.x - cz) < 4 * s) & (box.y - vy > 40 * s) & (box.y - vy < 62 * s) & ~disc
    canvas.paint(box, spinous, Tissue.BONE_CORTEX)
    for side in (-1, 1):  # psoas: grows towards the pelvis
        width = np.clip((-box.z - 120 * s) / (5 * s), 0, 22 * s)
        psoas = np.hypot(box.x - cz - side * 38 * s, box.y - vy + 5 * s) < width
        canvas.paint(box, psoas, Tissue.MUSCLE)


def draw_great_vessels(canvas: Canvas, body: Body, rng) -> None:
    s = body.scale
    aorta = (body.spine_y - 28 * s, body.center_x + 15 * s)
    ivc = (body.spine_y - 28 * s, body.center_x - 28 * s)
    top = 40 * s
    for (cy, cx), radius, tissue in ((aorta, rng.uniform(10, 13) * s, Tissue.AORTA),
                                     (ivc, rng.uniform(10, 13) * s, Tissue.IVC)):
        box = canvas.box((-1e4, cy - 20 * s, cx - 20 * s), (top, cy + 20 * s, cx + 20 * s))
        if not box.empty:
            ry = radius * (0.75 if tissue == Tissue.IVC else 1.0)
            canvas.paint(box, np.hypot((box.y - cy) / ry, (box.x - cx) / radius) < 1, tissue)


def draw_organ(canvas, center, radii, rotation, wobble, tissue, where=None):
    box = canvas.box_around(center, max(radii) * 1.3)
    if box.empty:
        return box, None
    f = ellipsoid(box, center, radii, rotation)
    if wobble is not None:
        f += wobble(box)
    canvas.paint(box, f < 0, tissue, where)
    return box, f


def draw_bowel(canvas: Canvas, body: Body, rng) -> None:
    """Colon and small-bowel loops in the mesentery below the liver."""
    s = body.scale
    _draw_colon(canvas, body, rng)
    for _ in range(rng.integers(25, 50)):
        start = np.array(body.at(rng.uniform(-340, -130), rng.uniform(-95, 30), rng.uniform(-100, 100)))
        end = start + rng.normal(0, 35 * s, size=3)
        draw_bowel_segment(canvas, start, end, rng.uniform(9, 17) * s, rng)


def draw_upper_organs(canvas: Canvas, body: Body, rng) -> None:
    """Stomach, pancreas and spleen: drawn before the liver, which then covers them."""
    s = body.scale
    # Stomach: gas rises to the front (the patient lies supine), fluid or oral contrast behind.
    center = body.at(-60, -35, 50)
    radii = np.array([50, 35, 42]) * s * rng.uniform(0.7, 1.2, size=3)
    box, f = draw_organ(canvas, center, radii, random_rotation(rng, 25),
                         Wobble(rng, 0.08, (40, 120)), Tissue.BOWEL_WALL)
    if f is not None:
        content = Tissue.ORAL_CONTRAST if rng.random() < 0.2 else Tissue.FLUID
        lumen = f < -4 * s / min(radii)
        gas_level = center[1] - radii[1] * rng.uniform(0.1, 0.7)
        canvas.paint(box, lumen & (box.y >= gas_level), content)
        canvas.paint(box, lumen & (box.y < gas_level), Tissue.GAS)
    # Pancreas: a lobulated band across the midline in front of the spine.
    head, tail = body.at(-115, -10, -25), body.at(-95, 5, 70)
    radius = rng.uniform(9, 14) * s
    box = tube_box(canvas, head, tail, radius * 1.3)
    if not box.empty:
        f = tube(box, head, tail, radius) + Wobble(rng, 0.2, (15, 40))(box)
        canvas.paint(box, f < 0, Tissue.PANCREAS)
    # Spleen: a crescent against the left posterior ribs.
    center = body.at(-60, 35, 90)
    radii = np.array([55, 55, 24]) * s * rng.uniform(0.75, 1.25, size=3)
    rotation = rotation_about_z(-35)
    box, f = draw_organ(canvas, center, radii, rotation, Wobble(rng, 0.06, (40, 100)), Tissue.SPLEEN)
    if f is not None:
        hollow = ellipsoid(box, np.add(center, (0, -5 * s, -25 * s)), radii * (0.9, 0.8, 0.7), rotation)
        canvas.paint(box, (hollow < 0) & (f < 0), Tissue.VISCERAL_FAT)


def _draw_colon(canvas, body: Body, rng) -> None:
    """Ascending, transverse and descending colon, passing under the liver (hepatic flexure)."""
    path = [(-330, -10, -85), (-175, -25, -80), (-150, -60, -55), (-140, -75, 10),
            (-125, -45, 75), (-150, 0, 85), (-330, 0, 80)]
    points = [np.array(body.at(*p)) + rng.normal(0, 8 * body.scale, 3) for p in path]
    for start, end in zip(points[:-1], points[1:]):
        draw_bowel_segment(canvas, start, end, rng.uniform(17, 26) * body.scale, rng)


def draw_bowel_segment(canvas, start, end, radius, rng, where=None) -> None:
    """A straight piece of bowel: wall, and gas, fluid or mottled stool inside (``where``: only
    over those tissues)."""
    box = tube_box(canvas, start, end, radius)
    if box.empty:
        return
    f = tube(box, start, end, radius)
    canvas.paint(box, f < 0, Tissue.BOWEL_WALL, where)
    content = rng.choice([Tissue.GAS, Tissue.FLUID, Tissue.STOOL], p=[0.4, 0.35, 0.25])
    inner = where if where is None else (*where, Tissue.BOWEL_WALL)
    canvas.paint(box, f < -3 / radius, content, inner)
    if content == Tissue.STOOL:  # mottled: pockets of gas in faeces
        canvas.paint(box, (f < -3 / radius) & (Wobble(rng, 1.0, (6, 14), 6)(box) > 0.45), Tissue.GAS, (Tissue.STOOL,))


def _liver_shape(canvas: Canvas, body: Body, rng) -> tuple[Box, np.ndarray]:
    """Right lobe, left lobe and caudate lobe blended into one implicit shape."""
    s = body.scale
    size = rng.uniform(0.85, 1.15)
    right_c = body.at(-75 * size, 5, -60)
    right_r = np.array([85, 80, 75]) * s * size * rng.uniform(0.85, 1.15, size=3)
    left_c = body.at(-45 * size, -45, 25)
    left_r = np.array([45, 35, 70]) * s * size * rng.uniform(0.6, 1.3, size=3)
    caudate_c = body.at(-70 * size, 20, -15)
    caudate_r = np.array([35, 20, 22]) * s * size
    low = np.minimum.reduce([np.subtract(c, r * 1.3) for c, r in ((right_c, right_r), (left_c, left_r))])
    high = np.maximum.reduce([np.add(c, r * 1.3) for c, r in ((right_c, right_r), (left_c, left_r))])
    box = canvas.box(low, high)
    if box.empty:
        return box, None
    f = _smooth_union(
        ellipsoid(box, right_c, right_r, random_rotation(rng, 12)),
        ellipsoid(box, left_c, left_r, rotation_about_z(rng.uniform(-25, 5)) @ random_rotation(rng, 10)),
    )
    f = _smooth_union(f, ellipsoid(box, caudate_c, caudate_r), 0.15)
    # The visceral (inferior-medial) surface is flatter than the rounded dome.
    visceral = ((box.z - right_c[0]) + 0.5 * (box.x - right_c[2]) + 0.4 * (box.y - right_c[1])) / (-right_r[0] * 0.9) - 1
    f = np.maximum(f, visceral * 0.6)
    f += Wobble(rng, 0.07, (50, 140), 5)(box)
    return box, f


def diaphragm_height(canvas: Canvas, body: Body) -> np.ndarray:
    """z (mm) of the diaphragm over each (y, x): two domes, the right one higher."""
    s = body.scale
    y = (canvas.axes[1][:, None] - body.center_y) / s
    x = (canvas.axes[2][None, :] - body.center_x) / s
    right = -((x + 65) ** 2 / 95 ** 2 + (y + 5) ** 2 / 110 ** 2) * 70
    left = -15 - ((x - 65) ** 2 / 90 ** 2 + (y + 5) ** 2 / 105 ** 2) * 70
    posterior_recess = -25 * np.clip(y / 110, 0, 1)
    return (np.maximum(right, left) + posterior_recess) * s


def _draw_liver(canvas: Canvas, body: Body, rng, cavity: np.ndarray, diaphragm: np.ndarray):
    box, f = _liver_shape(canvas, body, rng)
    below_dome = box.z < (diaphragm[box.slices[1], box.slices[2]] - 4 * body.scale)[None]
    canvas.paint(box, (f < 0) & below_dome & cavity[box.slices[1], box.slices[2]][None], Tissue.LIVER)
    draw_liver_vessels(canvas, body, rng)
    gallbladder = body.at(-110, -40, -35)
    radii = np.array([38, 16, 16]) * body.scale * rng.uniform(0.7, 1.2, 3)
    if rng.random() < 0.8:
        draw_organ(canvas, gallbladder, radii, random_rotation(rng, 30), None, Tissue.GALLBLADDER)


def draw_liver_vessels(canvas: Canvas, body: Body, rng) -> None:
    """Portal vein branching from the hilum, hepatic veins converging on the IVC at the dome."""
    draw_vessel_trees(canvas, rng, inlet=np.array(body.at(-130, 10, -10)), hilum=np.array(body.at(-95, 0, -35)),
                      confluence=np.array(body.at(-15, 10, -28)), scale=body.scale)


def draw_vessel_trees(canvas: Canvas, rng, inlet, hilum, confluence, scale: float) -> None:
    """The portal vein from ``inlet`` to the hilum, branching into the liver from there, and the
    hepatic veins branching from their confluence at the IVC; branches stay in liver tissue."""
    s = scale
    _draw_vessel(canvas, inlet, hilum, 7 * s, Tissue.PORTAL_VEIN, None)
    for direction in ((0.3, 0.1, -1.0), (0.4, -0.6, 0.8)):
        _branch(canvas, rng, hilum, np.array(direction), 6 * s, 45 * s, 3, Tissue.PORTAL_VEIN)
    for direction in ((-0.6, -0.2, -1.0), (-0.8, -0.6, -0.1), (-0.5, -0.7, 0.7)):
        _branch(canvas, rng, confluence, np.array(direction), 5.5 * s, 50 * s, 2, Tissue.HEPATIC_VEIN)


def _branch(canvas, rng, start, direction, radius, length, depth, tissue) -> None:
    direction = direction / np.linalg.norm(direction)
    end = start + direction * length
    _draw_vessel(canvas, start, end, radius, tissue, LIVER_TISSUES)
    if depth == 0:
        return
    for _ in range(2):
        child = direction + rng.normal(0, 0.55, 3)
        _branch(canvas, rng, end, child, radius * 0.72, length * 0.75, depth - 1, tissue)


def _draw_vessel(canvas, start, end, radius, tissue, where) -> None:
    box = tube_box(canvas, start, end, radius)
    if not box.empty:
        canvas.paint(box, tube(box, start, end, radius) < 0, tissue, where)


def draw_kidneys(canvas: Canvas, body: Body, rng) -> None:
    s = body.scale
    for side, z in ((-1, -150), (1, -130)):
        center = body.at(z + rng.uniform(-15, 15), 20, side * 75)
        radii = np.array([55, 22, 28]) * s * rng.uniform(0.85, 1.15, 3)
        rotation = rotation_about_z(side * 25) @ random_rotation(rng, 12)
        box, f = draw_organ(canvas, center, radii, rotation, Wobble(rng, 0.04, (30, 80)), Tissue.KIDNEY_CORTEX)
        if f is None:
            continue
        canvas.paint(box, f < -0.3, Tissue.KIDNEY_MEDULLA)
        medial = -side * (box.x - center[2]) / radii[2]
        canvas.paint(box, (f < -0.35) & (medial > 0.25), Tissue.RENAL_SINUS)


def draw_chest(canvas: Canvas, body: Body, cavity: np.ndarray, diaphragm: np.ndarray) -> None:
    """Lung bases and heart above the diaphragm, with a muscular diaphragm band under them."""
    s = body.scale
    top = canvas.box((-1e4, -1e4, -1e4), (1e4, 1e4, 1e4))
    z = top.z
    above = (z > diaphragm[None]) & cavity[None]
    band = (z > diaphragm[None] - 4 * s) & ~above & cavity[None]
    keep = (Tissue.BONE_CORTEX, Tissue.BONE_MARROW, Tissue.DISC, Tissue.CSF, Tissue.AORTA, Tissue.MUSCLE)
    not_kept = ~np.isin(canvas.tissue, keep)
    canvas.tissue[band & not_kept] = Tissue.MUSCLE
    canvas.tissue[above & not_kept] = Tissue.LUNG
    center = body.at(45, -45, 20)
    box, f = draw_organ(canvas, center, np.array([60, 55, 65]) * s, rotation_about_z(-30), None,
                         Tissue.MYOCARDIUM, where=(Tissue.LUNG, Tissue.MUSCLE))
    if f is not None:
        canvas.paint(box, f < -0.2, Tissue.BLOOD, where=(Tissue.MYOCARDIUM,))


# --------------------------------------------------------------------------------------------
# Tumors


@dataclasses.dataclass
class _TumorPlan:
    kind: str
    border: str
    radius_mm: float
    center: np.ndarray
    at_surface: bool


def _plan_tumors(rng, liver: np.ndarray, canvas: Canvas, small: bool) -> list[_TumorPlan]:
    count = 0 if rng.random() < 0.12 else int(min(rng.geometric(0.35), 12))
    points = np.argwhere(liver)
    if count == 0 or len(points) == 0:
        return []
    surface = np.argwhere(liver & ~ndimage.binary_erosion(liver))
    min_diameter = 12.0 if small else 3.0
    plans = []
    for _ in range(count):
        at_surface = rng.random() < 0.25
        pool = surface if at_surface and len(surface) else points
        index = pool[rng.integers(len(pool))]
        center = canvas.origin + index * canvas.spacing
        diameter = math.exp(rng.uniform(math.log(min_diameter), math.log(100.0)))
        plans.append(_TumorPlan(rng.choice(TUMOR_KINDS, p=[0.45, 0.2, 0.2, 0.15]),
                                "ill_defined" if rng.random() < 0.35 else "sharp",
                                diameter / 2, center, at_surface))
    return plans


def _tumor_hu(plan: _TumorPlan, f: np.ndarray, liver_hu: float, rng) -> np.ndarray:
    """Intensity inside one tumor as a function of depth below its surface (f < 0 inside)."""
    depth = -f  # 0 at the surface, 1 at the centre
    if plan.kind == "hypodense":
        return np.full_like(f, liver_hu - rng.uniform(25, 80))
    if plan.kind == "hyperdense":
        return np.full_like(f, liver_hu + rng.uniform(20, 60))
    rim = np.float32(min(0.5, 4.0 / plan.radius_mm + 0.1))
    if plan.kind == "rim_enhancing":
        core, wall = liver_hu - rng.uniform(30, 70), liver_hu + rng.uniform(20, 50)
    else:
        core, wall = rng.uniform(5, 30), liver_hu - rng.uniform(10, 30)
    return np.where(depth < rim, np.float32(wall), np.float32(core)).astype(np.float32)


def _draw_tumors(canvas, hu, labels, plans, rng, look_rng, liver_hu) -> list[TumorInfo]:
    liver = labels == LIVER
    voxel_ml = float(np.prod(canvas.spacing)) / 1000
    infos = []
    for plan in plans:
        radii = plan.radius_mm * rng.uniform(0.7, 1.0, 3)
        box = canvas.box_around(plan.center, plan.radius_mm * 1.6 + 5)
        if box.empty:
            continue
        f = ellipsoid(box, plan.center, radii, random_rotation(rng, 180))
        f += Wobble(rng, 0.12, (plan.radius_mm, plan.radius_mm * 4 + 1))(box)
        inside = (f < 0) & liver[box.slices]
        if not inside.any():
            continue
        width = rng.uniform(2.0, 5.0) if plan.border == "ill_defined" else 0.6
        weight = 1 / (1 + np.exp(np.clip(f * plan.radius_mm / width, -30, 30)))
        weight *= liver[box.slices] | (labels[box.slices] == TUMOR)
        block = hu[box.slices]
        block += weight * (_tumor_hu(plan, f, liver_hu, look_rng) - block)
        labels[box.slices][inside] = TUMOR
        infos.append(TumorInfo(
            id=len(infos) + 1, kind=str(plan.kind), border=plan.border,
            diameter_mm=round(2 * plan.radius_mm, 1), volume_ml=round(float(inside.sum()) * voxel_ml, 3),
            center_mm=tuple(round(float(c), 1) for c in plan.center[::-1]),
            touches_liver_surface=plan.at_surface))
    return infos


# --------------------------------------------------------------------------------------------
# Intensities, noise and blur


def intensity_table(phase: str, randomize: bool, rng) -> np.ndarray:
    table = np.zeros(256, np.float32)
    for tissue, hu in _HU[phase].items():
        table[tissue] = hu
    soft = [t for t in Tissue if -200 < table[t] < 400]
    table[soft] += rng.normal(0, 8, len(soft)).astype(np.float32)  # patients and scanners differ
    if randomize:  # SynthSeg-style: each tissue its own random mean, air and bone kept apart
        table[soft] += rng.normal(0, 35, len(soft)).astype(np.float32)
        table[Tissue.LIVER] = rng.uniform(40, 180)
    return table


def _bias_field(shape: tuple[int, ...], rng) -> np.ndarray:
    """A smooth multiplicative field (about +-10 %), as from beam hardening or a poor calibration."""
    return 1 + smooth_field(rng.normal(0, 0.05, size=(3, 3, 3)).astype(np.float32), shape)


def smooth_field(control: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``control`` [z, y, x] spread evenly over a volume of ``shape`` and interpolated linearly
    between its points, constant beyond the outer ones (what scipy's ``zoom`` with ``grid_mode``
    gives, from SimpleITK's threaded resampler: several times sooner on a full-size scan)."""
    sparse = sitk.GetImageFromArray(control.astype(np.float32))
    step = [n / m for n, m in zip(shape[::-1], control.shape[::-1])]
    sparse.SetSpacing(step)
    sparse.SetOrigin([s / 2 - 0.5 for s in step])
    grid = sitk.Image(list(shape[::-1]), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(sparse, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat32, True))


def finish(hu: np.ndarray, canvas: Canvas, rng, randomize: bool, may_cut_circle: bool) -> np.ndarray:
    """Noise and partial-volume blur in one Gaussian pass, then (half the time, where
    ``may_cut_circle``) the scanner's round field of view."""
    sz = canvas.spacing[0]
    in_plane = rng.uniform(0.5, 0.9)
    blur = np.array([0.45, in_plane, in_plane])  # voxels: slice profile, reconstruction kernel
    noise_hu = rng.uniform(8, 20) * float(np.clip(math.sqrt(2.5 / sz), 0.7, 1.6))  # thin = noisy
    if randomize:
        blur = rng.uniform(0.3, 1.5, 3)
        noise_hu = rng.uniform(0, 45)
        hu = (hu + 1000) * _bias_field(hu.shape, rng) - 1000
    # Blurring white noise shrinks its deviation by the kernel's L2 norm: scale it up first.
    gain = math.prod(_gaussian_l2_norm(s) for s in blur)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu / gain)
    hu = ndimage.gaussian_filter(hu, blur, output=np.float32, truncate=3.0)
    if may_cut_circle and rng.random() < 0.5:  # outside the reconstruction circle
        y = canvas.axes[1][:, None] - canvas.axes[1].mean()
        x = canvas.axes[2][None, :] - canvas.axes[2].mean()
        radius = min(np.ptp(canvas.axes[1]), np.ptp(canvas.axes[2])) / 2
        hu[:, np.hypot(x, y) > radius] = -3024
    return np.clip(np.rint(hu), -3024, 3071).astype(np.int16)


def _gaussian_l2_norm(sigma: float) -> float:
    if sigma <= 0:
        return 1.0
    radius = int(3 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return float(np.sqrt((kernel ** 2).sum()))


# --------------------------------------------------------------------------------------------
# The case


def _sample_grid(rng, small: bool, size_xyz):
    if small:
        spacing_xy = rng.uniform(3.6, 4.2)
        spacing_z = rng.uniform(4.0, 6.0)
        size = (_SMALL_SIZE_XY, _SMALL_SIZE_XY, int(rng.integers(40, 57)))
    else:
        spacing_xy = rng.uniform(0.55, 1.0)
        spacing_z = float(rng.choice(_SLICE_SPACINGS_MM))
        count = int(np.clip(rng.uniform(230, 420) / spacing_z, 40, 300))
        size = (_FULL_SIZE_XY, _FULL_SIZE_XY, count)
    if size_xyz is not None:
        size = tuple(int(n) for n in size_xyz)
    return size, (spacing_xy, spacing_xy, spacing_z)


def _sample_body(rng, fov_mm: float, small: bool) -> Body:
    half_width = float(np.clip(rng.uniform(0.36, 0.5) * fov_mm, 125, 190))
    scale = half_width / 165
    return Body(
        scale=scale, half_width=half_width, half_depth=half_width * rng.uniform(0.68, 0.82),
        center_x=rng.uniform(-10, 10), center_y=rng.uniform(-25, 0),
        fat_mm=rng.uniform(6, 35) * scale, muscle_mm=rng.uniform(8, 14) * scale,
        spine_y=0.0)


def generate_case(seed: int, small: bool = False, randomize: bool = False,
                  size_xyz: tuple[int, int, int] | None = None) -> PhantomCase:
    """Draw one scan and its labels; the same arguments always give the same voxels.

    ``small`` gives a 96x96x~48 case at about 4x4x5 mm for fast tests; ``size_xyz`` fixes the
    grid size (for benchmarks). ``randomize`` turns on the domain randomisation for training.
    """
    rng = np.random.default_rng(seed)
    look_rng = np.random.default_rng([seed, 1])  # appearance only: anatomy is the same either way
    phase = "arterial" if rng.random() < 0.25 else "portal"
    size, spacing = _sample_grid(rng, small, size_xyz)
    body = _sample_body(rng, size[0] * spacing[0], small)
    body.spine_y = body.center_y + body.half_depth * 0.42
    # z = 0 is the top of the right dome; the scan starts a little above it.
    top = rng.uniform(15, 70) * body.scale
    origin_zyx = (top - (size[2] - 1) * spacing[2],
                  -(size[1] - 1) * spacing[1] / 2, -(size[0] - 1) * spacing[0] / 2)
    canvas = Canvas(size[::-1], spacing[::-1], origin_zyx)

    cavity = draw_body(canvas, body, rng)
    diaphragm = diaphragm_height(canvas, body)
    draw_bowel(canvas, body, rng)
    draw_upper_organs(canvas, body, rng)
    _draw_liver(canvas, body, rng, cavity, diaphragm)
    draw_kidneys(canvas, body, rng)
    draw_great_vessels(canvas, body, rng)
    draw_spine(canvas, body)
    draw_chest(canvas, body, cavity, diaphragm)

    labels = _liver_labels(canvas.tissue)
    table = intensity_table(phase, randomize, look_rng)
    hu = table[canvas.tissue]
    plans = _plan_tumors(rng, labels == LIVER, canvas, small)
    tumors = _draw_tumors(canvas, hu, labels, plans, rng, look_rng, float(table[Tissue.LIVER]))
    del canvas.tissue
    ct = finish(hu, canvas, look_rng, randomize, may_cut_circle=not small)

    orientation = str(rng.choice(ORIENTATIONS))
    image, label_image = (to_image(a, canvas, orientation) for a in (ct, labels))
    return PhantomCase(image, label_image, seed, phase, orientation, randomize, tumors)


def _liver_labels(tissue: np.ndarray) -> np.ndarray:
    """Label 1 on the largest connected piece of liver tissue (vessels inside it included)."""
    import cc3d  # here, not at the top: the Slicer module reads SAMPLE_SEED before its pip packages are installed

    liver = np.isin(tissue, LIVER_TISSUES)
    components = cc3d.connected_components(liver, connectivity=6)
    labels = np.zeros(tissue.shape, np.uint8)
    if components.max() > 0:
        largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
        labels[components == largest] = LIVER
    return labels


def to_image(array: np.ndarray, canvas: Canvas, orientation: str) -> sitk.Image:
    """Wrap a canonical array, place it in space, and store it with the case's axis order."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in canvas.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in canvas.origin[::-1]))
    return sitk.DICOMOrient(image, orientation)


# --------------------------------------------------------------------------------------------
# A data set on disk


def case_file_names(case_number: int) -> tuple[str, str]:
    """The LiTS names, so that anything that reads LiTS reads the phantoms too."""
    return f"volume-{case_number}.nii.gz", f"segmentation-{case_number}.nii.gz"


def write_dataset(out_dir: Path, count: int, seed: int, small: bool = False,
                  randomize: bool = False, overwrite: bool = False,
                  progress: Callable[[str], None] = lambda _: None, anatomy: Path | None = None) -> Path:
    """Write ``count`` cases in the LiTS layout plus ``manifest.json``; case K uses seed + K and,
    with ``anatomy`` (a label map or a folder of them), is drawn on map K of it in turn.

    Every target is checked before the first case is drawn, so a refused run changes nothing.
    """
    if count < 1:
        raise InputError(f"--n must be at least 1, got {count}")
    if small and anatomy is not None:
        raise InputError("--small draws phantoms; cases on real label maps keep their scan's size")
    out_dir = Path(out_dir)
    targets = [out_dir / name for k in range(count) for name in case_file_names(k)]
    targets.append(out_dir / "manifest.json")
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} exists ({len(existing)} of the outputs do); "
                         "pass --overwrite to replace them")
    draw = _case_drawer(small, randomize, anatomy)
    entries = []
    for k in range(count):
        case = draw(k, seed + k)
        volume_name, labels_name = case_file_names(k)
        write_image(case.image, out_dir / volume_name, overwrite=overwrite)
        write_image(case.labels, out_dir / labels_name, overwrite=overwrite)
        entries.append({"case": k, "volume": volume_name, "segmentation": labels_name,
                        **case.manifest_entry()})
        progress(f"case {k + 1}/{count}: seed {seed + k}, {len(case.tumors)} tumor(s), "
                 f"size {case.image.GetSize()}")
    manifest = {"generator": "LiverTumorDARN " + ("anatomy" if anatomy else "phantom"),
                "labels": {"0": "background", "1": "liver", "2": "tumor"},
                "small": small, "randomized": randomize, "cases": entries}
    return write_json(manifest, out_dir / "manifest.json", overwrite=overwrite)


def _case_drawer(small: bool, randomize: bool, anatomy: Path | None) -> Callable[[int, int], PhantomCase]:
    """(case number, seed) -> case: a phantom, or CT drawn on the case number's label map."""
    if anatomy is None:
        return lambda k, seed: generate_case(seed, small=small, randomize=randomize)
    from .anatomy import draw_case, usable_label_maps  # anatomy builds on this module

    maps = usable_label_maps(Path(anatomy))
    return lambda k, seed: draw_case(maps[k % len(maps)], seed, randomize=randomize)

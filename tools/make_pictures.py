"""Draw the pictures of the README and docs/, the extension icon and the Sample Data thumbnail
(the panel and the Extensions Index screenshot: tools/draw_panel.py).

    .venv/bin/python tools/make_pictures.py [gallery] [anatomy] [icons] [demo]

Without arguments it draws them all. Everything is drawn from phantoms (or, for ``anatomy``, from
the label maps in ../shared/anatomy) with fixed seeds, so the pictures are reproducible; the demo
picture is the one `livertumordarn demo` writes with the bundled weights (on the CPU, a few minutes).
"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from LiverTumorDARNLib.anatomy import draw_case
from LiverTumorDARNLib.demo import run_demo
from LiverTumorDARNLib.phantom import SAMPLE_SEED, generate_case
from LiverTumorDARNLib.picture import axial_overlay, montage, resize, save_png
from LiverTumorDARNLib.weights import bundled_models_dir

ROOT = Path(__file__).resolve().parents[1]
ICONS = ROOT / "LiverTumorDARN" / "Resources" / "Icons"
GALLERY_SEEDS = (1, 2, 3, 4, 5, 6)
ANATOMY = ROOT.parent / "shared" / "anatomy"
ANATOMY_CASES = (("btcv/label0001.nii.gz", 1), ("btcv/label0024.nii.gz", 2), ("abdomenatlas/case-1.nii.gz", 3),
                 ("lits-liver/segmentation-12.nii.gz", 4), ("lits-liver/segmentation-60.nii.gz", 5),
                 ("msd-hepaticvessel/hepaticvessel_010.nii.gz", 6))
ICON_SEED = 2
ICON_SIZE = 128


def gallery() -> None:
    """docs/phantoms.md's gallery."""
    overlays = []
    for seed in GALLERY_SEEDS:
        case = generate_case(seed)
        overlays.append(axial_overlay(case.image, case.labels))
        print(f"seed {seed}: {case.phase}, {case.orientation}, {len(case.tumors)} tumor(s)")
    picture = montage([resize(rgb, 320) for rgb in overlays], columns=3)
    save_png(picture, ROOT / "Resources" / "phantoms.png")


def anatomy() -> None:
    """docs/synthetic-ct.md's gallery: CT drawn on real label maps of each data set."""
    overlays = []
    for name, seed in ANATOMY_CASES:
        case = draw_case(ANATOMY / name, seed)
        overlays.append(axial_overlay(case.image, case.labels))
        print(f"{name} seed {seed}: {case.phase}, {case.orientation}, {len(case.tumors)} tumor(s)")
    save_png(montage([resize(rgb, 320) for rgb in overlays], columns=3), ROOT / "docs" / "images" / "anatomy-cases.png")


def icons() -> None:
    """The extension icon (a gallery phantom) and the Sample Data thumbnail (the sample case
    itself, which the Sample Data module's button loads)."""
    for seed, paths in ((ICON_SEED, (ROOT / "LiverTumorDARN.png", ICONS / "LiverTumorDARN.png")),
                        (SAMPLE_SEED, (ICONS / "LiverTumorPhantom.png",))):
        case = generate_case(seed)
        icon = body_square(axial_overlay(case.image, case.labels), ICON_SIZE)
        for path in paths:
            save_png(icon, path)


def body_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """The smallest square around the body, shrunk to ``size``: the slice reads at icon size."""
    rows, cols = np.nonzero(rgb.any(axis=2))
    square = max(np.ptp(rows), np.ptp(cols))
    r0, c0 = rows.min(), cols.min()
    return resize(rgb[r0:r0 + square, c0:c0 + square], size)


def demo() -> None:
    with tempfile.TemporaryDirectory() as folder:
        _, scores = run_demo(Path(folder), torch.device("cpu"), bundled_models_dir())
        shutil.copyfile(scores["picture"], ROOT / "Resources" / "demo.png")


PICTURES = {"gallery": gallery, "anatomy": anatomy, "icons": icons, "demo": demo}

if __name__ == "__main__":
    for name in sys.argv[1:] or PICTURES:
        PICTURES[name]()

"""Draw the README's pictures, the extension icon and the Extensions Index screenshot.

    .venv/bin/python tools/make_pictures.py

Everything is drawn from phantoms with fixed seeds, so the pictures are reproducible; the demo
picture is the one `livertumordarn demo` writes with the bundled weights (on the CPU).
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from LiverTumorDARNLib.demo import run_demo
from LiverTumorDARNLib.phantom import generate_case
from LiverTumorDARNLib.picture import axial_overlay, montage, resize, save_png
from LiverTumorDARNLib.weights import bundled_models_dir

ROOT = Path(__file__).resolve().parents[1]
GALLERY_SEEDS = (1, 2, 3, 4, 5, 6)
ICON_SEED = 2


def main() -> None:
    overlays = {}
    for seed in GALLERY_SEEDS:
        case = generate_case(seed)
        overlays[seed] = axial_overlay(case.image, case.labels)
        print(f"seed {seed}: {case.phase}, {case.orientation}, {len(case.tumors)} tumor(s)")
    gallery = montage([resize(rgb, 320) for rgb in overlays.values()], columns=3)
    save_png(gallery, ROOT / "Resources" / "phantoms.png")
    save_png(gallery, ROOT / "Resources" / "Screenshot.png")
    rgb = overlays[ICON_SEED]
    rows, cols = np.nonzero(rgb.any(axis=2))  # crop to the body so the icon reads at 128 px
    square = max(np.ptp(rows), np.ptp(cols))
    r0, c0 = rows.min(), cols.min()
    icon = resize(rgb[r0:r0 + square, c0:c0 + square], 128)
    for path in (ROOT / "LiverTumorDARN.png", ROOT / "LiverTumorDARN" / "Resources" / "Icons" / "LiverTumorDARN.png"):
        save_png(icon, path)
    with tempfile.TemporaryDirectory() as folder:
        _, scores = run_demo(Path(folder), torch.device("cpu"), bundled_models_dir())
        shutil.copyfile(scores["picture"], ROOT / "Resources" / "demo.png")


if __name__ == "__main__":
    main()

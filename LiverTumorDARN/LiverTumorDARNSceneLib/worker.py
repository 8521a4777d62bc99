"""The segmentation subprocess the Slicer panel runs, so that Slicer never freezes and Cancel can
stop the work at once (SlicerMONAIAuto3DSeg's pattern: a process, a reader thread, a queue).

    python -m LiverTumorDARNSceneLib.worker CT LABELS [--models DIR] [--device auto|cpu|cuda]
                                            [--min-tumor-confidence P]

Reads the CT file, writes the label map on the CT's grid to LABELS, and reports on stdout, one
JSON object a line: ``{"stage": "liver", "fraction": 0.5}`` while working, ``{"message": ...}``
for what the user should know (a GPU out of memory and the CPU fallback), ``{"error": ...}`` for
a mistake in the input (exit status 2). Only the core is imported: no Slicer, no Qt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import SimpleITK as sitk
import torch

from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import check_ct, write_image
from LiverTumorDARNLib.pipeline import load_stages, resolve_device, segment
from LiverTumorDARNLib.weights import bundled_models_dir


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def run(ct_path: Path, labels_path: Path, models_dir: Path, device_name: str,
        min_tumor_confidence: float | None = None) -> None:
    ct = sitk.ReadImage(str(ct_path))
    check_ct(ct, ct_path.name)
    device = resolve_device(device_name)
    try:
        result = _segment(ct, models_dir, device, min_tumor_confidence)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        emit(message="The GPU ran out of memory; segmenting on the CPU instead (slower).")
        result = _segment(ct, models_dir, torch.device("cpu"), min_tumor_confidence)
    write_image(result.labels, labels_path)
    emit(stage="done", fraction=1.0, liver_found=result.liver_found)


def _segment(ct: sitk.Image, models_dir: Path, device: torch.device, min_tumor_confidence: float | None):
    liver, tumor = load_stages(models_dir, device, min_tumor_confidence)
    return segment(ct, liver, tumor, device, lambda stage, fraction: emit(stage=stage, fraction=round(fraction, 3)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="LiverTumorDARNSceneLib.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("ct", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--models", type=Path, default=None, help="weights folder (default: the bundled weights)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--min-tumor-confidence", type=float, default=None,
                        help="replaces the weights' tumor confidence floor (0: keep every tumor)")
    args = parser.parse_args(argv)
    try:
        run(args.ct, args.labels, args.models or bundled_models_dir(), args.device, args.min_tumor_confidence)
    except InputError as error:
        emit(error=str(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The segmentation process the Slicer panel runs (``tasks.SegmentationJob``), so that Slicer never
freezes and Cancel can end the work at once.

    python -m LiverTumorDARNSceneLib.worker CT LABELS [--models DIR] [--device auto|cpu|cuda]
                                            [--min-tumor-confidence P] [--name NAME]

Reads the CT file, writes the label map on the CT's grid to LABELS through the core's
``Segmenter``, and reports on stdout, one JSON object a line: ``{"stage": "liver", "fraction": 0.5}``
while working, ``{"message": ...}`` for what the user should know (a GPU out of memory and the
CPU fallback), ``{"error": ...}`` for a mistake in the input (exit status 2). ``NAME`` is what
messages call the CT (the volume's name in the scene). Only the core is imported: no Slicer, no Qt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import SimpleITK as sitk

from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import write_image
from LiverTumorDARNLib.segmenter import Segmenter


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def run(ct_path: Path, labels_path: Path, models_dir: Path | None, device: str,
        min_tumor_confidence: float | None = None, name: str | None = None) -> None:
    segmenter = Segmenter(models_dir, device, min_tumor_confidence, on_message=lambda text: emit(message=text))
    result = segmenter.segment(sitk.ReadImage(str(ct_path)), name=name or ct_path.name,
                               progress=lambda stage, fraction: emit(stage=stage, fraction=round(fraction, 3)))
    write_image(result.labels, labels_path)
    emit(stage="done", fraction=1.0, liver_found=result.liver_found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="LiverTumorDARNSceneLib.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("ct", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--models", type=Path, default=None, help="weights folder (default: the bundled weights)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--min-tumor-confidence", type=float, default=None,
                        help="replaces the weights' tumor confidence floor (0: keep every tumor)")
    parser.add_argument("--name", default=None, help="what messages call the CT (default: its file name)")
    args = parser.parse_args(argv)
    try:
        run(args.ct, args.labels, args.models, args.device, args.min_tumor_confidence, args.name)
    except InputError as error:
        emit(error=str(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

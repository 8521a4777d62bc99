"""The one way in to segmenting: a ``Segmenter`` holds both networks on a device and segments
images or files with them; ``segment_file`` is the same in one call.

    from LiverTumorDARNLib import Segmenter, segment_file

    segment_file("ct.nii.gz", "labels.nii.gz")          # bundled weights, the GPU when there is one
    segmenter = Segmenter(device="cpu")                   # load once, then segment many
    labels = segmenter.segment(image).labels              # a SimpleITK image on the input's grid

The command line, batches, the Slicer worker, the demo and the tools all segment through this
class, so the output checks, the weights' confidence floor and the fallback from a GPU that runs
out of memory to the CPU are the same behind every door. What the person running it should know
(that fallback) goes to ``on_message``, which each door shows its own way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Union

import SimpleITK as sitk
import torch

from .errors import InputError
from .io import check_ct, check_targets, read_ct
from .outputs import check_source_fits, output_format, write_segmentation
from .pipeline import Segmentation, load_stages, resolve_device, segment
from .report import CaseReport, measure, report_format, write_report
from .weights import bundled_models_dir

PathLike = Union[str, Path]
Progress = Callable[[str, float], None]

GPU_FALLBACK_MESSAGE = "The GPU ran out of memory; segmenting on the CPU instead (slower)."


def _no_progress(stage: str, fraction: float) -> None:
    """The default progress callback: nothing to show."""


class Segmenter:
    """Both DARN stages of a weights folder, loaded and checked once, on one device.

    ``models``: a weights folder (``manifest.json`` and its TorchScript files), default the bundled
    weights. ``device``: "auto" (the GPU when PyTorch sees one), "cpu", "cuda" or a torch.device.
    ``min_tumor_confidence``: replaces the floor calibrated for the weights (0 keeps every tumor).
    A CUDA out-of-memory error moves the segmenter to the CPU for good, once, with a message.
    """

    def __init__(self, models: PathLike | None = None, device: str | torch.device = "auto",
                 min_tumor_confidence: float | None = None,
                 on_message: Callable[[str], None] | None = None):
        self.models_dir = Path(models) if models is not None else bundled_models_dir()
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.min_tumor_confidence = min_tumor_confidence
        self.on_message = on_message or logging.getLogger(__name__).warning
        self.stages = load_stages(self.models_dir, self.device, min_tumor_confidence)

    def segment(self, image: sitk.Image, progress: Progress = _no_progress, name: str = "image",
                tumor_probability: bool = False) -> Segmentation:
        """Liver and tumors of a CT in Hounsfield units; the label map comes back on its grid.

        ``name`` is how messages about a CT that is refused call it. ``tumor_probability`` also
        returns the tumor stage's probability map (see ``pipeline.Segmentation``).
        """
        check_ct(image, name)
        return self._segment(image, progress, tumor_probability)

    def segment_file(self, source: PathLike, target: PathLike, fmt: str | None = None,
                     series_uid: str | None = None, overwrite: bool = False, report: PathLike | None = None,
                     progress: Progress = _no_progress) -> tuple[Segmentation, CaseReport]:
        """Segment the CT file or DICOM folder ``source`` into ``target`` (the format by its name
        unless ``fmt`` names one) and, with ``report``, write the per-tumor report (.csv or .json).

        Both outputs are checked before the long work starts; an existing one is replaced only with
        ``overwrite``. Returns the segmentation and its report.
        """
        source, target = Path(source), Path(target)
        report_path = Path(report) if report is not None else None
        fmt = output_format(target, fmt)
        check_source_fits(fmt, source, target, series_uid)
        if report_path is not None:
            report_format(report_path)  # a wrong suffix is refused now, not after the work
        check_targets([target] if report_path is None else [target, report_path], [source], overwrite)
        ct = read_ct(source, series_uid)
        result = self._segment(ct, progress)
        write_segmentation(result.labels, target, fmt, source, series_uid, overwrite)
        case_report = measure(ct, result.labels)
        if report_path is not None:
            write_report(case_report, report_path, overwrite)
        return result, case_report

    def _segment(self, image: sitk.Image, progress: Progress, tumor_probability: bool = False) -> Segmentation:
        try:
            return segment(image, *self.stages, self.device, progress, tumor_probability)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
        # Outside the except block: its traceback holds the frames, and so the GPU tensors, of the failed run.
        self._move_to_cpu()
        return segment(image, *self.stages, self.device, progress, tumor_probability)

    def _move_to_cpu(self) -> None:
        torch.cuda.empty_cache()
        self.on_message(GPU_FALLBACK_MESSAGE)
        self.device = torch.device("cpu")
        self.stages = load_stages(self.models_dir, self.device, self.min_tumor_confidence)


def segment_file(source: PathLike, target: PathLike, models: PathLike | None = None, device: str = "auto",
                 min_tumor_confidence: float | None = None, **options) -> tuple[Segmentation, CaseReport]:
    """Segment one CT file into ``target`` with a new :class:`Segmenter`; ``options`` are those of
    :meth:`Segmenter.segment_file` (fmt, series_uid, overwrite, report, progress)."""
    return Segmenter(models, device, min_tumor_confidence).segment_file(source, target, **options)

"""From input files to output files: one case, or thousands that survive bad cases and restarts.

One input and an output file name: segment it, write the segmentation (and a report if asked);
an existing output is refused unless overwriting is allowed.

Inputs and an output folder (a batch): every case runs in isolation, so a corrupt file is
recorded as failed and the others go on. Each case leaves a record, ``CASE_report.json``, written
as "running" before the work and rewritten with the outcome after it. The records are what make
a batch safe to re-run:

* a case whose record says done is skipped (resume after Ctrl-C, a crash or a reboot);
* a case whose record says running or failed is redone, and its old output replaced: it is ours;
* an output with no record is someone else's file and is never replaced without ``overwrite``.

``summary.csv`` is rebuilt from all records after every case, so it is complete whenever the run
stops. Under ``torchrun`` (RANK / WORLD_SIZE set) each rank takes every WORLD_SIZE-th case; the
shared folder of records merges their work. The ranks meet once, at the end: torchrun stops every
rank as soon as one exits with an error, so a rank whose share held a failed case must not leave
while the others are still segmenting.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io as text_io
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .io import (check_outputs_apart, check_targets, check_writable_folder, image_stem, is_image_path, read_ct,
                 read_image, write_json, write_text)
from .labels import check_label_values
from .outputs import FORMATS, check_source_fits, output_format, write_segmentation
from .segmenter import Segmenter

SUMMARY_NAME = "summary.csv"
RECORD_SUFFIX = "_report.json"
OUTPUT_MARK = "_segmentation"  # a case's output is CASE_segmentation.nii.gz (or the format's suffix)
DONE, NO_LIVER, FAILED, RUNNING = "done", "no liver found", "failed", "running"
FINISHED = (DONE, NO_LIVER)
SUMMARY_COLUMNS = ("case", "status", "seconds", "liver_ml", "tumors", "tumor_ml", "tumor_burden_percent",
                   "input", "series_uid", "output", "message")


@dataclasses.dataclass
class CaseRecord:
    """What happened to one case: the row of the summary and the body of CASE_report.json."""

    case: str
    input: str
    output: str
    status: str
    seconds: float = 0.0
    message: str = ""
    report: dict | None = None

    def summary_row(self) -> list:
        report = self.report or {}
        return [self.case, self.status, round(self.seconds, 1), report.get("liver_volume_ml", ""),
                len(report["tumors"]) if "tumors" in report else "", report.get("tumor_volume_ml", ""),
                report.get("tumor_burden_percent", ""), self.input, report.get("series_uid") or "", self.output,
                self.message]


@dataclasses.dataclass
class Job:
    """The fixed inputs of a run: weights, device, output format and options."""

    models_dir: Path
    device: torch.device
    fmt: str | None = None  # None: by the output name (single case) or NIfTI (batch)
    series_uid: str | None = None
    overwrite: bool = False
    progress: Callable[[str, float], None] = lambda stage, fraction: None
    min_tumor_confidence: float | None = None  # None: the floor calibrated for the weights
    on_message: Callable[[str], None] | None = None  # what the person running it should know (a GPU fallback)


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files and DICOM folders as given; a folder of volume files stands for its volumes, and a
    folder holding only folders (one DICOM series folder per case) for those folders. Hidden files
    and what a batch wrote into a folder (:func:`_written_by_a_batch`) are never inputs, so an
    output folder may be the input folder."""
    expanded = []
    for path in inputs:
        try:
            entries = _inputs_in(path) if path.is_dir() else []
            volumes = [p for p in entries if p.is_file() and is_image_path(p) and not p.name.lower().startswith("segmentation")]
            case_folders = [p for p in entries if p.is_dir()] if entries and all(p.is_dir() for p in entries) else []
        except OSError as error:
            raise InputError(f"{path}: cannot read it ({error.strerror or error})") from None
        expanded.extend(volumes or case_folders or [path])
    return expanded


def _inputs_in(folder: Path) -> list[Path]:
    """The entries of a folder that may be inputs: not hidden, not written by a batch."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not _written_by_a_batch(p))


def _written_by_a_batch(path: Path) -> bool:
    """The summary, a case's record, or a case's output beside its record."""
    if path.name == SUMMARY_NAME or path.name.endswith(RECORD_SUFFIX):
        return True
    for suffix in (*FORMATS.values(), ".nii"):
        if path.name.endswith(OUTPUT_MARK + suffix):
            return (path.parent / f"{path.name[: -len(OUTPUT_MARK + suffix)]}{RECORD_SUFFIX}").exists()
    return False


def is_single_case(inputs: list[Path], output: Path) -> bool:
    """An output that names a file rather than a folder: a known suffix, or any suffix after one
    input (``labels.png`` is a wrong file name, not a folder to fill)."""
    several = len(expand_inputs(inputs)) > 1
    names_file = any(output.name.lower().endswith(s) for s in (*FORMATS.values(), ".nii"))
    if names_file and several:
        raise InputError(f"{output}: several inputs need an output folder, not a file name")
    return names_file or (not several and bool(output.suffix) and not output.is_dir())


# --------------------------------------------------------------------------- one case


def refine_one(source: Path, mask: Path, target: Path, clicks: list[tuple[int, int, int]],
               negatives: list[tuple[int, int, int]], job: Job) -> list[str]:
    """Correct the label map ``mask`` of the CT ``source`` with clicks (voxel i, j, k) and write it
    to ``target``: positive clicks first, then negative ones, each given those before it; without
    clicks every tumor is refined. Returns what each step did."""
    from .refine import Refiner

    fmt = output_format(target, job.fmt)
    check_source_fits(fmt, source, target, job.series_uid)
    check_targets([target], [source, mask], job.overwrite)
    ct = read_ct(source, job.series_uid)
    labels = sitk.GetArrayFromImage(_matching_labels(read_image(mask), ct, mask))
    refiner = Refiner.load(job.models_dir, job.device)
    if not clicks and not negatives:
        changes = [refiner.refine_all(ct, labels)]
    else:
        changes, made = [], []
        for point, positive in [(c, True) for c in clicks] + [(c, False) for c in negatives]:
            changes.append(refiner.click(ct, labels, point, positive, made))
            labels = changes[-1].labels
            made.append((point, positive))
    refined = sitk.GetImageFromArray(changes[-1].labels)
    refined.CopyInformation(ct)
    write_segmentation(refined, target, fmt, source, job.series_uid, job.overwrite)
    return [change.message for change in changes]


def _matching_labels(labels: sitk.Image, ct: sitk.Image, path: Path) -> sitk.Image:
    """The label map, if it lies on the CT's grid and holds only 0, 1 and 2."""
    same_grid = (labels.GetSize() == ct.GetSize()
                 and np.allclose(labels.GetSpacing(), ct.GetSpacing(), rtol=1e-4)
                 and np.allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-3 * max(ct.GetSpacing()))
                 and np.allclose(labels.GetDirection(), ct.GetDirection(), atol=1e-4))
    if not same_grid:
        raise InputError(f"{path}: the mask is not on the CT's voxel grid (size, spacing, origin and direction must match)")
    check_label_values(sitk.GetArrayViewFromImage(labels), str(path))
    return sitk.Cast(labels, sitk.sitkUInt8)


# --------------------------------------------------------------------------- batches


def segment_batch(inputs: list[Path], out_dir: Path, job: Job,
                  on_case: Callable[[CaseRecord], None] = lambda record: None) -> list[CaseRecord]:
    """Segment every input into ``out_dir``; returns this run's records (this rank's cases)."""
    if job.series_uid is not None:
        raise InputError("a series UID picks a series of one DICOM folder; give one input and an output file",
                         option="series_uid")
    cases = _cases(expand_inputs(inputs), out_dir, job.fmt or "nifti")
    check_outputs_apart([target for _, _, target in cases], [source for _, source, _ in cases])
    for _, source, target in cases:
        check_source_fits(job.fmt or "nifti", source, target)
    _check_writable_folder(out_dir)
    if not job.overwrite:
        _refuse_foreign_outputs(cases, out_dir)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    segmenter = Segmenter(job.models_dir, job.device, job.min_tumor_confidence, job.on_message)
    records = []
    try:
        for name, source, target in cases[rank::world_size]:
            records.append(_run_case(name, source, target, out_dir, segmenter, job))
            write_summary(out_dir)
            on_case(records[-1])
        _wait_for_the_other_ranks(world_size)
    finally:  # also after Ctrl-C: the summary shows the case that was cut off as running
        write_summary(out_dir)
    return records


def _wait_for_the_other_ranks(world_size: int) -> None:
    """A barrier over gloo (CPU, no GPU needed) for ranks started by torchrun."""
    if world_size == 1 or "MASTER_ADDR" not in os.environ:  # RANK/WORLD_SIZE set by hand: nothing to meet
        return
    import torch.distributed as dist

    # the slowest rank may still have hours of cases ahead: the default 30 min timeout is too short
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _cases(inputs: list[Path], out_dir: Path, fmt: str) -> list[tuple[str, Path, Path]]:
    """(case name, input, output) for each input; two inputs may not share a case name."""
    names = [image_stem(path) or path.name for path in inputs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"several inputs are named {duplicates[0]}; their outputs would overwrite each other in {out_dir}")
    return [(name, path, out_dir / f"{name}{OUTPUT_MARK}{FORMATS[fmt]}") for name, path in zip(names, inputs)]


def _refuse_foreign_outputs(cases, out_dir: Path) -> None:
    """An output without a record of ours was made by someone else: never replace it unasked."""
    for name, _, target in cases:
        if target.exists() and read_record(out_dir / f"{name}{RECORD_SUFFIX}") is None:
            raise InputError(f"{target} exists and no earlier run of this tool wrote it; allow overwriting to replace it",
                             option="overwrite")


def _check_writable_folder(out_dir: Path) -> None:
    """Fail before the first case, not after each one, when the outputs cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; give a folder for the outputs of several inputs")
    check_writable_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _run_case(name: str, source: Path, target: Path, out_dir: Path, segmenter: Segmenter, job: Job) -> CaseRecord:
    record_path = out_dir / f"{name}{RECORD_SUFFIX}"
    earlier = read_record(record_path)
    if earlier is not None and earlier.status in FINISHED and target.exists() and not job.overwrite:
        return dataclasses.replace(earlier, message="done in an earlier run")
    record = _save(record_path, CaseRecord(name, str(source), str(target), RUNNING))
    started = time.perf_counter()
    try:
        # the target is ours to replace here: no record, no target, or a record of ours
        result, report = segmenter.segment_file(source, target, job.fmt or "nifti", overwrite=True, progress=job.progress)
        status, message = (DONE, "") if result.liver_found else (NO_LIVER, "no liver found; the label map is empty")
        record = dataclasses.replace(record, status=status, message=message, report=report.as_dict())
    except InputError as error:
        record = dataclasses.replace(record, status=FAILED, message=str(error))
    except Exception as error:  # one case's bug or resource failure must not stop the batch
        record = dataclasses.replace(record, status=FAILED, message=f"{type(error).__name__}: {error}".splitlines()[0])
    return _save(record_path, dataclasses.replace(record, seconds=time.perf_counter() - started))


def _save(path: Path, record: CaseRecord) -> CaseRecord:
    write_json(dataclasses.asdict(record), path, overwrite=True)
    return record


def read_record(path: Path) -> CaseRecord | None:
    """The record of an earlier run, or None when there is none (or it is unreadable)."""
    try:
        return CaseRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def write_summary(out_dir: Path) -> Path:
    """summary.csv of every case recorded in ``out_dir``, whichever run or rank recorded it."""
    text = text_io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for path in sorted(out_dir.glob(f"*{RECORD_SUFFIX}")):
        record = read_record(path)
        if record is not None:
            writer.writerow(record.summary_row())
    return write_text(text.getvalue(), out_dir / SUMMARY_NAME, overwrite=True)

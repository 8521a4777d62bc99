"""The ``livertumordarn`` command: argument parsing only; the work lives in the core modules.

A user mistake (``InputError``) or the file system's refusal (``OSError``: no permission, an I/O
error) becomes one line on stderr and exit status 2; Ctrl-C becomes exit status 130. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InputError

PROGRAM = "livertumordarn"


def _phantom(args: argparse.Namespace) -> int:
    from .phantom import write_dataset

    manifest = write_dataset(args.out_dir, args.n, args.seed, small=args.small,
                             randomize=args.randomize, overwrite=args.overwrite,
                             progress=lambda line: print(line, file=sys.stderr), anatomy=args.anatomy)
    print(f"wrote {args.n} case(s) and {manifest}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate_files, format_table

    summary = evaluate_files(args.gt, args.pred)
    print(json.dumps(summary, indent=2, allow_nan=False) if args.json else format_table(summary))
    return 0


def _picture(args: argparse.Namespace) -> int:
    from .io import check_outputs_apart, read_ct, read_image
    from .picture import axial_overlay, save_png

    check_outputs_apart([args.output], [args.volume, args.labels])
    if args.output.exists() and not args.overwrite:
        raise InputError(f"{args.output} exists; pass --overwrite to replace it")
    ct, labels = read_ct(args.volume), read_image(args.labels)
    if ct.GetSize() != labels.GetSize():
        raise InputError(f"{args.labels} has size {labels.GetSize()}, the CT {ct.GetSize()}: not the same grid")
    print(save_png(axial_overlay(ct, labels, args.slice), args.output))
    return 0


def _segment(args: argparse.Namespace) -> int:
    from .batch import FAILED, SUMMARY_NAME, Job, is_single_case, segment_batch
    from .pipeline import resolve_device
    from .report import format_report
    from .segmenter import Segmenter

    if is_single_case(args.inputs, args.output):
        segmenter = Segmenter(args.models, args.device, args.min_tumor_confidence, on_message=_say)
        result, report = segmenter.segment_file(args.inputs[0], args.output, args.format, args.series_uid,
                                                args.overwrite, args.report, _stage_progress())
        if report.series_uid:
            print(f"DICOM series {report.series_uid}")
        print(format_report(report) if result.liver_found else f"{args.inputs[0]}: no liver found; the label map is empty")
        print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
        return 0
    if args.report is not None:
        raise InputError("--report names one case's report; a batch writes CASE_report.json and summary.csv into the output folder")
    job = Job(args.models, resolve_device(args.device), args.format, args.series_uid, args.overwrite,
              _stage_progress(), args.min_tumor_confidence, _say)

    def show(record) -> None:
        print(f"[{record.status}] {record.case}: {record.message or record.output}")

    records = segment_batch(args.inputs, args.output, job, on_case=show)
    failed = [record for record in records if record.status == FAILED]
    print(f"{len(records) - len(failed)} of {len(records)} cases segmented; summary in {args.output / SUMMARY_NAME}")
    if failed:
        print(f"{PROGRAM}: error: {len(failed)} case(s) failed, first {failed[0].case}: {failed[0].message}", file=sys.stderr)
        return 1
    return 0


def _refine(args: argparse.Namespace) -> int:
    from .batch import Job, refine_one
    from .pipeline import resolve_device

    job = Job(args.models, resolve_device(args.device), args.format, args.series_uid, args.overwrite)
    for message in refine_one(args.input, args.mask, args.output, args.click, args.negative, job):
        print(message)
    print(f"wrote {args.output}")
    return 0


def _say(message: str) -> None:
    """What the core tells the person running the command (a GPU fallback), on stderr."""
    print(f"{PROGRAM}: {message}", file=sys.stderr)


def _voxel(text: str) -> tuple[int, int, int]:
    try:
        point = tuple(int(part) for part in text.split(","))
    except ValueError:
        point = ()
    if len(point) != 3 or min(point) < 0:
        raise argparse.ArgumentTypeError(f"expected a voxel index I,J,K (three integers from 0), got {text!r}")
    return point


def _stage_progress():
    """A progress bar per named stage on stderr (the report goes to stdout)."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, fraction: float) -> None:
        if stage == "done":
            for bar in bars.values():
                bar.close()
            bars.clear()
            return
        bar = bars.setdefault(stage, tqdm(total=100, desc=f"{stage:>5} stage", unit="%", leave=False))
        bar.n = round(100 * fraction)
        bar.refresh()

    return update


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .pipeline import resolve_device
    from .report import format_report

    report, scores = run_demo(args.out, resolve_device(args.device), args.models, overwrite=args.overwrite)
    print(format_report(report))
    print(f"Against the known truth: liver Dice {scores['liver_dice']:.3f}, tumor Dice "
          f"{scores['tumor_dice']:.3f}; {scores['detected_true_tumors']} of {scores['truth_tumors']} "
          f"true tumors detected, {scores['found_tumors']} found in all")
    print(f"Wrote the CT, the truth, the segmentation and {scores['picture']} "
          f"(left: truth, right: segmentation) to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.loop import run

    return run(args)


def _export(args: argparse.Namespace) -> int:
    from .weights import export_checkpoint

    target = export_checkpoint(args.checkpoint, args.out, note=args.note, overwrite=args.overwrite)
    print(f"wrote {target} and its entry in {args.out / 'manifest.json'}; use it with --models {args.out}")
    return 0


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability from 0 up to (not including) 1, got {text!r}")
    return value


def build_parser(train_stage: str = "liver") -> argparse.ArgumentParser:
    """The command's parser; ``train`` gets the options and defaults of ``train_stage``, because
    the stages differ in both (``train --stage refine --help`` shows the refinement network's)."""
    from .training.options import STAGE_NAMES, add_arguments as add_train_arguments

    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Liver and liver-tumor segmentation of contrast-enhanced CT.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    phantom = commands.add_parser(
        "phantom", help="write synthetic CT cases with known labels (LiTS layout)",
        description="Write N synthetic contrast-enhanced CT cases as volume-K.nii.gz / "
                    "segmentation-K.nii.gz (0 background, 1 liver, 2 tumor) and manifest.json. "
                    "Case K is drawn with seed S+K.")
    phantom.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    phantom.add_argument("--n", type=int, default=1, help="number of cases (default 1)")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    phantom.add_argument("--small", action="store_true", help="96x96 cases at ~4 mm, for tests")
    phantom.add_argument("--anatomy", type=Path, metavar="MAPS",
                         help="draw the CT on real label maps instead (a map, or a folder such as ../shared/anatomy; "
                              "case K on map K in turn)")
    phantom.add_argument("--randomize", action="store_true",
                         help="domain-randomised intensities, bias field, blur and noise (training)")
    phantom.add_argument("--overwrite", action="store_true", help="replace existing files")
    phantom.set_defaults(run=_phantom)

    evaluate = commands.add_parser(
        "evaluate", help="LiTS metrics of predicted label maps against the truth",
        description="Compare label maps (files, or folders matched by case number) with the "
                    "LiTS measures: Dice per case and global, VOE, RVD, ASSD, MSSD, liver Dice, "
                    "lesion detection, tumor burden.")
    evaluate.add_argument("--gt", type=Path, required=True, help="ground-truth file or folder")
    evaluate.add_argument("--pred", type=Path, required=True, help="prediction file or folder")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=_evaluate)

    picture = commands.add_parser(
        "picture", help="PNG of an axial CT slice with liver and tumor outlines",
        description="Draw one axial slice (by default the one with the most tumor) of a CT with "
                    "the outlines of a label map, for a quick visual check.")
    picture.add_argument("volume", type=Path, metavar="CT")
    picture.add_argument("labels", type=Path, metavar="LABELS")
    picture.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    picture.add_argument("--slice", type=int, default=None, help="axial slice index (canonical, feet to head)")
    picture.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    picture.set_defaults(run=_picture)

    from .weights import bundled_models_dir  # no torch import: cheap

    from .outputs import FORMATS

    segment = commands.add_parser(
        "segment", help="segment the liver and liver tumors of CT scans",
        description="Segment CT files or DICOM series folders with the bundled DARN weights. One "
                    "input to one output file on the input's grid (the format by its name: .nii.gz, "
                    ".nrrd, .mha label map with 0 background, 1 liver, 2 tumor; .seg.nrrd for 3D "
                    "Slicer; .dcm DICOM SEG from a DICOM input), printing the per-tumor report. "
                    "Several inputs or a folder of volumes go to an output folder as a batch: one "
                    "bad case does not stop the others, a re-run skips finished cases, and "
                    "summary.csv lists every case. Under torchrun the ranks share the cases.")
    segment.add_argument("inputs", type=Path, nargs="+", metavar="INPUT")
    segment.add_argument("-o", "--output", type=Path, required=True, help="output file or folder")
    segment.add_argument("--format", choices=tuple(FORMATS), help="output format (default: by the output "
                         "file name; nifti for a batch)")
    segment.add_argument("--series-uid", help="the DICOM series to read when a folder holds several "
                         "(default: the axial CT series with the most slices; two with as many are refused)")
    segment.add_argument("--report", type=Path, metavar="FILE", help="also write the per-tumor report "
                         "(.csv one row per tumor, .json everything)")
    segment.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    segment.add_argument("--models", type=Path, default=bundled_models_dir(),
                         help="weights folder with manifest.json (default: the bundled weights)")
    segment.add_argument("--min-tumor-confidence", type=_probability, metavar="P",
                         help="give each tumor whose mean tumor probability is under P back to the liver "
                              "(default: the floor chosen for the weights, in their manifest; 0 keeps every tumor)")
    segment.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    segment.set_defaults(run=_segment)

    refine = commands.add_parser(
        "refine", help="correct tumor boundaries of a label map with the refinement network",
        description="Refine the tumors of a label map (0 background, 1 liver, 2 tumor, on the CT's "
                    "grid) with the boundary-refinement network. --click I,J,K (voxel index) refines "
                    "the tumor under the click, or marks missed tumor there: the lesion is added, or the "
                    "tumor beside it grown; --negative I,J,K removes the false part of the tumor under "
                    "the click. Positive clicks run first, then negative ones, each given the clicks "
                    "before it; a click that can change nothing says why. Without clicks every tumor is "
                    "refined.")
    refine.add_argument("input", type=Path, metavar="INPUT", help="the CT (file or DICOM folder)")
    refine.add_argument("--mask", type=Path, required=True, metavar="COARSE", help="label map to correct")
    refine.add_argument("--click", type=_voxel, action="append", default=[], metavar="I,J,K")
    refine.add_argument("--negative", type=_voxel, action="append", default=[], metavar="I,J,K")
    refine.add_argument("-o", "--output", type=Path, required=True, help="corrected label map")
    refine.add_argument("--format", choices=tuple(FORMATS), help="output format (default: by the file name)")
    refine.add_argument("--series-uid", help="the DICOM series to read when a folder holds several")
    refine.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    refine.add_argument("--models", type=Path, default=bundled_models_dir(), help="weights folder")
    refine.add_argument("--overwrite", action="store_true", help="replace an existing output")
    refine.set_defaults(run=_refine)

    demo = commands.add_parser(
        "demo", help="segment the sample phantom and compare with its known truth",
        description="Draw the sample phantom, segment it, print the report and its Dice against the "
                    "truth, and write the CT, truth, segmentation and a PNG to a folder.")
    demo.add_argument("--out", type=Path, default=Path("livertumordarn-demo"), help="output folder")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.add_argument("--models", type=Path, default=bundled_models_dir(), help="weights folder")
    demo.add_argument("--overwrite", action="store_true", help="replace earlier demo output")
    demo.set_defaults(run=_demo)

    train = commands.add_parser(
        "train", help="train a DARN stage or the refinement network on phantoms or a LiTS-layout folder",
        description=f"Train one stage on phantoms drawn on the fly, CT drawn on real label maps or "
                    f"volume-K / segmentation-K pairs (the LiTS layout). Runs under torchrun "
                    f"for several GPUs. The options and defaults shown are the {train_stage} stage's; "
                    f"'train --stage STAGE --help' shows those of another stage ({', '.join(STAGE_NAMES)}).")
    add_train_arguments(train, train_stage)
    train.set_defaults(run=_train)

    export = commands.add_parser(
        "export", help="turn a training checkpoint into weights that segment can load",
        description="Write a checkpoint of `train` (last.pt or best.pt) as TorchScript darn-STAGE.pt "
                    "into a weights folder and record it in the folder's manifest.json: SHA-256, "
                    "architecture, training record and validation Dice. Then: segment --models DIR.")
    export.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="weights folder (created if missing)")
    export.add_argument("--note", default="", help="added to the training record, e.g. the machine and wall time")
    export.add_argument("--overwrite", action="store_true", help="replace this stage's weights in DIR")
    export.set_defaults(run=_export)
    return parser


def _flag_hint(error: InputError) -> str:
    """The flag that sets what the error names as its ``option`` (the core's messages name none)."""
    return f" (--{error.option.replace('_', '-')})" if error.option else ""


def _train_stage(argv: list[str]) -> str:
    """The stage a ``train`` command line asks for (liver unless it names another), read before
    the real parser is built with that stage's options."""
    from .training.options import STAGE_NAMES

    if not argv or argv[0] != "train":
        return "liver"
    stage = argparse.ArgumentParser(add_help=False)
    stage.add_argument("--stage", default="liver")
    given = stage.parse_known_args(argv[1:])[0].stage
    return given if given in STAGE_NAMES else "liver"  # the real parser names the choices


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_train_stage(argv)).parse_args(argv)
    try:
        return args.run(args)
    except InputError as error:
        print(f"{PROGRAM}: error: {error}{_flag_hint(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # met where no check turned it into an InputError first
        where = f"{error.filename}: " if error.filename else ""
        print(f"{PROGRAM}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted; finished files are complete, nothing half-written is left",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

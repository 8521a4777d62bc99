"""The ``livertumordarn`` command: argument parsing only; the work lives in the core modules.

A user mistake (``InputError``) becomes one line on stderr and exit status 2; Ctrl-C becomes
exit status 130. Anything else is a bug and keeps its traceback.
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
                             progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {args.n} case(s) and {manifest}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate_files, format_table

    summary = evaluate_files(args.gt, args.pred)
    print(json.dumps(summary, indent=2, allow_nan=False) if args.json else format_table(summary))
    return 0


def _picture(args: argparse.Namespace) -> int:
    from .io import read_ct, read_image
    from .picture import axial_overlay, save_png

    if args.output.exists() and not args.overwrite:
        raise InputError(f"{args.output} exists; pass --overwrite to replace it")
    ct, labels = read_ct(args.volume), read_image(args.labels)
    if ct.GetSize() != labels.GetSize():
        raise InputError(f"{args.labels} has size {labels.GetSize()}, the CT {ct.GetSize()}: not the same grid")
    print(save_png(axial_overlay(ct, labels, args.slice), args.output))
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted; finished files are complete, nothing half-written is left",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

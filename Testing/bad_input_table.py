"""Write docs/bad-inputs.md: every case of bad_inputs.py (next to this script) run through the
command line with the bundled weights, with its exit status, the line it ends with, and the files
it changed or left (test_bad_inputs.py checks the same cases with small test weights).

    .venv/bin/python Testing/bad_input_table.py
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk
import torch

from bad_inputs import BAD_INPUTS, Outcome, run  # this script's own folder
from LiverTumorDARNLib.io import write_text
from LiverTumorDARNLib.weights import bundled_models_dir

REPO = Path(__file__).resolve().parents[1]

TARGET = REPO / "docs" / "bad-inputs.md"


def main() -> None:
    rows = []
    for bad in BAD_INPUTS:
        with tempfile.TemporaryDirectory() as folder:
            outcome = run(bad, Path(folder), bundled_models_dir())
            rows.append(f"| {bad.name} | {outcome.exit_status} | {_cell(outcome.message, folder)} | {_files(outcome)} |")
            print(rows[-1], flush=True)
    write_text("\n".join([*_header(), *rows]) + "\n", TARGET, overwrite=True)
    print(f"wrote {TARGET.relative_to(REPO)}")


def _header() -> list[str]:
    command = shlex.join([os.path.relpath(sys.executable, REPO), os.path.relpath(__file__, REPO)])
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python "
               f"{platform.python_version()}, torch {torch.__version__}, SimpleITK {sitk.Version.VersionString()}")
    return [
        "# Bad inputs and adversarial cases",
        "",
        f"Generated on {datetime.date.today().isoformat()} by `{command}` on {machine}, with the bundled",
        "weights. Do not edit by hand: change `Testing/bad_inputs.py` and run the command again.",
        "",
        "Each row is one case of `Testing/bad_inputs.py`, made in an empty folder and run through the",
        "`livertumordarn` command in-process; `Testing/test_bad_inputs.py` checks every case the same",
        "way. *Exit* is the exit status (2: bad input, 130: interrupted, 0: handled); *message* is the",
        "last line the command printed (on stderr when it failed), with the case's folder left out of",
        "paths; *files changed or left* lists the files there before that the command changed, and the",
        "new files it left behind.",
        "",
        "| case | exit | message | files changed or left |",
        "| --- | --- | --- | --- |",
    ]


def _cell(message: str, folder: str) -> str:
    return message.replace(folder + "/", "").replace(folder, ".").replace("|", "\\|")


def _files(outcome: Outcome) -> str:
    changed = [f"changed {name}" for name in outcome.changed] + [f"left {name}" for name in outcome.created]
    return ", ".join(changed) or "none"


if __name__ == "__main__":
    main()

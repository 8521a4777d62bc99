"""Print the README's table of bad inputs: each case of Testing/bad_inputs.py run through
`livertumordarn segment` with the bundled weights, its exit status and its one-line message.

    .venv/bin/python tools/bad_input_table.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

from bad_inputs import BAD_INPUTS, run  # noqa: E402
from LiverTumorDARNLib.weights import bundled_models_dir  # noqa: E402


def main() -> None:
    print("| input | exit | message (paths shortened) |\n| --- | --- | --- |")
    for bad in BAD_INPUTS:
        with tempfile.TemporaryDirectory() as folder:
            outcome = run(bad, Path(folder), bundled_models_dir())
            message = outcome.message.replace(folder + "/", "").replace(folder, ".").replace("|", "\\|")
        print(f"| {bad.name} | {outcome.exit_status} | {message} |")


if __name__ == "__main__":
    main()

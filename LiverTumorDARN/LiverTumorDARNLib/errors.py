"""The one exception type that means "the user's input is wrong", not "the program is wrong".

The command line prints its message as a single line and exits non-zero; the Slicer module
shows it in a message box. Anything else that escapes is a bug and keeps its traceback.

Messages never name a command-line flag: Slicer users read them too, and they have buttons, not
flags. An error that a setting would resolve names that setting in ``option`` ("overwrite",
"series_uid", "format", "device"), and each door says it its own way (the command line appends
its flag).
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (missing file, wrong dimensionality, non-CT intensities, output exists, ...)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option

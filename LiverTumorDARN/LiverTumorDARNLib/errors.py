"""The one exception type that means "the user's input is wrong", not "the program is wrong".

The command line prints its message as a single line and exits non-zero; the Slicer module
shows it in a message box. Anything else that escapes is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input (missing file, wrong dimensionality, non-CT intensities, output exists, ...)."""

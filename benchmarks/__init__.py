"""The benchmarks behind the figures of docs/ (not part of the installed package), run from the
repository's root: ``.venv/bin/python -m benchmarks.NAME``."""

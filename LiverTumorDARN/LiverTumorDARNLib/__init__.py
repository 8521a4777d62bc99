"""LiverTumorDARN core: plain Python, no Qt and no slicer import, shared by the Slicer module and the command line.

The public API, one entry point per job::

    from LiverTumorDARNLib import Segmenter, segment_file, Refiner

They are imported on first use (PEP 562), so that importing a light module of the package (the
Slicer module reads ``weights`` at start-up) does not load PyTorch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Refiner", "Segmenter", "segment_file"]

_PUBLIC = {"Segmenter": "segmenter", "segment_file": "segmenter", "Refiner": "refine"}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)

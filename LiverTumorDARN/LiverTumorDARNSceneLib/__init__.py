"""The Slicer side of LiverTumorDARN that is not GUI: scene work on MRML nodes (``scene``) and the
segmentation subprocess the panel runs (``worker``).

It lives in a package, not next to LiverTumorDARN.py, because Slicer loads every Python file in a
module folder as a module. ``scene`` imports ``slicer`` but never ``slicer.app`` or
``slicer.mrmlScene``, so the PyPI package ``slicer-core`` runs it in CI with Slicer's real MRML
classes; ``worker`` imports only the core (LiverTumorDARNLib).
"""

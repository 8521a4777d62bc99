"""The Slicer side of LiverTumorDARN that is not GUI: scene work on MRML nodes (``scene``), the
panel's work (``tasks``: the segmentation job, the click session, the module's tasks), the
segmentation subprocess (``worker``) and what first use installs (``dependencies``).

It lives in a package, not next to LiverTumorDARN.py, because Slicer loads every Python file in a
module folder as a module. Nothing here imports Qt or ``slicer.app``: ``scene`` and ``tasks`` take
the scene and nodes they work on, so the PyPI package ``slicer-core`` runs them in CI with Slicer's
real MRML classes; ``worker`` imports only the core (LiverTumorDARNLib).
"""

"""LiverTumorDARN core: plain Python, no Qt and no slicer import, shared by the Slicer module and the command line."""

__version__ = "0.1.0"

"""Defaults shared by the engine, its command line and the Slicer module: one place each.

Plain constants (no torch), so the Slicer module can read them before its
dependencies are installed.
"""

DEVICES = ("auto", "cpu", "cuda")  # "auto": CUDA when present
BATCH_SIZE = 8  # slices per step of a segmentation run
TARGET_NAME = "target"  # segment name when a bundle names none
TARGET_COLOR = (230, 80, 60)  # segment colour (R, G, B) when a bundle gives none

"""Defaults shared by the engine, its command line and the Slicer module: one place each.

Plain constants (no torch), so the Slicer module can read them before its
dependencies are installed.
"""

DEVICES = ("auto", "cpu", "cuda")  # "auto": CUDA when present
SEGMENTER_CHOICES = ("bundle", "cldf", "student")  # "bundle": the one its validation patients chose
DEVICE = "auto"  # the device every command and the Slicer module start with
BATCH_SIZE = 8  # slices per step of a segmentation run
TARGET_NAME = "target"  # segment name when a bundle names none
TARGET_COLOR = (230, 80, 60)  # segment colour (R, G, B) when a bundle gives none
OVERLAY_OPACITY = 0.6  # the CAM / mean-gradient overlay in the Slicer module and the pictures
CLUSTER_RULES = ("nearest", "closer_than_background")  # the foreground rules of `cldf.cluster`
ABDOMEN_CT_WINDOW = (-125.0, 275.0)  # HU mapped to 0..255 in the shipped abdominal bundles' training scans

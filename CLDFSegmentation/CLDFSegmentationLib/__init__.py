"""Qt-free logic of the CLDFSegmentation module: MRML nodes <-> the `cldf` engine, overlays, export.

Imports `slicer` (MRML) but never `qt` or `ctk`, and `cldf` (hence torch) only
when a run starts, so the module loads before its dependencies are installed.
"""

from .bundles import BundleInfo, readBundleInfo, shippedBundles
from .controller import CLDFSegmentationController, PanelState
from .job import CLDFSegmentationJob, CLDFSegmentationResult
from .logic import CLDFSegmentationLogic
from .parameters import CLDFSegmentationParameters

__all__ = [
    "BundleInfo",
    "CLDFSegmentationController",
    "CLDFSegmentationJob",
    "CLDFSegmentationLogic",
    "CLDFSegmentationParameters",
    "CLDFSegmentationResult",
    "PanelState",
    "readBundleInfo",
    "shippedBundles",
]

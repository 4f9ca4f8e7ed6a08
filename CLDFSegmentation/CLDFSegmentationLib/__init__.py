"""Qt-free logic of the CLDFSegmentation module: MRML nodes <-> the `cldf` engine, overlays, export.

Imports `slicer` (MRML) but never `qt` or `ctk` (only `widget`, the module's
panel, does; it is not imported here), and `cldf` (hence torch) only when a run
loads, so the module loads before its dependencies are installed.
"""

from .bundles import bundleCard, shippedBundles
from .controller import CLDFSegmentationController, PanelState
from .job import CLDFSegmentationJob
from .logic import CLDFSegmentationLogic
from .parameters import CLDFSegmentationParameterNode, moduleParameterNode
from .runoutputs import CLDFSegmentationResult

__all__ = [
    "CLDFSegmentationController",
    "CLDFSegmentationJob",
    "CLDFSegmentationLogic",
    "CLDFSegmentationParameterNode",
    "CLDFSegmentationResult",
    "PanelState",
    "bundleCard",
    "moduleParameterNode",
    "shippedBundles",
]

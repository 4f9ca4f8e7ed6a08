"""Overlays in the slice views: maps as a heat-coloured foreground, low values transparent."""

from __future__ import annotations

import slicer

#: Slicer's built-in heat colour table (black -> red -> yellow -> white).
HEAT_COLOR_NODE = "PET-Heat"
#: Map values below this are transparent, so the anatomy shows through.
DEFAULT_LOWER_THRESHOLD = 0.2


def styleMap(volumeNode, lowerThreshold: float = DEFAULT_LOWER_THRESHOLD) -> None:
    """Heat colours on a fixed [0, 1] window; values below ``lowerThreshold`` are transparent."""
    if not 0.0 <= lowerThreshold < 1.0:
        raise ValueError(f"lowerThreshold must be in [0, 1), not {lowerThreshold}")
    display = volumeNode.GetDisplayNode()
    if display is None:  # made here with its window off: a default one would first compute a window from the voxels
        display = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        display.AutoWindowLevelOff()
        display.SetDefaultColorMap()
        volumeNode.SetAndObserveDisplayNodeID(display.GetID())
    with slicer.util.NodeModify(display):
        heat = slicer.mrmlScene.GetFirstNodeByName(HEAT_COLOR_NODE)
        if heat is not None:
            display.SetAndObserveColorNodeID(heat.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(True)
        display.SetLowerThreshold(lowerThreshold)
        display.SetUpperThreshold(1.0)
        display.SetInterpolate(True)


def sliceCompositeNodes() -> list:
    scene = slicer.mrmlScene
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def showMap(mapNode, backgroundNode=None, opacity: float | None = None) -> None:
    """Show ``mapNode`` (or nothing, with None) as the foreground of every slice view."""
    checkOpacity(opacity)
    for composite in sliceCompositeNodes():
        with slicer.util.NodeModify(composite):
            if backgroundNode is not None:
                composite.SetBackgroundVolumeID(backgroundNode.GetID())
            composite.SetForegroundVolumeID(mapNode.GetID() if mapNode is not None else None)
            if opacity is not None:
                composite.SetForegroundOpacity(opacity)


def showSeeds(seedsNode=None, opacity: float = 0.8) -> None:
    """Show a seeds label map (1 foreground, 2 background) in the label layer of every slice view, or none."""
    checkOpacity(opacity)
    for composite in sliceCompositeNodes():
        with slicer.util.NodeModify(composite):
            composite.SetLabelVolumeID(seedsNode.GetID() if seedsNode is not None else None)
            composite.SetLabelOpacity(opacity)


def setOverlayOpacity(opacity: float) -> None:
    """Foreground (map) opacity of every slice view, 0 (hidden) .. 1 (opaque)."""
    checkOpacity(opacity)
    for composite in sliceCompositeNodes():
        composite.SetForegroundOpacity(opacity)


def checkOpacity(opacity: float | None) -> None:
    if opacity is not None and not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], not {opacity}")

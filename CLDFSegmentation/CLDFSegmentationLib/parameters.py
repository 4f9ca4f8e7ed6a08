"""The module's state: a typed parameter node (``@parameterNodeWrapper``), saved with the scene, gone with it.

Inputs, bundle, device, display and decision choices, the Train section's fields
and the output nodes of the last run with the input they were made on. Inside
Slicer the wrapper is Slicer's own, and the Widget binds the panel's widgets to
these fields (``connectGui``); on the slicer-core wheel (tests, scripts) the
stand-in of `typedparameters` gives the same typed fields on the same node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLPlotChartNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

from cldf.config.sections import ClusterConfig  # plain dataclasses and constants: no torch
from cldf.defaults import CLUSTER_RULES, DEVICE, DEVICES, OVERLAY_OPACITY, SEGMENTER_CHOICES

try:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:  # the slicer-core wheel: MRML without Slicer's wrapper
    from .typedparameters import Choice, WithinRange, parameterNodeWrapper

MODULE_NAME = "CLDFSegmentation"
MAX_CHANNELS = 4
MAPS = ("cam", "meanGradient", "none")
_CLUSTER = ClusterConfig()  # the engine's defaults, shown until a run gives the bundle's
#: the last run's output fields and the result attribute each holds
OUTPUTS = {"outputCAM": "camVolume", "outputMeanGradient": "meanGradientVolume",
           "outputSegmentation": "segmentation", "outputSeeds": "seedsVolume", "outputTable": "table",
           "outputChart": "chart"}


@parameterNodeWrapper
class CLDFSegmentationParameterNode:
    """Everything the panel shows; the decision fields are the bundle's once a run finishes."""

    inputVolume0: vtkMRMLScalarVolumeNode  # one volume per channel of the bundle, in its order
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    bundlePath: str
    device: Annotated[str, Choice(DEVICES)] = DEVICE
    segmenter: Annotated[str, Choice(SEGMENTER_CHOICES)] = "bundle"
    overlays: bool = True  # the student also computes the CAM and mean-gradient maps

    shownMap: Annotated[str, Choice(MAPS)] = "cam"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = OVERLAY_OPACITY
    showMask: bool = True
    showSeeds: bool = False

    presenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = _CLUSTER.presence_threshold  # the gate, re-decided
    clusterK: Annotated[int, WithinRange(2, 16)] = _CLUSTER.k
    clusterRule: Annotated[str, Choice(CLUSTER_RULES)] = _CLUSTER.rule

    trainManifest: Path  # the Train section: `cldf train --data`
    trainOutput: Path  # --out
    trainChannels: str  # e.g. "FLAIR, T1"
    trainTarget: str  # mask label values, e.g. "1"
    trainName: str
    trainTargetName: str
    trainExtra: str  # more arguments, e.g. "--set diffusion.steps=8000"

    outputCAM: vtkMRMLScalarVolumeNode  # the last run's outputs (`setOutputs`)
    outputMeanGradient: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputSeeds: vtkMRMLLabelMapVolumeNode
    outputTable: vtkMRMLTableNode
    outputChart: vtkMRMLPlotChartNode
    outputSegmentId: str
    runInput: vtkMRMLScalarVolumeNode

    def inputVolume(self, index: int):
        return self.getValue(_inputField(index))

    def setInputVolume(self, index: int, volume) -> None:
        self.setValue(_inputField(index), volume)

    def inputVolumes(self, channels: tuple[str, ...]) -> dict | None:
        """``{channel: node}`` in the bundle's order, or None while a channel has no volume."""
        nodes = {c: self.inputVolume(i) for i, c in enumerate(channels[:MAX_CHANNELS])}
        return nodes if nodes and all(n is not None for n in nodes.values()) else None

    def setOutputs(self, result, runInput) -> None:
        """Remember a finished run's output nodes and the input they lie on (None: forget them)."""
        wasModifying = self.StartModify()
        try:
            for field, attribute in OUTPUTS.items():
                self.setValue(field, getattr(result, attribute) if result is not None else None)
            self.outputSegmentId = result.segmentId if result is not None else ""
            self.runInput = runInput
        finally:
            self.EndModify(wasModifying)

    def outputs(self) -> dict | None:
        """The last run's nodes by result attribute (``camVolume``, ..., ``runInput``) and its ``segmentId``, or
        None when there is none or one of them has left the scene."""
        found = {attribute: self.getValue(field) for field, attribute in OUTPUTS.items()} | {"runInput": self.runInput}
        scene = self.parameterNode.GetScene()
        if scene is None or any(n is None or scene.GetNodeByID(n.GetID()) is not n for n in found.values()):
            return None
        return found | {"segmentId": self.outputSegmentId}


def moduleParameterNode(scene=None) -> CLDFSegmentationParameterNode:
    """The module's parameter node in ``scene`` (default: ``slicer.mrmlScene``), made when there is none: the
    singleton node Slicer's ``ScriptedLoadableModuleLogic.getParameterNode`` finds."""
    scene = scene if scene is not None else slicer.mrmlScene
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(MODULE_NAME)
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node.SetAttribute("ModuleName", MODULE_NAME)
        node = scene.AddNode(node)
    elif node.GetAttribute("ModuleName") != MODULE_NAME:  # a closed scene drops the attribute
        node.SetAttribute("ModuleName", MODULE_NAME)
    return CLDFSegmentationParameterNode(node)


def _inputField(index: int) -> str:
    if not 0 <= index < MAX_CHANNELS:
        raise ValueError(f"input index must be in 0..{MAX_CHANNELS - 1}, not {index}")
    return f"inputVolume{index}"

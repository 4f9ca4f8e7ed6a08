"""CLDF Segmentation: weakly supervised segmentation (contrastive learning on diffusion features) in 3D Slicer.

A thin shell: module metadata, the parameter node, the Widget that runs a job
on a worker thread and moves its finished slices into the scene from a QTimer,
and the self-test. The work is in
`CLDFSegmentationLib` (MRML, no Qt) and the bundled `cldf` engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CLDFSegmentationLib import CLDFSegmentationLogic, readBundleInfo, shippedBundles
from CLDFSegmentationLib import dependencies

MAX_CHANNELS = 4
LOAD_FROM_FOLDER = "Load bundle from folder..."


#
# CLDFSegmentation
#
class CLDFSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CLDF Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CLDFSegmentation developers"]
        self.parent.helpText = """
Weakly supervised segmentation with CLDF: a model trained from slice-level labels only
("target present / absent in this slice") segments a volume. Pick a model bundle and one volume per
channel it lists, then press <b>Segment</b>: the class activation map (CAM), the mean-gradient map and
the mask appear slice by slice. Train your own bundle with <code>cldf train</code> (see the README).
"""
        self.parent.acknowledgementText = """
CLDF: Zeng et al., "Contrastive Learning with Diffusion Features for Weakly Supervised Medical Image
Segmentation", 2025. Mean-gradient maps: Wolleb et al., "Diffusion Models for Medical Anomaly Detection",
MICCAI 2022. LayerCAM: Jiang et al., IEEE TIP 2021. Supervised contrastive loss: Khosla et al., NeurIPS 2020.
Networks from MONAI.
"""


#
# Parameter node
#
@parameterNodeWrapper
class CLDFSegmentationParameterNode:
    """Inputs (one volume per bundle channel, in the bundle's order), bundle, device and display settings."""

    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    bundlePath: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    showMask: bool = True


#
# CLDFSegmentationWidget
#
class CLDFSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._result = None
        self._timer = qt.QTimer()
        self._timer.setInterval(50)  # torch works on a worker thread; each tick only copies finished slices
        self._timer.timeout.connect(self.onStep)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CLDFSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CLDFSegmentationModuleLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self._fillBundles()
        self.ui.bundleComboBox.currentIndexChanged.connect(self.onBundleChanged)
        self.ui.segmentButton.clicked.connect(self.onSegmentOrCancel)
        self.ui.exportButton.clicked.connect(self.onExport)
        for button in (self.ui.camRadioButton, self.ui.meanGradientRadioButton, self.ui.noMapRadioButton):
            button.toggled.connect(self.onDisplayChanged)
        self.ui.opacitySliderWidget.valueChanged.connect(self.onDisplayChanged)
        self.ui.showMaskCheckBox.toggled.connect(self.onDisplayChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(CLDFSegmentationParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.bundlePath and self.ui.bundleComboBox.count > 1:
            self._parameterNode.bundlePath = self.ui.bundleComboBox.itemData(0)
        self._selectBundleInCombo(self._parameterNode.bundlePath)
        self._showChannels()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    # ------------------------------------------------------------------ bundles
    def _fillBundles(self) -> None:
        combo = self.ui.bundleComboBox
        combo.clear()
        for info in shippedBundles():
            combo.addItem(f"{info.name} ({', '.join(info.channels)})", str(info.path))
        combo.addItem(LOAD_FROM_FOLDER, "")

    def _selectBundleInCombo(self, path: str) -> None:
        combo = self.ui.bundleComboBox
        index = combo.findData(path)
        if index < 0 and path:
            info = readBundleInfo(path)
            combo.insertItem(combo.count - 1, f"{info.name} ({', '.join(info.channels)})", path)
            index = combo.findData(path)
        combo.blockSignals(True)
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(False)

    def onBundleChanged(self, index: int) -> None:
        path = self.ui.bundleComboBox.itemData(index)
        if not path:  # "Load bundle from folder..."
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a CLDF model bundle folder")
            if not folder:
                self._selectBundleInCombo(self._parameterNode.bundlePath)
                return
            with slicer.util.tryWithErrorDisplay("This folder is not a CLDF model bundle.", waitCursor=True):
                readBundleInfo(folder)
                path = folder
            if not path:
                self._selectBundleInCombo(self._parameterNode.bundlePath)
                return
            self._selectBundleInCombo(path)
        self._parameterNode.bundlePath = path
        self._showChannels()

    def _showChannels(self) -> None:
        """One selector per bundle channel, labelled with the channel's name."""
        try:
            info = readBundleInfo(self._parameterNode.bundlePath) if self._parameterNode.bundlePath else None
        except ValueError as e:
            info = None
            self.ui.bundleInfoLabel.text = str(e)
        channels = info.channels if info else ()
        for i in range(MAX_CHANNELS):
            visible = i < len(channels)
            getattr(self.ui, f"channelLabel{i}").visible = visible
            getattr(self.ui, f"inputSelector{i}").visible = visible
            if visible:
                getattr(self.ui, f"channelLabel{i}").text = f"{channels[i]} volume:"
        if info:
            self.ui.bundleInfoLabel.text = f"Segments: {info.targetName}. Channels: {', '.join(channels)}."
        self._updateButtons()

    # ------------------------------------------------------------------ running
    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._job is not None
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        ready = bool(self._parameterNode and self._parameterNode.bundlePath and self._inputs(quiet=True))
        self.ui.segmentButton.enabled = running or ready
        self.ui.exportButton.enabled = not running and self._result is not None
        self.ui.bundleComboBox.enabled = not running

    def _inputs(self, quiet: bool = False) -> dict | None:
        info = readBundleInfo(self._parameterNode.bundlePath)
        inputs = {}
        for i, channel in enumerate(info.channels[:MAX_CHANNELS]):
            node = getattr(self._parameterNode, f"inputVolume{i}")
            if node is None:
                if quiet:
                    return None
                raise ValueError(f"select a volume for channel '{channel}'")
            inputs[channel] = node
        return inputs

    def onSegmentOrCancel(self) -> None:
        if self._job is not None:
            self._cancel()
            return
        with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
            if not self._ensureDependencies():
                return
            self._result = None
            self._job = self.logic.start(self._inputs(), self._parameterNode.bundlePath, self._parameterNode.device)
            done, total = self._job.progress
            self.ui.progressBar.maximum = total
            self.ui.progressBar.value = done
            self._updateButtons()
            self._job.startInBackground()
            self._timer.start()

    def onStep(self) -> None:
        """Move the slices the worker finished into the scene: Slicer stays responsive and the overlays fill in."""
        try:
            more = self._job.poll()
        except Exception as e:
            self._cancel()
            slicer.util.errorDisplay(f"Segmentation failed: {e}")
            logging.exception("CLDF segmentation failed")
            return
        self.ui.progressBar.value = self._job.progress[0]
        if not more:
            self._timer.stop()
            self._result = self._job.result
            self._job = None
            self.onDisplayChanged()
            self._updateButtons()

    def _cancel(self) -> None:
        self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
            self.ui.progressBar.value = 0
        self._updateButtons()

    def _ensureDependencies(self) -> bool:
        missing = (["torch (through the PyTorch extension)"] if dependencies.torchMissing() else [])
        missing += dependencies.missingRequirements()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                "CLDF Segmentation needs these Python packages, which will be downloaded and installed now "
                "(this can take several minutes):\n\n" + "\n".join(missing)):
            return False
        dependencies.installMissing()
        return True

    # ------------------------------------------------------------------ display and export
    def onDisplayChanged(self, *args) -> None:
        result = self._job.result if self._job is not None else self._result
        if result is None or self._parameterNode is None:
            return
        which = ("cam" if self.ui.camRadioButton.checked
                 else "meanGradient" if self.ui.meanGradientRadioButton.checked else "none")
        reference = self._inputs(quiet=True)
        if reference:
            self.logic.showMap(result, next(iter(reference.values())), which, self._parameterNode.overlayOpacity)
        result.segmentation.GetDisplayNode().SetVisibility(self._parameterNode.showMask)

    def onExport(self) -> None:
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export label map", "",
                                              "Label map (*.nii.gz *.nrrd *.nii)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("The label map could not be written.", waitCursor=True):
            reference = next(iter(self._inputs().values()))
            # the file dialog has already asked before replacing an existing file
            written = self.logic.exportLabelmap(self._result.segmentation, reference, path, overwrite=True)
            slicer.util.showStatusMessage(f"Label map written to {written}", 5000)


#
# CLDFSegmentationLogic for Slicer's module machinery (parameter node); the work is in CLDFSegmentationLib
#
class CLDFSegmentationModuleLogic(ScriptedLoadableModuleLogic, CLDFSegmentationLogic):
    """`CLDFSegmentationLogic` plus the module's parameter node (`getParameterNode`)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)


#
# CLDFSegmentationTest
#
class CLDFSegmentationTest(ScriptedLoadableModuleTest):
    """Runs the logic on a small real-shaped volume with the first shipped bundle."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_a_small_volume_and_export()

    def test_segment_a_small_volume_and_export(self):
        import numpy as np

        info = shippedBundles()[0]
        rng = np.random.default_rng(0)
        inputs = {}
        for channel in info.channels:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", channel)
            volume = rng.normal(100.0, 20.0, (6, 48, 40)).astype(np.float32)
            volume[:, 12:36, 10:30] += 80.0  # a bright body in darker surroundings
            slicer.util.updateVolumeFromArray(node, volume)
            node.SetSpacing(0.9, 0.9, 3.0)
            inputs[channel] = node
        before = slicer.mrmlScene.GetNumberOfNodes()
        job = CLDFSegmentationLogic().start(inputs, info.path, device="cpu", batchSize=2)
        steps = 0
        while job.step():
            steps += 1
        self.assertEqual(job.progress, (6, 6))
        self.assertGreaterEqual(steps, 2)
        reference = inputs[info.channels[0]]
        for node in (job.result.camVolume, job.result.meanGradientVolume):
            self.assertEqual(node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
        path = Path(slicer.app.temporaryPath) / "CLDFSegmentationSelfTest.nii.gz"
        CLDFSegmentationLogic.exportLabelmap(job.result.segmentation, reference, path, overwrite=True)
        self.assertTrue(path.is_file())
        path.unlink()
        self.delayDisplay("CLDF Segmentation self-test passed")

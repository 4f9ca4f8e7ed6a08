"""CLDF Segmentation: weakly supervised segmentation (contrastive learning on diffusion features) in 3D Slicer.

A thin shell: module metadata, the Widget, the module logic and the self-test.
The Widget only connects Qt signals to `CLDFSegmentationController` and draws
the state it is given; every decision, and the module's state (in the parameter
node), lives in `CLDFSegmentationLib` (MRML, no Qt), the work in the bundled
`cldf` engine.
"""

from __future__ import annotations

from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import CLDFSegmentationLib
from CLDFSegmentationLib import CLDFSegmentationController, CLDFSegmentationParameters, PanelState, shippedBundles
from CLDFSegmentationLib.parameters import MAX_CHANNELS

LOAD_FROM_FOLDER = "Load bundle from folder..."
#: Train section: parameter field -> widget (path line edits report currentPath, line edits text)
TRAIN_FIELDS = {"manifest": "trainManifestPathLineEdit", "output": "trainOutputPathLineEdit",
                "channels": "trainChannelsLineEdit", "target": "trainTargetLineEdit", "name": "trainNameLineEdit",
                "targetName": "trainTargetNameLineEdit", "extra": "trainExtraLineEdit"}
MAP_BUTTONS = {"cam": "camRadioButton", "meanGradient": "meanGradientRadioButton", "none": "noMapRadioButton"}


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
        # The shipped sample scan (a real LGG test patient, FLAIR + T1) in the Sample Data module.
        from CLDFSegmentationLib.sampledata import registerSampleData

        slicer.app.connect("startupCompleted()", registerSampleData)


#
# CLDFSegmentationWidget
#
class CLDFSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt signals -> `CLDFSegmentationController`; `PanelState` and the parameter node -> widgets."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._timer = qt.QTimer()
        self._timer.setInterval(50)  # torch works on a worker thread; each tick only copies finished slices
        self._timer.timeout.connect(lambda: self.controller.tick())
        self._redecideTimer = qt.QTimer()  # a dragged slider re-decides once it rests
        self._redecideTimer.setSingleShot(True)
        self._redecideTimer.setInterval(200)
        self._redecideTimer.timeout.connect(lambda: self.controller.redecide())

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CLDFSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CLDFSegmentationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._fillBundles()
        self.initializeParameterNode()

        self.ui.bundleComboBox.currentIndexChanged.connect(self.onBundleChanged)
        for i in range(MAX_CHANNELS):
            getattr(self.ui, f"inputSelector{i}").currentNodeChanged.connect(
                lambda node, i=i: self.parameters.setInputVolume(i, node))
        self.ui.deviceComboBox.currentTextChanged.connect(lambda text: setattr(self.parameters, "device", text))
        for which, name in MAP_BUTTONS.items():
            getattr(self.ui, name).toggled.connect(lambda on, which=which: on and self._setDisplay("shownMap", which))
        self.ui.opacitySliderWidget.valueChanged.connect(lambda v: self._setDisplay("overlayOpacity", v))
        self.ui.showMaskCheckBox.toggled.connect(lambda on: self._setDisplay("showMask", on))
        self.ui.showSeedsCheckBox.toggled.connect(lambda on: self._setDisplay("showSeeds", on))
        self.ui.presenceThresholdSliderWidget.valueChanged.connect(lambda v: self._setDecision("presenceThreshold", v))
        self.ui.clusterKSpinBox.valueChanged.connect(lambda k: self._setDecision("clusterK", k))
        self.ui.clusterRuleComboBox.currentTextChanged.connect(lambda rule: self._setDecision("clusterRule", rule))
        for name, label in (("labelPresentButton", 1), ("labelAbsentButton", 0), ("labelClearButton", -1)):
            getattr(self.ui, name).clicked.connect(lambda _=False, label=label: self.controller.labelSlices(
                label, self.ui.labelFirstSpinBox.value, self.ui.labelLastSpinBox.value))
        self.ui.saveManifestButton.clicked.connect(lambda: self.controller.saveManifest())
        for field, name in TRAIN_FIELDS.items():
            widget = getattr(self.ui, name)
            signal = widget.currentPathChanged if name.endswith("PathLineEdit") else widget.textChanged
            signal.connect(lambda text, field=field: self.parameters.setTraining(**{field: text}))
        self.ui.trainButton.clicked.connect(lambda: self.controller.trainOrCancel())
        self._shortcuts = []
        for keys, label in (("Ctrl+Shift+P", 1), ("Ctrl+Shift+A", 0), ("Ctrl+Shift+C", -1)):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.activated.connect(lambda label=label: self.controller.labelSlices(label))
            self._shortcuts.append(shortcut)
        self.ui.segmentButton.clicked.connect(lambda: self.controller.segmentOrCancel())
        self.ui.exportButton.clicked.connect(lambda: self.controller.export())

    @property
    def parameters(self) -> CLDFSegmentationParameters:
        return self.controller.parameters

    def cleanup(self) -> None:
        if self.controller is not None:
            self.controller.cancel()
        for shortcut in getattr(self, "_shortcuts", []):
            shortcut.setParent(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        self.controller.sceneClosing()
        self._setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node -> widgets
    def initializeParameterNode(self) -> None:
        self._setParameterNode(self.logic.getParameterNode())
        if not self.parameters.bundlePath and self.ui.bundleComboBox.count > 1:
            self.parameters.bundlePath = self.ui.bundleComboBox.itemData(0)
        self.updateGUIFromParameterNode()

    def _setParameterNode(self, node) -> None:
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is None:
            return
        parameters = CLDFSegmentationParameters(node)
        if self.controller is None:
            self.controller = CLDFSegmentationController(parameters, self.logic, self)
        self.controller.parameters = parameters
        self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        p = self.parameters
        widgets = [*(getattr(self.ui, n) for n in TRAIN_FIELDS.values()),
                   self.ui.bundleComboBox, self.ui.deviceComboBox, self.ui.opacitySliderWidget,
                   self.ui.showMaskCheckBox, self.ui.showSeedsCheckBox, self.ui.presenceThresholdSliderWidget,
                   self.ui.clusterKSpinBox, self.ui.clusterRuleComboBox,
                   *(getattr(self.ui, n) for n in MAP_BUTTONS.values()),
                   *(getattr(self.ui, f"inputSelector{i}") for i in range(MAX_CHANNELS))]
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            self._selectBundleInCombo(p.bundlePath)
            for i in range(MAX_CHANNELS):
                getattr(self.ui, f"inputSelector{i}").setCurrentNode(p.inputVolume(i))
            self.ui.deviceComboBox.currentText = p.device
            self.ui.opacitySliderWidget.value = p.overlayOpacity
            self.ui.showMaskCheckBox.checked = p.showMask
            self.ui.showSeedsCheckBox.checked = p.showSeeds
            getattr(self.ui, MAP_BUTTONS[p.shownMap]).checked = True
            for field, value in p.training().items():
                widget = getattr(self.ui, TRAIN_FIELDS[field])
                if widget.className() == "ctkPathLineEdit":
                    widget.currentPath = value
                else:
                    widget.text = value
            if p.presenceThreshold is not None:  # set when a run finishes, from the bundle
                self.ui.presenceThresholdSliderWidget.value = p.presenceThreshold
                self.ui.clusterKSpinBox.value = p.clusterK
                self.ui.clusterRuleComboBox.currentText = p.clusterRule
        finally:
            for w, b in zip(widgets, blocked):
                w.blockSignals(b)
        self.controller.refresh()

    def _setDisplay(self, name: str, value) -> None:
        setattr(self.parameters, name, value)
        self.controller.showDisplay()

    def _setDecision(self, name: str, value) -> None:
        setattr(self.parameters, name, value)
        self._redecideTimer.start()

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
        if index < 0 and path:  # a bundle loaded from a folder (or recorded in a saved scene)
            combo.insertItem(combo.count - 1, Path(path).name, path)
            index = combo.findData(path)
        combo.setCurrentIndex(max(index, 0))

    def onBundleChanged(self, index: int) -> None:
        path = self.ui.bundleComboBox.itemData(index)
        if not path:  # "Load bundle from folder..."
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a CLDF model bundle folder")
        if path:
            self.controller.chooseBundle(path)
        self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ the Panel the controller talks to
    def refresh(self, state: PanelState) -> None:
        self.ui.segmentButton.text = state.segmentText
        self.ui.segmentButton.enabled = state.segmentEnabled
        self.ui.exportButton.enabled = state.exportEnabled
        self.ui.decideCollapsibleButton.enabled = state.decideEnabled
        self.ui.trainButton.text = state.trainText
        self.ui.trainProgressBar.maximum = max(state.trainProgress[1], 1)
        self.ui.trainProgressBar.value = state.trainProgress[0]
        self.ui.trainStatusLabel.text = state.trainStatus
        self.ui.bundleComboBox.enabled = state.bundleEnabled
        self.ui.bundleInfoLabel.text = state.bundleInfo
        self.ui.progressBar.maximum = max(state.progress[1], 1)
        self.ui.progressBar.value = state.progress[0]
        for i in range(MAX_CHANNELS):
            visible = i < len(state.channels)
            getattr(self.ui, f"channelLabel{i}").visible = visible
            getattr(self.ui, f"inputSelector{i}").visible = visible
            if visible:
                getattr(self.ui, f"channelLabel{i}").text = f"{state.channels[i]} volume:"

    def startTimer(self) -> None:
        self._timer.start()

    def stopTimer(self) -> None:
        self._timer.stop()

    def askSavePath(self) -> str | None:
        return qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export label map", "",
                                              "Label map (*.nii.gz *.nrrd *.nii)") or None

    def confirm(self, question: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(question)

    def showError(self, message: str) -> None:
        slicer.util.errorDisplay(message)

    def showStatus(self, message: str) -> None:
        slicer.util.showStatusMessage(message, 5000)

    def showChart(self, chart) -> None:
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def currentSlice(self, volume) -> int:
        from CLDFSegmentationLib.labels import sliceIndexAt

        return sliceIndexAt(volume, slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode())

    def askFolder(self) -> str | None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder for the labels and manifest")
        return folder or None


#
# CLDFSegmentationLogic: the Qt-free logic plus the module's parameter node, under the name Slicer expects
#
class CLDFSegmentationLogic(ScriptedLoadableModuleLogic, CLDFSegmentationLib.CLDFSegmentationLogic):
    """`CLDFSegmentationLib.CLDFSegmentationLogic` plus the module's parameter node (`getParameterNode`)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)


#
# CLDFSegmentationTest
#
class CLDFSegmentationTest(ScriptedLoadableModuleTest):
    """Segments the shipped sample scan (a real test patient) with the brain bundle and checks it against its mask."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_the_sample_scan_and_export()

    def test_segment_the_sample_scan_and_export(self):
        from CLDFSegmentationLib import dependencies
        from CLDFSegmentationLib.sampledata import SAMPLE_DIR, SAMPLE_FILES
        from cldf.metrics import dice

        missing = (["torch"] if dependencies.torchMissing() else []) + dependencies.missingRequirements()
        if missing:
            self.delayDisplay(f"CLDF Segmentation self-test skipped: install {', '.join(missing)} first "
                              "(press Segment once, or the PyTorch extension for torch)")
            return
        info = next(b for b in shippedBundles() if b.name == "brain-mri-flair-t1")
        inputs = {c: slicer.util.loadVolume(str(SAMPLE_DIR / SAMPLE_FILES[c][0])) for c in info.channels}
        truth = slicer.util.arrayFromVolume(slicer.util.loadVolume(str(SAMPLE_DIR / "mask.nii.gz"))) > 0
        job = CLDFSegmentationLogic().start(inputs, info.path, device="auto", refine="none")
        while job.step():
            pass
        mask = job._engine.result.on_input_grid().mask > 0  # the engine's arrays, on the input's voxels
        score = dice(mask, truth)
        self.assertGreater(score, 0.5, f"the sample's Dice is {score:.3f}")
        reference = inputs[info.channels[0]]
        path = Path(slicer.app.temporaryPath) / "CLDFSegmentationSelfTest.nii.gz"
        CLDFSegmentationLogic.exportLabelmap(job.result.segmentation, reference, path, overwrite=True)
        self.assertTrue(path.is_file())
        path.unlink()
        self.delayDisplay(f"CLDF Segmentation self-test passed (sample Dice {score:.3f})")

"""The module's panel: the one file of the library that uses Qt, a thin binding of widgets to the controller.

The widgets named in the .ui file with a ``SlicerParameterName`` are bound to the
typed parameter node (``connectGui``); the rest (the bundle list, the map radio
buttons, the buttons and shortcuts) call `CLDFSegmentationController`, which
decides everything and hands back the `PanelState` this draws. A timer calls
the controller's `tick`; no slot waits for the engine.
"""

from __future__ import annotations

from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from .bundles import shippedBundles
from .controller import CLDFSegmentationController, PanelState
from .labels import sliceIndexAt
from .logic import CLDFSegmentationLogic
from .parameters import MAX_CHANNELS, CLDFSegmentationParameterNode

LOAD_FROM_FOLDER = "Load bundle from folder..."
MAP_BUTTONS = {"cam": "camRadioButton", "meanGradient": "meanGradientRadioButton", "none": "noMapRadioButton"}
SHORTCUTS = (("Ctrl+Shift+P", 1), ("Ctrl+Shift+A", 0), ("Ctrl+Shift+C", -1))


class CLDFSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt signals -> `CLDFSegmentationController`; `PanelState` -> widgets; the parameter node <-> bound widgets."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode: CLDFSegmentationParameterNode | None = None
        self._guiTag = None
        self._timer = qt.QTimer()
        self._timer.setInterval(50)  # workers do the work; each tick only takes in what they finished
        self._timer.timeout.connect(lambda: self.controller.tick())
        self._redecideTimer = qt.QTimer()  # a dragged slider re-decides once it rests
        self._redecideTimer.setSingleShot(True)
        self._redecideTimer.setInterval(200)
        self._redecideTimer.timeout.connect(lambda: self.controller.redecide())
        self._shortcuts = []

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
        self._connectClicks()
        self.initializeParameterNode()

    def _connectClicks(self) -> None:
        ui, click = self.ui, lambda name: (lambda *_: getattr(self.controller, name)())
        ui.bundleComboBox.currentIndexChanged.connect(self.onBundleChanged)
        for which, name in MAP_BUTTONS.items():
            getattr(ui, name).toggled.connect(lambda on, which=which: on and setattr(self._parameterNode, "shownMap",
                                                                                  which))
        for name, label in (("labelPresentButton", 1), ("labelAbsentButton", 0), ("labelClearButton", -1)):
            getattr(ui, name).clicked.connect(lambda _=False, label=label: self.controller.labelSlices(
                label, ui.labelFirstSpinBox.value, ui.labelLastSpinBox.value))
        for keys, label in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.activated.connect(lambda label=label: self.controller.labelSlices(label))
            self._shortcuts.append(shortcut)
        ui.saveManifestButton.clicked.connect(click("saveManifest"))
        ui.trainButton.clicked.connect(click("trainOrCancel"))
        ui.segmentButton.clicked.connect(click("segmentOrCancel"))
        ui.exportButton.clicked.connect(click("export"))

    def cleanup(self) -> None:
        if self.controller is not None:
            self.controller.cancel()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self.controller is not None:
            self.controller.sceneClosing()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ the parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.bundlePath and self.ui.bundleComboBox.count > 1:
            self._parameterNode.bundlePath = self.ui.bundleComboBox.itemData(0)

    def setParameterNode(self, parameterNode: CLDFSegmentationParameterNode | None) -> None:
        """Bind the widgets to ``parameterNode`` (unbinding the previous one), as the module template does."""
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode, self._guiTag = parameterNode, None
        if parameterNode is None:
            return
        if self.controller is None:
            self.controller = CLDFSegmentationController(parameterNode, self.logic, self)
        self.controller.parameters = parameterNode
        self._guiTag = parameterNode.connectGui(self.ui)
        self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """What the bound widgets cannot show themselves (the bundle list, the map buttons); the controller applies
        display choices and says when the decision settings changed."""
        p = self._parameterNode
        self._selectBundleInCombo(p.bundlePath)
        button = getattr(self.ui, MAP_BUTTONS[p.shownMap])
        wasBlocked = button.blockSignals(True)
        button.checked = True
        button.blockSignals(wasBlocked)
        if self.controller.parametersChanged():
            self._redecideTimer.start()
        self.controller.refresh()

    # ------------------------------------------------------------------ bundles
    def _fillBundles(self) -> None:
        combo = self.ui.bundleComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for card in shippedBundles():
            combo.addItem(f"{card.name} ({', '.join(card.channels)})", str(card.path))
        combo.addItem(LOAD_FROM_FOLDER, "")
        combo.blockSignals(wasBlocked)

    def _selectBundleInCombo(self, path: str) -> None:
        combo = self.ui.bundleComboBox
        wasBlocked = combo.blockSignals(True)
        index = combo.findData(path)
        if index < 0 and path:  # a bundle loaded from a folder (or recorded in a saved scene)
            combo.insertItem(combo.count - 1, Path(path).name, path)
            index = combo.findData(path)
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(wasBlocked)

    def onBundleChanged(self, index: int) -> None:
        path = self.ui.bundleComboBox.itemData(index)
        if not path:  # "Load bundle from folder..."
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a CLDF model bundle folder")
        if path:
            self.controller.chooseBundle(path)
        self._selectBundleInCombo(self._parameterNode.bundlePath)

    # ------------------------------------------------------------------ the Panel the controller talks to
    def refresh(self, state: PanelState) -> None:
        ui = self.ui
        ui.segmentButton.text, ui.segmentButton.enabled = state.segmentText, state.segmentEnabled
        ui.exportButton.enabled = state.exportEnabled
        ui.decideCollapsibleButton.enabled = state.decideEnabled
        ui.trainButton.text, ui.trainButton.enabled = state.trainText, state.trainEnabled
        _showProgress(ui.trainProgressBar, state.trainProgress)
        ui.trainStatusLabel.text = state.trainStatus
        ui.bundleComboBox.enabled = state.bundleEnabled
        ui.bundleInfoLabel.text = state.bundleInfo
        _showProgress(ui.progressBar, state.progress, state.progressText)
        for i in range(MAX_CHANNELS):
            visible = i < len(state.channels)
            getattr(ui, f"channelLabel{i}").visible = visible
            getattr(ui, f"inputSelector{i}").visible = visible
            if visible:
                getattr(ui, f"channelLabel{i}").text = f"{state.channels[i]} volume:"

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
        return sliceIndexAt(volume, slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode())

    def askFolder(self) -> str | None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder for the labels and manifest")
        return folder or None


def _showProgress(bar, progress: tuple[int, int], text: str = "") -> None:
    """A progress bar at ``progress`` (done, in all) saying ``text``; busy (bouncing) while there is a text and no
    total yet (the model loading)."""
    done, total = progress
    bar.maximum = 0 if text and not total else max(total, 1)
    bar.value = done
    bar.format = text or "%p%"

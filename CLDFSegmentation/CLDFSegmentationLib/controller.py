"""Every decision of the module's panel, without Qt: what a click does, what is enabled, what a label says.

The Widget only connects Qt signals to `CLDFSegmentationController` and draws the
`PanelState` it is given. The controller holds the parameter node and the panel
and hands each click to its workflow: `segmenting` (segment, watch, cancel,
re-decide, display), `labelling` (slice labels and the manifest), `training`
(`cldf train` as a child process) and `exporting` (the label map). Its
collaborators (parameters, logic, the panel's dialogs, the dependency checks)
are injected, so tests drive it as a click would, on real MRML. No call waits
for the engine: the panel's timer calls `tick`, which picks up what the workers did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from . import dependencies as defaultDependencies
from .bundles import bundleCard
from .exporting import Exporting
from .labelling import Labelling
from .parameters import CLDFSegmentationParameterNode
from .segmenting import Segmenting
from .training import Training


@dataclass(frozen=True)
class PanelState:
    """What the panel shows; the Widget copies it into its widgets."""

    segmentText: str
    segmentEnabled: bool
    exportEnabled: bool
    bundleEnabled: bool
    progress: tuple[int, int]  # (slices done, slices in all)
    channels: tuple[str, ...]  # one volume selector per channel, labelled with its name
    bundleInfo: str  # what the bundle segments, or why it cannot be used
    decideEnabled: bool = False  # the gate threshold, k and rule can be changed on the last run
    progressText: str = ""  # "loading model", then the slices done
    trainText: str = "Train"
    trainEnabled: bool = True
    trainProgress: tuple[int, int] = (0, 0)  # steps of the stage in progress
    trainStatus: str = ""  # the stage in progress, or the last line the training printed


class Panel(Protocol):
    """What the controller asks of the GUI."""

    def refresh(self, state: PanelState) -> None: ...
    def startTimer(self) -> None: ...
    def stopTimer(self) -> None: ...
    def askSavePath(self) -> str | None: ...
    def confirm(self, question: str) -> bool: ...
    def showError(self, message: str) -> None: ...
    def showStatus(self, message: str) -> None: ...
    def showChart(self, chart) -> None: ...
    def currentSlice(self, volume) -> int: ...
    def askFolder(self) -> str | None: ...


class CLDFSegmentationController:
    """The module's clicks and timer ticks, on the state in the parameter node."""

    def __init__(self, parameters: CLDFSegmentationParameterNode, logic, panel: Panel,
                 dependencies=defaultDependencies):
        self.parameters = parameters
        self.logic = logic
        self.panel = panel
        self.dependencies = dependencies
        self.segmenting = Segmenting(self)
        self.labelling = Labelling(self)
        self.training = Training(self)
        self.exporting = Exporting(self)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """True while a segmentation run is in progress (Segment shows Cancel)."""
        return self.segmenting.job is not None

    def state(self) -> PanelState:
        """The panel as the parameters and the work in progress say it should look."""
        card, problem = self.bundleCard()
        channels = card.channels if card else ()
        ready = card is not None and self.parameters.inputVolumes(channels) is not None
        text = problem or (f"Segments: {card.target}. Channels: {', '.join(channels)}. "
                           f"{card.says(self.parameters.segmenter)}" if card else "Choose a model bundle.")
        running = self.running
        return PanelState(segmentText="Cancel" if running else "Segment", segmentEnabled=running or ready,
                          exportEnabled=not running and self.parameters.outputs() is not None,
                          bundleEnabled=not running, channels=channels, bundleInfo=text,
                          **self.segmenting.state(), **self.training.state())

    def refresh(self) -> None:
        self.panel.refresh(self.state())

    def bundleCard(self):
        """The selected bundle's card and '', or None and why it cannot be used ('' when none is selected)."""
        path = self.parameters.bundlePath
        if not path:
            return None, ""
        try:
            return bundleCard(path), ""
        except (ValueError, OSError) as e:  # e.g. a saved scene whose bundle folder is gone
            return None, f"{e}. Choose another bundle."

    def tick(self) -> None:
        """Timer: take in what the workers did (slices, a re-decided mask, training output); stops when idle."""
        self.segmenting.tick()
        self.training.tick()
        self.stopTimerIfIdle()
        self.refresh()

    def stopTimerIfIdle(self) -> None:
        if not (self.segmenting.busy or self.training.busy):
            self.panel.stopTimer()

    # ------------------------------------------------------------------ clicks
    def chooseBundle(self, path: str) -> None:
        """A bundle picked in the list or loaded from a folder; a folder that is no bundle is refused."""
        try:
            bundleCard(path)
        except (ValueError, OSError) as e:
            self.panel.showError(str(e))
            return
        self.parameters.bundlePath = str(path)
        self.refresh()

    def segmentOrCancel(self) -> None:
        self.segmenting.segmentOrCancel()

    def cancel(self) -> None:
        self.segmenting.cancel()

    def redecide(self) -> None:
        self.segmenting.redecide()

    def showDisplay(self) -> None:
        self.segmenting.showDisplay()

    def parametersChanged(self) -> bool:
        return self.segmenting.parametersChanged()

    def sceneClosing(self) -> None:
        self.segmenting.sceneClosing()

    def trainOrCancel(self) -> None:
        self.training.startOrCancel()

    def labelSlices(self, label: int, first: int | None = None, last: int | None = None) -> None:
        self.labelling.labelSlices(label, first, last)

    def saveManifest(self) -> None:
        self.labelling.saveManifest()

    def export(self) -> None:
        self.exporting.export()

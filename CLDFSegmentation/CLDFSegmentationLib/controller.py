"""Every decision of the module's panel, without Qt: what a click does, what is enabled, what a label says.

The Widget only connects Qt signals to `CLDFSegmentationController` and draws the
`PanelState` it is given; the controller's collaborators (the parameters, the
logic that starts runs, the panel's dialogs, the dependency checks) are injected,
so tests drive it as a click would, on real MRML.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from typing import Protocol

from . import dependencies as defaultDependencies
from . import display
from .bundles import readBundleInfo
from .parameters import CLDFSegmentationParameters

log = logging.getLogger(__name__)


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
    trainText: str = "Train"
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
    """Segment, Cancel, Export and display choices of the module, on the state in the parameter node."""

    def __init__(self, parameters: CLDFSegmentationParameters, logic, panel: Panel, dependencies=defaultDependencies):
        self.parameters = parameters
        self.logic = logic
        self.panel = panel
        self.dependencies = dependencies
        self.job = None
        self._runInput = None
        self.lastJob = None  # the finished run whose cache re-decides the mask (memory only: not saved with the scene)
        self.training = None  # a `cldf train` child process (`trainrun.TrainingRun`)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self.job is not None

    def state(self) -> PanelState:
        """The panel as the parameters and the run in progress say it should look."""
        info, problem = self._bundleInfo()
        channels = info.channels if info else ()
        ready = info is not None and self.parameters.inputVolumes(channels) is not None
        progress = self.job.progress if self.job is not None else (0, 0)
        text = problem or (f"Segments: {info.targetName}. Channels: {', '.join(channels)}." if info else
                           "Choose a model bundle.")
        return PanelState(segmentText="Cancel" if self.running else "Segment",
                          segmentEnabled=self.running or ready,
                          exportEnabled=not self.running and self.parameters.outputs() is not None,
                          bundleEnabled=not self.running, progress=progress, channels=channels, bundleInfo=text,
                          decideEnabled=not self.running and self._redecidable(),
                          **self._trainingState())

    def _trainingState(self) -> dict:
        run = self.training
        if run is None:
            return {}
        status = f"{run.stage}: step {run.done} of {run.total}" if run.stage else (run.lines[-1] if run.lines else
                                                                                   "starting")
        return {"trainText": "Cancel training", "trainProgress": (run.done, run.total), "trainStatus": status}

    def refresh(self) -> None:
        self.panel.refresh(self.state())

    def _bundleInfo(self):
        path = self.parameters.bundlePath
        if not path:
            return None, ""
        try:
            return readBundleInfo(path), ""
        except ValueError as e:  # e.g. a saved scene whose bundle folder is gone
            return None, f"{e}. Choose another bundle."

    # ------------------------------------------------------------------ clicks
    def chooseBundle(self, path: str) -> None:
        """A bundle picked in the list or loaded from a folder; a folder that is no bundle is refused."""
        try:
            readBundleInfo(path)
        except ValueError as e:
            self.panel.showError(str(e))
            return
        self.parameters.bundlePath = str(path)
        self.refresh()

    def segmentOrCancel(self) -> None:
        if self.running:
            self.cancel()
        else:
            self.segment()

    def segment(self) -> None:
        """Check everything, then start the run on a worker thread; the panel's timer calls `tick`."""
        job = None
        try:
            info = readBundleInfo(self.parameters.bundlePath)
            inputs = self.parameters.inputVolumes(info.channels)
            if inputs is None:
                raise ValueError(f"select one volume for each channel: {', '.join(info.channels)}")
            if not self._dependenciesReady():
                return
            job = self.logic.start(inputs, self.parameters.bundlePath, self.parameters.device)
            self._forgetLastRun()  # only now: a refused start keeps the last run re-decidable
            self._runInput = inputs[info.channels[0]]
            job.startInBackground()
            self.job = job
            if job.warnings:
                self.panel.showStatus("Warning: " + " ".join(job.warnings))
        except Exception as e:
            if job is not None:
                job.cancel()  # its nodes go
            self.job = None
            log.exception("CLDF segmentation could not start")
            self.panel.showError(f"Segmentation could not start: {e}")
            self.refresh()
            return
        self.panel.startTimer()
        self.refresh()

    def tick(self) -> None:
        """Timer: move finished slices into the scene, follow a training run; stops when neither is left."""
        if self.job is not None:
            self._tickSegmentation()
        if self.training is not None:
            self._tickTraining()
        if self.job is None and self.training is None:
            self.panel.stopTimer()
        self.refresh()

    def _tickSegmentation(self) -> None:
        """At the end of a run, its outputs and the bundle's decision go into the parameters."""
        try:
            more = self.job.poll()
        except Exception as e:
            self.job = None
            log.exception("CLDF segmentation failed")
            self.panel.showError(f"Segmentation failed: {e}. Nothing of this run was kept.")
            return
        if more:
            return
        job, self.job, self.lastJob = self.job, None, self.job
        self.parameters.setOutputs(job.result, self._runInput)
        cfg = job._engine.segmenter.cfg.cluster  # the bundle's decision, the starting point for re-deciding
        self.parameters.presenceThreshold, self.parameters.clusterK, self.parameters.clusterRule = \
            cfg.presence_threshold, cfg.k, cfg.rule
        self.showDisplay()
        self.panel.showChart(job.result.chart)
        self.panel.showStatus("Segmentation finished" + "".join(f". Warning: {w}" for w in job.warnings))

    def cancel(self) -> None:
        """Stop the segmentation run; the scene keeps exactly the nodes it had before Segment."""
        if self.job is not None:
            self.job.cancel()
            self.job = None
        if self.training is None:
            self.panel.stopTimer()
        self.refresh()

    # ------------------------------------------------------------------ training
    def trainOrCancel(self) -> None:
        if self.training is not None:
            self.cancelTraining()
        else:
            self.startTraining()

    def startTraining(self) -> None:
        """`cldf train` on the manifest and settings in the parameters, as a child process (resumes when the
        output folder holds the checkpoints of the same command)."""
        from .trainrun import TrainingRun, trainCommand

        t = self.parameters.training()
        try:
            if not t["manifest"] or not t["output"]:
                raise ValueError("choose the manifest (e.g. from Save labels and manifest...) and an output folder")
            channels = [c.strip() for c in t["channels"].split(",") if c.strip()]
            args = trainCommand(t["manifest"], t["output"], channels, t["target"], t["name"],
                                t["targetName"] or "target", device=self.parameters.device,
                                extra=tuple(shlex.split(t["extra"])))
            self.training = TrainingRun(args)
            self.training.start()
        except Exception as e:
            self.training = None
            self.panel.showError(f"Training could not start: {e}")
            self.refresh()
            return
        self.panel.startTimer()
        self.refresh()

    def _tickTraining(self) -> None:
        run = self.training
        if run.poll():
            return
        self.training = None
        if run.returncode == 0:
            self.chooseBundle(str(run.out))
            self.panel.showStatus(f"Training finished: the bundle in {run.out} is selected")
        elif run.returncode == 130:
            self.panel.showStatus("Training cancelled; press Train again to resume from its checkpoints")
        else:
            self.panel.showError(f"Training failed (exit code {run.returncode}):\n{run.error()}")

    def cancelTraining(self) -> None:
        """Ctrl-C to the child: it saves the step in progress and stops; Train again resumes."""
        if self.training is not None:
            self.training.cancel()
            self._tickTraining()
        if self.job is None:
            self.panel.stopTimer()
        self.refresh()

    def _redecidable(self) -> bool:
        outputs = self.parameters.outputs()
        return (self.lastJob is not None and self.lastJob.result is not None and outputs is not None
                and outputs["segmentation"] is self.lastJob.result.segmentation)

    def redecide(self) -> None:
        """Apply the gate threshold, k and rule in the parameters to the last run, from its cache (no networks)."""
        from dataclasses import replace

        if not self._redecidable():
            self.panel.showError("The embeddings of this segmentation are not in memory (they are not saved with "
                                 "the scene): press Segment to run it again, then change the threshold.")
            return
        p, cfg = self.parameters, self.lastJob._engine.segmenter.cfg
        cluster = replace(cfg.cluster, presence_threshold=p.presenceThreshold, k=p.clusterK, rule=p.clusterRule)
        try:
            mask = self.lastJob.redecide(cluster, cfg.postprocess)
        except Exception as e:
            self.panel.showError(f"The mask could not be re-decided: {e}")
            return
        positive = int((self.lastJob.result.sliceProbabilities >= cluster.presence_threshold).sum())
        self.panel.showStatus(f"{positive} slices judged to hold the target, {int(mask.sum())} mask voxels "
                              "(unrefined)")
        self.refresh()

    # ------------------------------------------------------------------ weak labels
    def labelSlices(self, label: int, first: int | None = None, last: int | None = None) -> None:
        """Mark slices of the first input (default: the one in the slice view) target present (1) / absent (0) /
        unlabelled (-1); the labels are kept on the volume and saved with the scene."""
        from .chart import updateSliceLabels
        from .labels import markSlices, rememberChannels

        info, problem = self._bundleInfo()
        inputs = self.parameters.inputVolumes(info.channels) if info else None
        if inputs is None:
            self.panel.showError(problem or "Select the volumes of every channel before labelling slices.")
            return
        volume = next(iter(inputs.values()))
        first = self.panel.currentSlice(volume) if first is None else first
        last = first if last is None else last
        try:
            labels = markSlices(volume, first, last, label)
        except ValueError as e:
            self.panel.showError(str(e))
            return
        rememberChannels(volume, inputs)
        outputs = self.parameters.outputs()
        if outputs is not None and outputs["runInput"] is volume and outputs.get("table") is not None:
            updateSliceLabels(outputs["table"], labels)  # the last run's chart shows them
        word = {1: "present", 0: "absent", -1: "unlabelled"}[label]
        self.panel.showStatus(f"'{volume.GetName()}' slices {min(first, last)}..{max(first, last)}: {word} "
                              f"({int((labels == 1).sum())} present, {int((labels == 0).sum())} absent)")

    def saveManifest(self) -> None:
        """Write every labelled volume of the scene, its labels and a manifest for `cldf train --data`."""
        import slicer

        from .labels import labelledCases, writeManifest

        folder = self.panel.askFolder()
        if not folder:
            return
        try:
            cases = labelledCases(slicer.mrmlScene)
            if not cases:
                raise ValueError("no volume has labelled slices yet")
            path = writeManifest(cases, folder)
        except Exception as e:
            self.panel.showError(f"The manifest could not be written: {e}")
            return
        self.panel.showStatus(f"{len(cases)} labelled case(s) and {path.name} written to {folder}")

    def export(self) -> None:
        """Write the last run's segmentation as a label map on the grid of the input it was made on."""
        outputs = self.parameters.outputs()
        if outputs is None:
            self.panel.showError("There is no segmentation to export: press Segment first.")
            return
        path = self.panel.askSavePath()
        if not path:
            return
        try:  # the save dialog has already asked before replacing a file
            written = self.logic.exportLabelmap(outputs["segmentation"], outputs["runInput"], path, overwrite=True)
        except Exception as e:
            self.panel.showError(f"The label map could not be written: {e}")
            return
        self.panel.showStatus(f"Label map written to {written}")

    def showDisplay(self) -> None:
        """Show the chosen map over the run's input, the mask or not, at the chosen opacity."""
        if self.job is not None and self.job.result is not None:
            result = self.job.result
            nodes = {"camVolume": result.camVolume, "meanGradientVolume": result.meanGradientVolume,
                     "segmentation": result.segmentation, "seedsVolume": result.seedsVolume,
                     "runInput": self._runInput}
        else:
            nodes = self.parameters.outputs()
            if nodes is None:
                return
        p = self.parameters
        shown = {"cam": nodes["camVolume"], "meanGradient": nodes["meanGradientVolume"], "none": None}[p.shownMap]
        display.showMap(shown, backgroundNode=nodes["runInput"], opacity=p.overlayOpacity)
        nodes["segmentation"].GetDisplayNode().SetVisibility(p.showMask)
        display.showSeeds(nodes["seedsVolume"] if p.showSeeds else None)

    def sceneClosing(self) -> None:
        """The scene is about to close: a segmentation in progress is cancelled first, the last run's cache let go.
        A training run goes on (it writes files, not nodes)."""
        self.cancel()
        self._forgetLastRun()

    def _forgetLastRun(self) -> None:
        if self.lastJob is not None:
            self.lastJob.stopBackgroundWork()
            self.lastJob = None

    # ------------------------------------------------------------------ dependencies
    def _dependenciesReady(self) -> bool:
        """Install what is missing after the user agrees; refuse an old torch with what to do."""
        deps = self.dependencies
        old = deps.oldTorch()
        if old:
            raise RuntimeError(f"torch {old} is older than this module needs ({deps.TORCH_REQUIREMENT}): update "
                               "it in the PyTorch Utils module (PyTorch extension), restart Slicer and press Segment "
                               "again")
        missing = (["torch (through the PyTorch extension)"] if deps.torchMissing() else [])
        missing += deps.missingRequirements()
        if not missing:
            return True
        if not self.panel.confirm("CLDF Segmentation needs these Python packages, which will be downloaded and "
                                  "installed now (this can take several minutes):\n\n" + "\n".join(missing)):
            return False
        deps.installMissing()
        return True

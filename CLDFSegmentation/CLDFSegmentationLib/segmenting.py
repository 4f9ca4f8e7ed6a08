"""The Segment / Cancel button, the run's progress, the display choices and re-deciding the last run's mask.

Every call returns at once: the run loads and segments on its worker, Cancel
removes the run's nodes and lets the worker finish its batch alone, a
re-decision is computed on a worker; `tick` (the panel's timer) picks up each outcome.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from . import display
from .job import LOADING, STUDENT_NOT_REDECIDED

log = logging.getLogger(__name__)


class Segmenting:
    """Segmentation runs of the module; ``job`` is the run in progress, ``lastJob`` the finished run whose cache
    re-decides the mask (memory only: not saved with the scene)."""

    def __init__(self, controller):
        self.controller = controller
        self.job = None
        self.lastJob = None
        self._runInput = None
        self._display = self._decision = None  # the display and decision settings last applied

    @property
    def busy(self) -> bool:
        """True while the timer has something to pick up: a run, or a re-decision not shown yet."""
        return self.job is not None or (self.lastJob is not None and self.lastJob.deciding)

    def state(self) -> dict:
        job = self.job
        if job is None:
            return {"progress": (0, 0), "progressText": "", "decideEnabled": self.redecidable()}
        done, total = job.progress
        text = "loading model" if job.stage == LOADING else f"slice {done} of {total}"
        return {"progress": (done, total), "progressText": text, "decideEnabled": False}

    # ------------------------------------------------------------------ a run
    def segmentOrCancel(self) -> None:
        if self.job is not None:
            self.cancel()
        else:
            self.segment()

    def segment(self) -> None:
        """Check what can be checked at once, then start the run on a worker thread; the panel's timer calls `tick`."""
        c = self.controller
        try:
            card, problem = c.bundleCard()
            if card is None:
                raise ValueError(problem or "choose a model bundle")
            inputs = c.parameters.inputVolumes(card.channels)
            if inputs is None:
                raise ValueError(f"select one volume for each channel: {', '.join(card.channels)}")
            if not self._dependenciesReady():
                return
            p = c.parameters
            job = c.logic.start(inputs, p.bundlePath, p.device, segmenter=p.segmenter, overlays=p.overlays)
            job.startInBackground()
        except Exception as e:
            log.exception("CLDF segmentation could not start")
            c.panel.showError(f"Segmentation could not start: {e}")
            c.refresh()
            return
        if self.lastJob is not None:
            self.lastJob.stopBackgroundWork()  # the new run gets the CPU; the last run stays re-decidable
        self.job, self._runInput = job, inputs[card.channels[0]]
        c.panel.startTimer()
        c.refresh()

    def tick(self) -> None:
        if self.job is not None:
            self._tickRun()
        if self.lastJob is not None and self.lastJob.deciding:
            self._tickRedecision()

    def _tickRun(self) -> None:
        """At the end of a run, its outputs and the bundle's decision go into the parameters."""
        c, job = self.controller, self.job
        try:
            if job.poll():
                return
        except Exception as e:
            self.job = None
            log.exception("CLDF segmentation failed")
            loaded = job.progress[1] > 0  # the bundle loaded and took the inputs: it failed while segmenting
            c.panel.showError(f"Segmentation failed: {e}. Nothing of this run was kept." if loaded else
                              f"Segmentation could not start: {e}")
            return
        self.job, self.lastJob = None, job
        p = c.parameters
        p.setOutputs(job.result, self._runInput)
        cluster, _ = job.decision  # the bundle's decision, the starting point for re-deciding
        p.presenceThreshold, p.clusterK, p.clusterRule = float(cluster.presence_threshold), int(cluster.k), cluster.rule
        self._decision = (p.presenceThreshold, p.clusterK, p.clusterRule)  # the run's own: nothing to re-decide
        self.showDisplay()
        c.panel.showChart(job.result.chart)
        from cldf.hounsfield import describe

        windowed = describe(job.intensities, windowed_only=True)
        c.panel.showStatus("Segmentation finished" + (f" ({windowed})" if windowed else "")
                           + "".join(f". Warning: {w}" for w in job.warnings))

    def cancel(self) -> None:
        """Stop the run at once: the scene keeps exactly the nodes it had before Segment; the worker ends its batch
        in the background."""
        if self.job is not None:
            self.job.cancel()
            self.job = None
            self.controller.panel.showStatus("Segmentation cancelled")
        self.controller.stopTimerIfIdle()
        self.controller.refresh()

    def sceneClosing(self) -> None:
        """The scene is about to close: a run in progress is cancelled, the last run's cache let go."""
        self.cancel()
        if self.lastJob is not None:
            self.lastJob.stopBackgroundWork()
            self.lastJob = None

    # ------------------------------------------------------------------ re-deciding
    def redecidable(self) -> bool:
        outputs = self.controller.parameters.outputs()
        job = self.lastJob
        return (job is not None and job.result is not None and outputs is not None
                and outputs["segmentation"] is job.result.segmentation)

    def redecide(self) -> None:
        """Ask for the last run's mask with the gate threshold, k and rule in the parameters, from its cache (no
        networks); `tick` shows it."""
        c = self.controller
        if not self.redecidable():
            c.panel.showError("The embeddings of this segmentation are not in memory (they are not saved with "
                              "the scene): press Segment to run it again, then change the threshold.")
            return
        if self.lastJob.byStudent:
            c.panel.showError(STUDENT_NOT_REDECIDED)
            return
        p = c.parameters
        cluster, postprocess = self.lastJob.decision
        self.lastJob.requestRedecision(
            replace(cluster, presence_threshold=p.presenceThreshold, k=p.clusterK, rule=p.clusterRule), postprocess)
        c.panel.startTimer()

    def _tickRedecision(self) -> None:
        c, job = self.controller, self.lastJob
        try:
            mask = job.pollRedecision()
        except Exception as e:
            c.panel.showError(f"The mask could not be re-decided: {e}")
            return
        if mask is None:
            return
        positive = int((job.result.sliceProbabilities >= job.presenceThreshold).sum())
        c.panel.showStatus(f"{positive} slices judged to hold the target, {int(mask.sum())} mask voxels (unrefined)")

    # ------------------------------------------------------------------ display
    def parametersChanged(self) -> bool:
        """The parameter node changed (a bound widget, a script): display choices apply at once; True when the
        decision settings changed on a re-decidable run (the panel re-decides once a dragged slider rests)."""
        p = self.controller.parameters
        display = (p.shownMap, p.overlayOpacity, p.showMask, p.showSeeds)
        if display != self._display:
            self.showDisplay()
        decision = (p.presenceThreshold, p.clusterK, p.clusterRule)
        changed = decision != self._decision
        self._decision = decision
        return changed and self.redecidable()

    def showDisplay(self) -> None:
        """Show the chosen map over the run's input, the mask or not, at the chosen opacity."""
        p = self.controller.parameters
        self._display = (p.shownMap, p.overlayOpacity, p.showMask, p.showSeeds)
        nodes = p.outputs()
        if self.job is not None and self.job.result is not None:
            result = self.job.result
            nodes = {"camVolume": result.camVolume, "meanGradientVolume": result.meanGradientVolume,
                     "segmentation": result.segmentation, "seedsVolume": result.seedsVolume,
                     "runInput": self._runInput}
        if nodes is None:
            return
        shown = {"cam": nodes["camVolume"], "meanGradient": nodes["meanGradientVolume"], "none": None}[p.shownMap]
        display.showMap(shown, backgroundNode=nodes["runInput"], opacity=p.overlayOpacity)
        nodes["segmentation"].GetDisplayNode().SetVisibility(p.showMask)
        display.showSeeds(nodes["seedsVolume"] if p.showSeeds else None)

    # ------------------------------------------------------------------ dependencies
    def _dependenciesReady(self) -> bool:
        """Install what is missing after the user agrees (pip runs on the main thread: off it, it crashes Slicer);
        refuse an old torch with what to do."""
        c, deps = self.controller, self.controller.dependencies
        old = deps.oldTorch()
        if old:
            raise RuntimeError(f"torch {old} is older than this module needs ({deps.TORCH_REQUIREMENT}): update "
                               "it in the PyTorch Utils module (PyTorch extension), restart Slicer and press Segment "
                               "again")
        missing = (["torch (through the PyTorch extension)"] if deps.torchMissing() else [])
        missing += deps.missingRequirements()
        if not missing:
            return True
        if not c.panel.confirm("CLDF Segmentation needs these Python packages, which will be downloaded and "
                               "installed now (this can take several minutes):\n\n" + "\n".join(missing)):
            return False
        deps.installMissing()
        return True

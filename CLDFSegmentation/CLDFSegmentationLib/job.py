"""A segmentation run in the scene, one batch of slices per `step()`, so a viewer watches it fill in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import display
from .nodes import COMPLETE, earlierOutputs, removeNodes, writeSlices
from .segmentations import setSegmentMask


@dataclass
class CLDFSegmentationResult:
    """The run's output nodes, on the input's exact geometry, and the per-slice presence probabilities."""

    camVolume: object
    meanGradientVolume: object
    segmentation: object
    segmentId: str
    sliceProbabilities: np.ndarray  # (Z,) probability that each axial slice holds the target

    @property
    def nodes(self) -> list:
        return [self.camVolume, self.meanGradientVolume, self.segmentation]


class CLDFSegmentationJob:
    """Drives a `cldf` segmentation job and mirrors every step into MRML nodes.

    Created by `CLDFSegmentationLogic.start`; call `step()` until it returns
    False. `cancel()` stops at once and removes every node this run created.
    When the run completes, the outputs of earlier runs on the same input are
    replaced by this run's (nodes the user made are never touched).
    """

    def __init__(self, engineJob, inputNode, result: CLDFSegmentationResult):
        self._engine = engineJob
        self._input = inputNode
        self.result: CLDFSegmentationResult | None = result
        self.cancelled = False
        self.finished = False

    @property
    def progress(self) -> tuple[int, int]:
        """(slices done, slices in all)."""
        return self._engine.progress

    def step(self) -> bool:
        """Segment the next batch of slices and update the nodes; True while slices remain."""
        if self.cancelled or self.finished:
            return False
        before = self._engine.done
        more = self._engine.step()
        self._update(before, self._engine.done)
        if not more and self._engine.done >= self._engine.total:
            self._finish()
        return more

    def cancel(self) -> None:
        """Stop now and remove what this run created; the scene is as it was before `start`."""
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        self._engine.cancel()
        removeNodes(self.result.nodes)
        self.result = None

    def run(self) -> CLDFSegmentationResult:
        while self.step():
            pass
        return self.result

    def _update(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        engine, result = self._engine.result, self.result
        writeSlices(result.camVolume, engine.cam, start, stop)
        writeSlices(result.meanGradientVolume, engine.mean_gradient, start, stop)
        setSegmentMask(result.segmentation, result.segmentId, engine.mask, self._input)
        result.sliceProbabilities[start:stop] = engine.presence[start:stop]

    def _finish(self) -> None:
        self.finished = True
        removeNodes(earlierOutputs(self._input, exclude=self.result.nodes))
        for node in self.result.nodes:
            node.SetAttribute(COMPLETE, "true")


def showResult(result: CLDFSegmentationResult, inputNode, which: str = "cam", opacity: float | None = None) -> None:
    """Show one map (``cam``, ``meanGradient`` or ``none``) over the input, and the segmentation."""
    maps = {"cam": result.camVolume, "meanGradient": result.meanGradientVolume, "none": None}
    if which not in maps:
        raise ValueError(f"map must be one of {sorted(maps)}, not '{which}'")
    display.showMap(maps[which], backgroundNode=inputNode, opacity=opacity)
    result.segmentation.GetDisplayNode().SetVisibility(True)

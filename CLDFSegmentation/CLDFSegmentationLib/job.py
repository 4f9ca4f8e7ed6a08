"""A segmentation run in the scene, filling in slice by slice so a viewer watches it.

Two ways to drive it: `step()` segments one batch on the calling thread (scripts,
tests); `startInBackground()` runs the engine on a worker thread and `poll()`,
called from the main thread (a QTimer in the module), only moves finished slices
into MRML, so Slicer never waits for torch. MRML is touched on the main thread only.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np

from . import display
from .chart import chartSeries, updateSliceChart
from .nodes import COMPLETE, earlierOutputs, removeNodes, writeSlices
from .segmentations import addSegmentSlices, setSegmentMask


@dataclass
class CLDFSegmentationResult:
    """The run's output nodes and the per-slice presence probabilities.

    The maps lie on the grid the engine cut: the input's exact geometry, or the input reoriented to the
    bundle's orientation (the same voxels, axes permuted and flipped) when it is stored in another.
    """

    camVolume: object
    meanGradientVolume: object
    segmentation: object
    segmentId: str
    sliceProbabilities: np.ndarray  # (Z,) probability that each slice (the bundle's cut) holds the target
    table: object = None  # per-slice numbers (`chart`)
    chart: object = None  # the plot of them
    seedsVolume: object = None  # label map: 1 foreground seeds, 2 background seeds (an optional layer)

    @property
    def nodes(self) -> list:
        charts = [self.table, self.chart, *chartSeries(self.chart)] if self.chart is not None else []
        seeds = [self.seedsVolume] if self.seedsVolume is not None else []
        return [self.camVolume, self.meanGradientVolume, self.segmentation, *seeds, *charts]


class CLDFSegmentationJob:
    """Drives a `cldf` segmentation job and mirrors every step into MRML nodes.

    Created by `CLDFSegmentationLogic.start`; call `step()` until it returns
    False. `cancel()` stops at once and removes every node this run created.
    When the run completes, the outputs of earlier runs on the same input are
    replaced by this run's (nodes the user made are never touched).
    """

    def __init__(self, engineJob, inputNode, result: CLDFSegmentationResult, grid=None):
        self._engine = engineJob
        self._input = inputNode
        self._grid = inputNode if grid is None else grid  # the geometry of the engine's arrays
        self.result: CLDFSegmentationResult | None = result
        self.cancelled = False
        self.finished = False
        self._thread: threading.Thread | None = None
        self._finished_slices: queue.SimpleQueue = queue.SimpleQueue()  # (start, stop) ranges, then None
        self._error: BaseException | None = None
        self._redecider = None
        self._presenceThreshold: float | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def progress(self) -> tuple[int, int]:
        """(slices done, slices in all)."""
        return self._engine.progress

    @property
    def warnings(self) -> list[str]:
        """What the engine found unusual about the inputs (e.g. intensities unlike the bundle's training scans)."""
        return list(self._engine.warnings)

    @property
    def running(self) -> bool:
        """True while a background run is at work (segmenting, or clustering for `redecide` afterwards)."""
        return self._thread is not None and self._thread.is_alive()

    def startInBackground(self) -> None:
        """Segment on a worker thread; call `poll()` from the main thread until it returns False."""
        if self._thread is not None:
            raise RuntimeError("this run is already running in the background")
        self._thread = threading.Thread(target=self._work, name="CLDF segmentation", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        """Worker thread: engine steps only (no MRML), each finished range queued for `poll`; once the run
        is complete, K-means on the slices the gate passed over, so that `redecide` need not run it."""
        try:
            while not self.cancelled:
                before = self._engine.done
                more = self._engine.step()
                self._finished_slices.put((before, self._engine.done))
                if not more:
                    break
        except BaseException as error:  # handed to the main thread by `poll`
            self._error = error
        finally:
            self._finished_slices.put(None)
        if self._error is None and not self.cancelled and self._engine.result.cache is not None:
            redecider = self._newRedecider()
            with self._lock:
                if self._stopped:
                    return
                self._redecider = redecider
            redecider.prepare(self._engine.segmenter.cfg.cluster)

    def stopBackgroundWork(self) -> None:
        """Stop the clustering a finished run does for `redecide` (e.g. when the scene closes)."""
        with self._lock:
            self._stopped = True
            if self._redecider is not None:
                self._redecider.cancelled = True

    def _newRedecider(self):
        from cldf.redecide import Redecider

        return Redecider(self._engine.segmenter, self._engine.result, self._engine.decoder_seed)

    def poll(self) -> bool:
        """Main thread: move the slices finished since the last call into the nodes; True while the run goes on.

        An error of the worker is raised here, after the run's nodes are removed.
        """
        if self.cancelled or self.finished:
            return False
        start, stop, ended = self._engine.total, 0, False
        while True:
            try:
                item = self._finished_slices.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ended = True
                break
            start, stop = min(start, item[0]), max(stop, item[1])
        self._update(start, stop)
        if not ended:
            return True
        if self._error is not None:
            self._thread.join()
            self.cancel()
            raise self._error
        if self._engine.done >= self._engine.total:
            self._finish()
        return False

    def step(self) -> bool:
        """Segment the next batch of slices and update the nodes; True while slices remain."""
        if self._thread is not None:
            raise RuntimeError("this run is running in the background: call poll(), not step()")
        if self.cancelled or self.finished:
            return False
        before = self._engine.done
        more = self._engine.step()
        self._update(before, self._engine.done)
        if not more and self._engine.done >= self._engine.total:
            self._finish()
        return more

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop and remove what this run created; the scene is as it was before `start`.

        A background run stops after the batch in progress; this waits for it up to ``timeout`` seconds.
        """
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        self._engine.cancel()
        self.stopBackgroundWork()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        removeNodes(self.result.nodes)
        self.result = None

    def run(self) -> CLDFSegmentationResult:
        """Step to the end on this thread (blocking; for scripts and tests) and return the result."""
        while self.step():
            pass
        return self.result

    def _update(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        engine, result = self._engine.result, self.result
        writeSlices(result.camVolume, engine.cam, start, stop)
        writeSlices(result.meanGradientVolume, engine.mean_gradient, start, stop)
        if result.seedsVolume is not None:
            writeSlices(result.seedsVolume, engine.seeds, start, stop)
        addSegmentSlices(result.segmentation, result.segmentId, engine.mask, self._grid, start, stop)
        result.sliceProbabilities[start:stop] = engine.presence[start:stop]
        self._updateChart(start, stop)

    def _updateChart(self, start: int = 0, stop: int | None = None) -> None:
        if self.result.table is not None:
            spacing = self._grid.GetSpacing()
            updateSliceChart(self.result.table, self._engine.result.presence, self.presenceThreshold,
                             self._engine.result.mask, spacing[0] * spacing[1], start, stop)

    @property
    def presenceThreshold(self) -> float:
        """The gate's threshold the masks were last decided with."""
        return self._presenceThreshold if self._presenceThreshold is not None else \
            self._engine.segmenter.cfg.cluster.presence_threshold

    def redecide(self, cluster, postprocess) -> np.ndarray:
        """Decide the masks again for other gate / clustering / post-processing settings (`cldf.redecide.Redecider`),
        without the networks, and show them; returns the new ``(Z, Y, X)`` mask (unrefined)."""
        if not self.finished or self.result is None:
            raise RuntimeError("only a finished run can be re-decided")
        if self._thread is not None:
            self._thread.join()  # the worker may still be clustering the slices the gate passed over
        if self._redecider is None or self._redecider.cancelled:
            self._redecider = self._newRedecider()
        mask = self._redecider.mask(cluster, postprocess)
        self._engine.result.mask = mask
        self._presenceThreshold = cluster.presence_threshold
        setSegmentMask(self.result.segmentation, self.result.segmentId, mask, self._grid)
        self._updateChart()
        return mask

    def _finish(self) -> None:
        # the engine's whole-volume rule may have changed any slice: the segment gets the final mask once more
        setSegmentMask(self.result.segmentation, self.result.segmentId, self._engine.result.mask, self._grid)
        self._updateChart()
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

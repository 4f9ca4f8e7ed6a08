"""A segmentation run in the scene, filling in slice by slice so a viewer watches it.

Two ways to drive it: `step()` loads the bundle, then segments one batch per
call on the calling thread (scripts, tests); `startInBackground()` does both on
a worker thread, and `poll()`, called from the main thread (the module's timer),
makes the output nodes once the bundle is loaded and moves finished slices into
them. Verifying the bundle, building its networks, loading LiteMedSAM, torch,
a Cancel and a re-decision never hold up the main thread; MRML is touched on
the main thread only.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from .chart import updateSliceChart
from .nodes import COMPLETE, earlierOutputs, removeNodes, writeSlices
from .runoutputs import CLDFSegmentationResult, createOutputs
from .segmentations import addSegmentSlices, setSegmentMask

STUDENT_NOT_REDECIDED = ("This mask is the student network's: it has no presence gate or clusters to decide again. "
                         "Choose the 'cldf' segmenter and press Segment to tune them.")

LOADING, SEGMENTING, FINISHED, CANCELLED = "loading model", "segmenting", "finished", "cancelled"


@dataclass
class RunRequest:
    """A run as `CLDFSegmentationLogic.start` checked it, with what it read from the scene for the worker."""

    card: object  # the bundle's `cldf.card.CardSummary`
    inputNodes: dict  # {channel: volume node}
    images: dict  # {channel: SimpleITK image}: copies of the voxels, so the worker never reads MRML
    labels: np.ndarray | None  # the weak slice labels of the first channel's input
    device: str
    batchSize: int
    decoderSeed: int
    refine: str | None
    keepCache: bool
    show: bool
    segmenter: str = "bundle"  # "cldf", "student" or "bundle" (its own choice)
    overlays: bool = True  # a student also computes the CAM and mean-gradient maps


class CLDFSegmentationJob:
    """Drives a `cldf` segmentation job and mirrors every step into MRML nodes.

    Created by `CLDFSegmentationLogic.start`; call `step()` until it returns False,
    or `startInBackground()` and `poll()` until it returns False. `cancel()` returns
    at once and removes every node this run created. When the run completes, the
    outputs of earlier runs on the same input are replaced by this run's (nodes the
    user made are never touched).
    """

    def __init__(self, request: RunRequest):
        self._request = request
        self._engine = None  # `cldf.segment.SegmentationJob`, once the bundle is loaded
        self._input = None
        self._grid = None  # the node whose geometry the engine's arrays have
        self.result: CLDFSegmentationResult | None = None
        self.cancelled = False
        self.finished = False
        self._thread: threading.Thread | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # (start, stop) of finished slices, then None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._redecider = None
        self._presenceThreshold: float | None = None
        self._decisions: queue.SimpleQueue = queue.SimpleQueue()  # (token, cluster, mask, error)
        self._asked = self._shown = 0  # the newest re-decision asked for, and the last one shown
        self._deciding = threading.Lock()

    # ------------------------------------------------------------------ state
    @property
    def stage(self) -> str:
        """`LOADING` (the bundle and its networks), `SEGMENTING`, `FINISHED` or `CANCELLED`."""
        if self.cancelled or self.finished:
            return CANCELLED if self.cancelled else FINISHED
        return SEGMENTING if self.result is not None else LOADING

    @property
    def progress(self) -> tuple[int, int]:
        """(slices done, slices in all); (0, 0) while the bundle loads."""
        return self._engine.progress if self._engine is not None else (0, 0)

    @property
    def warnings(self) -> list[str]:
        """What the engine found unusual about the inputs (e.g. intensities unlike the bundle's training scans)."""
        return list(self._engine.warnings) if self._engine is not None else []

    @property
    def intensities(self) -> dict[str, dict]:
        """Per channel, what was done to the input's intensities (CT in HU through the bundle's window, or none)."""
        return dict(self._engine.intensities) if self._engine is not None else {}

    @property
    def running(self) -> bool:
        """True while the worker is at work (loading, segmenting, finishing the batch of a cancelled run, or
        clustering for re-decisions after the run)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def decision(self) -> tuple:
        """The bundle's ``(ClusterConfig, PostprocessConfig)``: how the masks were decided."""
        cfg = self._engine.segmenter.cfg
        return cfg.cluster, cfg.postprocess

    @property
    def byStudent(self) -> bool:
        """True when the bundle's student network made the mask: it has no gate or clusters to decide again."""
        return self._engine.kind == "student"

    @property
    def engineResult(self):
        """The engine's arrays (`cldf.segment.VolumeResult`) on the grid it cut."""
        return self._engine.result if self._engine is not None else None

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Verify and load the bundle, build its networks (and LiteMedSAM when refining), check the inputs against
        it, then make the output nodes: blocking (a background run loads on its worker). Nothing is added to
        the scene when it raises."""
        if self._thread is not None:
            raise RuntimeError("this run loads in the background: call poll(), not load()")
        if self._engine is None:
            self._loadEngine()
        if self.result is None:
            self._createOutputs()

    def _loadEngine(self) -> None:
        """Engine only (no MRML): any thread."""
        from cldf.bundle import load_bundle  # torch is imported only when a run loads
        from cldf.student import make_segmenter

        r = self._request
        segmenter = make_segmenter(load_bundle(r.card.path), None if r.segmenter == "bundle" else r.segmenter,
                                   r.device, r.batchSize, overlays=r.overlays, refine=r.refine)
        self._engine = segmenter.start_images(r.images, r.decoderSeed, keep_cache=r.keepCache, reorient=True)

    def _createOutputs(self) -> None:
        r = self._request
        try:
            self.result, self._grid = createOutputs(self._engine, r.card, r.inputNodes, r.images, r.labels, r.show)
        except BaseException:
            self.cancel()
            raise
        self._input = r.inputNodes[self._engine.segmenter.bundle.channels[0]]

    # ------------------------------------------------------------------ driving it
    def step(self) -> bool:
        """Load (first call), then segment the next batch of slices and update the nodes; True while slices remain."""
        if self._thread is not None:
            raise RuntimeError("this run is running in the background: call poll(), not step()")
        if self.cancelled or self.finished:
            return False
        if self.result is None:
            self.load()
            return True
        before = self._engine.done
        more = self._engine.step()
        self._update(before, self._engine.done)
        if not more and self._engine.done >= self._engine.total:
            self._finish()
        return more

    def run(self) -> CLDFSegmentationResult:
        """Step to the end on this thread (blocking; for scripts and tests) and return the result."""
        while self.step():
            pass
        return self.result

    def startInBackground(self) -> None:
        """Load and segment on a worker thread; call `poll()` from the main thread until it returns False."""
        if self._thread is not None:
            raise RuntimeError("this run is already running in the background")
        self._thread = threading.Thread(target=self._work, name="CLDF segmentation", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        """Worker thread: loading and engine steps only (no MRML), each finished range queued for `poll`; once the
        run is complete, K-means on the slices the gate passed over, so that re-deciding need not run it."""
        try:
            if self._engine is None:
                self._loadEngine()
            self._events.put((0, 0))  # loaded: the next poll makes the nodes
            while not self.cancelled:
                before = self._engine.done
                more = self._engine.step()
                self._events.put((before, self._engine.done))
                if not more:
                    break
        except BaseException as error:  # handed to the main thread by `poll`
            self._error = error
        finally:
            self._events.put(None)
        if self._error is None and not self.cancelled and self._engine.result.cache is not None:
            redecider = self._newRedecider()
            with self._lock:
                if self._stopped:
                    return
                self._redecider = redecider
            redecider.prepare(self._engine.segmenter.cfg.cluster)

    def poll(self) -> bool:
        """Main thread: make the nodes once the bundle is loaded, move the slices finished since the last call into
        them; True while the run goes on. An error of the worker is raised here, after the run's nodes are removed."""
        if self.cancelled or self.finished:
            return False
        start, stop, ended = self._engine.total if self._engine is not None else 0, 0, False
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ended = True
                break
            start, stop = min(start, item[0]), max(stop, item[1])
        if self._engine is not None and self.result is None and self._error is None:
            self._createOutputs()
        self._update(start, stop)
        if not ended:
            return True
        if self._error is not None:
            self.cancel()
            raise self._error
        if self._engine.done >= self._engine.total:
            self._finish()
        return False

    def cancel(self) -> None:
        """Stop and remove what this run created, at once: the scene is as it was before `start`. A background
        worker stops on its own after the batch in progress (or once the bundle is loaded)."""
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        if self._engine is not None:
            self._engine.cancel()
        self.stopBackgroundWork()
        if self.result is not None:
            removeNodes(self.result.nodes)
        self.result = None

    def stopBackgroundWork(self) -> None:
        """Stop the clustering a finished run does for re-decisions (e.g. when the scene closes)."""
        with self._lock:
            self._stopped = True
            if self._redecider is not None:
                self._redecider.cancelled = True

    # ------------------------------------------------------------------ re-deciding the mask
    @property
    def presenceThreshold(self) -> float:
        """The gate's threshold the masks were last decided with."""
        return self._presenceThreshold if self._presenceThreshold is not None else \
            self._engine.segmenter.cfg.cluster.presence_threshold

    @property
    def deciding(self) -> bool:
        """True while the newest re-decision asked for has not been shown yet."""
        return self._asked != self._shown

    def requestRedecision(self, cluster, postprocess) -> None:
        """Decide the masks again for other gate / clustering / post-processing settings (`cldf.redecide.Redecider`),
        from the run's cache (no network), on a worker thread; `pollRedecision` shows the newest once ready."""
        if not self.finished or self.result is None:
            raise RuntimeError("only a finished run can be re-decided")
        if self.byStudent:
            raise RuntimeError(STUDENT_NOT_REDECIDED)
        with self._lock:
            self._asked += 1
            token = self._asked
        threading.Thread(target=self._decide, args=(token, cluster, postprocess), name="CLDF re-decision",
                         daemon=True).start()

    def _decide(self, token: int, cluster, postprocess) -> None:
        with self._deciding:  # one at a time; a request overtaken by a newer one is skipped
            if token != self._asked:
                return
            try:
                self._decisions.put((token, cluster, self._currentRedecider().mask(cluster, postprocess), None))
            except BaseException as error:
                self._decisions.put((token, cluster, None, error))

    def pollRedecision(self) -> np.ndarray | None:
        """Main thread: show the newest re-decided mask once it is ready and return it (``(Z, Y, X)``, unrefined);
        None while there is none to show. Raises the re-decision's error."""
        latest = None
        while not self._decisions.empty():
            latest = self._decisions.get_nowait()
        if latest is None or latest[0] != self._asked or self.result is None:
            return None
        token, cluster, mask, error = latest
        self._shown = token
        if error is not None:
            raise error
        self._engine.result.mask = mask
        self._presenceThreshold = cluster.presence_threshold
        setSegmentMask(self.result.segmentation, self.result.segmentId, mask, self._grid)
        self._updateChart()
        return mask

    def redecide(self, cluster, postprocess) -> np.ndarray:
        """`requestRedecision` and wait for its mask (scripts and tests; the module polls instead)."""
        self.requestRedecision(cluster, postprocess)
        while (mask := self.pollRedecision()) is None:
            time.sleep(0.005)
        return mask

    def _currentRedecider(self):
        with self._lock:
            if self._redecider is None or self._redecider.cancelled:
                self._redecider = self._newRedecider()
            return self._redecider

    def _newRedecider(self):
        from cldf.redecide import Redecider

        return Redecider(self._engine.segmenter, self._engine.result, self._engine.decoder_seed)

    # ------------------------------------------------------------------ the nodes
    def _update(self, start: int, stop: int) -> None:
        if stop <= start or self.result is None:
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

    def _finish(self) -> None:
        # the engine's whole-volume rule may have changed any slice: the segment gets the final mask once more
        setSegmentMask(self.result.segmentation, self.result.segmentId, self._engine.result.mask, self._grid)
        self._updateChart()
        self.finished = True
        removeNodes(earlierOutputs(self._input, exclude=self.result.nodes))
        for node in self.result.nodes:
            node.SetAttribute(COMPLETE, "true")

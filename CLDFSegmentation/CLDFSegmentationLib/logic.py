"""CLDFSegmentationLogic: everything the module does, without Qt, usable from Slicer's Python console."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import slicer

from cldf.defaults import BATCH_SIZE, TARGET_COLOR, TARGET_NAME  # plain constants: no torch

from . import display
from .chart import addSliceChart, chartSeries, updateSliceLabels
from .labels import sliceLabels
from .job import CLDFSegmentationJob, CLDFSegmentationResult, showResult
from .nodes import (addVolumeLike, checkVolumeNode, imageFromVolume, nodeIDs, placeBeside, removeNodesAddedSince,
                    tagOutput)
from .segmentations import addSegmentation, exportLabelmap


class CLDFSegmentationLogic:
    """Segment volumes in ``slicer.mrmlScene`` with a CLDF model bundle.

    Example::

        logic = CLDFSegmentationLogic()
        job = logic.start(inputVolumes={"FLAIR": flair, "T1": t1}, bundlePath=path)
        while job.step():
            print(job.progress)
        logic.exportLabelmap(job.result.segmentation, referenceVolume=flair, path="mask.nii.gz")
    """

    def start(self, inputVolumes: dict, bundlePath: str | os.PathLike, device: str = "auto",
              batchSize: int = BATCH_SIZE, decoderSeed: int = 0, show: bool = True,
              refine: str | None = None, keepCache: bool = True) -> CLDFSegmentationJob:
        """Check the inputs against the bundle, create the output nodes and return a stepwise job.

        ``refine``: ``"sam"`` or ``"none"`` overrides the bundle's mask refinement (None: the bundle's choice).
        ``keepCache``: keep every slice's pixel embeddings (about 0.26 MB a slice) so that
        `CLDFSegmentationJob.redecide` can change the gate threshold or the clustering in under a second.

        Inputs that do not fit the bundle (channel names, grids, 2D, empty,
        NaN) and bundles that fail verification are refused with a
        ``ValueError`` (``FileNotFoundError`` for a missing bundle) before any
        node is created.
        """
        from cldf.bundle import load_bundle  # torch is imported only when a run starts
        from cldf.segment import Segmenter

        for channel, node in inputVolumes.items():
            checkVolumeNode(node, channel)
        bundle = load_bundle(bundlePath)
        images = {channel: imageFromVolume(node) for channel, node in inputVolumes.items()}
        segmenter = Segmenter(bundle, device, batchSize, refine=refine)
        engineJob = segmenter.start_images(images, decoderSeed, keep_cache=keepCache)
        reference = inputVolumes[bundle.channels[0]]
        before = nodeIDs()
        try:
            result = self._createOutputs(reference, bundle, segmenter, decoderSeed, engineJob.total)
        except Exception:
            removeNodesAddedSince(before)
            raise
        if show:
            showResult(result, reference, "cam", opacity=display.DEFAULT_OPACITY)
        return CLDFSegmentationJob(engineJob, reference, result)

    def process(self, inputVolumes: dict, bundlePath: str | os.PathLike, device: str = "auto",
                batchSize: int = BATCH_SIZE, decoderSeed: int = 0, show: bool = True,
                refine: str | None = None) -> CLDFSegmentationResult:
        """`start` and step to the end."""
        return self.start(inputVolumes, bundlePath, device, batchSize, decoderSeed, show, refine).run()

    @staticmethod
    def exportLabelmap(segmentation, referenceVolume, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the segmentation as a .nii.gz / .nii / .nrrd label map on the reference's grid, atomically."""
        return exportLabelmap(segmentation, referenceVolume, path, overwrite)

    @staticmethod
    def showMap(result: CLDFSegmentationResult, inputVolume, which: str = "cam", opacity: float | None = None) -> None:
        """Switch the overlay: ``cam``, ``meanGradient`` or ``none``."""
        showResult(result, inputVolume, which, opacity)

    @staticmethod
    def setOverlayOpacity(opacity: float) -> None:
        display.setOverlayOpacity(opacity)

    @staticmethod
    def _createOutputs(reference, bundle, segmenter, decoderSeed: int, slices: int) -> CLDFSegmentationResult:
        import torch

        from cldf import __version__

        task = bundle.card.get("task", {})
        provenance = {
            "Bundle": bundle.id, "BundlePath": str(bundle.path), "Device": str(segmenter.device),
            "DecoderSeed": decoderSeed, "NoiseSeed": bundle.config.maps.noise_seed,
            "Versions": f"cldf {__version__}, torch {torch.__version__}",
        }
        name = reference.GetName()
        cam = addVolumeLike(reference, f"{name} CAM")
        meanGradient = addVolumeLike(reference, f"{name} mean gradient")
        segmentation, segmentId = addSegmentation(reference, f"{name} {task.get('target', TARGET_NAME)}",
                                                  str(task.get("target", TARGET_NAME)),
                                                  tuple(task.get("color", TARGET_COLOR)))
        seeds = addVolumeLike(reference, f"{name} seeds", "vtkMRMLLabelMapVolumeNode", np.uint8)  # 1 fg, 2 bg
        table, chart = addSliceChart(name, slices)
        updateSliceLabels(table, sliceLabels(reference))  # weak labels the user made on this input, if any
        for node, role in ((cam, "cam"), (meanGradient, "meanGradient"), (segmentation, "segmentation"),
                           (seeds, "seeds"),
                           (table, "table"), (chart, "chart"), *((s, "chartSeries") for s in chartSeries(chart))):
            tagOutput(node, role, reference, provenance)
            placeBeside(node, reference)
        for node in (cam, meanGradient):
            display.styleMap(node)
        return CLDFSegmentationResult(cam, meanGradient, segmentation, segmentId, np.zeros(slices, np.float32),
                                      table, chart, seeds)


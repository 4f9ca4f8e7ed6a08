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
from .nodes import (addVolumeLike, checkVolumeNode, gridNode, imageFromVolume, nodeIDs, placeBeside,
                    removeNodesAddedSince, tagOutput)
from .segmentations import addToScene, exportLabelmap, newSegmentation


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

        Slices are cut along the bundle's axes: an input stored in another orientation is reoriented to the
        bundle's (axes permuted and flipped, no resampling), and the maps and the segmentation lie on that grid,
        in the same place; `exportLabelmap` with the input as reference writes on the input's own grid.
        ``refine``: ``"sam"`` or ``"none"`` overrides the bundle's mask refinement (None: the bundle's choice).
        ``keepCache``: keep every slice's pixel embeddings (about 0.26 MB a slice) so that
        `CLDFSegmentationJob.redecide` can change the gate threshold or the clustering in under a second.

        Every check runs before any node is added, and a failed start leaves the scene as it was: inputs
        that do not fit the bundle (channel names, grids, 2D, empty, constant, NaN, a label map, a
        non-identity parent transform) and bundles that fail verification are refused with a
        ``ValueError`` (``FileNotFoundError`` for a missing bundle).
        """
        from cldf.bundle import load_bundle  # torch is imported only when a run starts
        from cldf.segment import Segmenter

        for channel, node in inputVolumes.items():
            checkVolumeNode(node, channel)
        bundle = load_bundle(bundlePath)
        images = {channel: imageFromVolume(node) for channel, node in inputVolumes.items()}
        segmenter = Segmenter(bundle, device, batchSize, refine=refine)
        engineJob = segmenter.start_images(images, decoderSeed, keep_cache=keepCache, reorient=True)
        reference = inputVolumes[bundle.channels[0]]
        grid = _engineGrid(reference, images[bundle.channels[0]], engineJob.result.reference)
        labels = sliceLabels(reference)  # weak labels the user made on this input, if any
        task = bundle.card.get("task", {})
        target = str(task.get("target", TARGET_NAME))
        segmentation = newSegmentation(grid, f"{reference.GetName()} {target}", target,
                                       tuple(task.get("color", TARGET_COLOR)))
        before = nodeIDs()
        try:
            result = self._createOutputs(reference, grid, bundle, segmenter, decoderSeed, engineJob.total,
                                         segmentation, labels, images[bundle.channels[0]])
            if show:
                showResult(result, reference, "cam", opacity=display.DEFAULT_OPACITY)
        except Exception:
            removeNodesAddedSince(before)
            raise
        return CLDFSegmentationJob(engineJob, reference, result, grid)

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
    def _createOutputs(reference, grid, bundle, segmenter, decoderSeed: int, slices: int, segmentation: tuple,
                       labels: np.ndarray, inputImage) -> CLDFSegmentationResult:
        """Add the output nodes of the input ``reference``, the maps on the engine's ``grid`` (`_engineGrid`),
        ``segmentation`` (a `newSegmentation` and its segment ID) among them."""
        import torch

        from cldf import __version__
        from cldf.orientation import slice_order

        provenance = {
            "Bundle": bundle.id, "BundlePath": str(bundle.path), "Device": str(segmenter.device),
            "DecoderSeed": decoderSeed, "NoiseSeed": bundle.config.maps.noise_seed,
            "Versions": f"cldf {__version__}, torch {torch.__version__}",
        }
        name = reference.GetName()
        cam = addVolumeLike(reference, f"{name} CAM", grid=grid)
        meanGradient = addVolumeLike(reference, f"{name} mean gradient", grid=grid)
        segmentationNode, segmentId = segmentation
        addToScene(segmentationNode, reference)
        seeds = addVolumeLike(reference, f"{name} seeds", "vtkMRMLLabelMapVolumeNode", np.uint8,  # 1 fg, 2 bg
                              grid=grid)
        orientation = "" if grid is reference else bundle.config.data.orientation
        table, chart = addSliceChart(name, slices, slice_order(inputImage, orientation), orientation)
        updateSliceLabels(table, labels)
        for node, role in ((cam, "cam"), (meanGradient, "meanGradient"), (segmentationNode, "segmentation"),
                           (seeds, "seeds"),
                           (table, "table"), (chart, "chart"), *((s, "chartSeries") for s in chartSeries(chart))):
            tagOutput(node, role, reference, provenance)
            placeBeside(node, reference)
        for node in (cam, meanGradient):
            display.styleMap(node)
        return CLDFSegmentationResult(cam, meanGradient, segmentationNode, segmentId, np.zeros(slices, np.float32),
                                      table, chart, seeds)


def _engineGrid(inputNode, inputImage, engineImage):
    """The node on whose grid the engine's arrays lie: the input itself when the bundle's orientation is the
    input's, else a `gridNode` of the input reoriented to it (the same voxels, axes permuted and flipped)."""
    from cldf.orientation import orientation_of

    return inputNode if orientation_of(engineImage) == orientation_of(inputImage) else gridNode(engineImage)

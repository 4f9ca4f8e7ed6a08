"""CLDFSegmentationLogic: everything the module does, without Qt, usable from Slicer's Python console."""

from __future__ import annotations

import os
from pathlib import Path

from cldf.defaults import BATCH_SIZE, DEVICE  # plain constants: no torch

from . import display
from .bundles import bundleCard
from .job import CLDFSegmentationJob, RunRequest
from .labels import sliceLabels
from .nodes import checkStoredValues, checkVolumeNode, imageFromVolume
from .parameters import CLDFSegmentationParameterNode, moduleParameterNode
from .runoutputs import CLDFSegmentationResult, showResult
from .segmentations import exportLabelmap


class CLDFSegmentationLogic:
    """Segment volumes in ``slicer.mrmlScene`` with a CLDF model bundle.

    Example::

        logic = CLDFSegmentationLogic()
        job = logic.start(inputVolumes={"FLAIR": flair, "T1": t1}, bundlePath=path)
        while job.step():  # the first step loads the bundle, each further one segments a batch of slices
            print(job.progress)
        logic.exportLabelmap(job.result.segmentation, referenceVolume=flair, path="mask.nii.gz")
    """

    def getParameterNode(self) -> CLDFSegmentationParameterNode:
        """The module's typed parameter node in ``slicer.mrmlScene`` (made when there is none)."""
        return moduleParameterNode()

    def start(self, inputVolumes: dict, bundlePath: str | os.PathLike, device: str = DEVICE,
              batchSize: int = BATCH_SIZE, decoderSeed: int = 0, show: bool = True,
              refine: str | None = None, keepCache: bool = True, segmenter: str = "bundle",
              overlays: bool = True) -> CLDFSegmentationJob:
        """Check the inputs that can be checked at once and return a run that has not loaded anything yet.

        This reads the bundle's card (cached) and copies the input voxels; loading the bundle (verifying its
        weights, building its networks, LiteMedSAM when refining) happens at the run's first `step` or on its
        worker (`CLDFSegmentationJob.startInBackground`), and so do the checks of the voxels against the bundle.
        Slices are cut along the bundle's axes: an input stored in another orientation is reoriented to the
        bundle's (axes permuted and flipped, no resampling), and the maps and the segmentation lie on that grid,
        in the same place; `exportLabelmap` with the input as reference writes on the input's own grid.
        ``refine``: ``"sam"`` or ``"none"`` overrides the bundle's mask refinement (None: the bundle's choice).
        ``segmenter``: ``"cldf"``, ``"student"`` (the bundle's U-Net trained on CLDF's masks) or ``"bundle"`` (the
        one its validation patients chose); ``overlays``: a student also computes the CAM and mean-gradient maps
        (without them their nodes stay empty).
        ``keepCache``: keep every slice's pixel embeddings (about 0.26 MB a slice) so that the gate threshold or
        the clustering can be changed afterwards (`CLDFSegmentationJob.requestRedecision`) without the networks.

        No node is added before every check has passed, and a refused run leaves the scene as it was: nodes
        that are no usable volume (a label map, empty, under a transform not applied to its voxels, loaded from a
        NIfTI file whose NaN voxels Slicer's reader made 0) and slice labels that do not fit raise here; channel names, grids, 2D, constant or NaN voxels and bundles that fail
        verification raise from `step` / `poll` (``ValueError``; ``FileNotFoundError`` for a missing bundle).
        """
        card = bundleCard(bundlePath)
        for channel, node in inputVolumes.items():
            checkVolumeNode(node, channel)
            checkStoredValues(node, channel)
        reference = inputVolumes.get(card.channels[0])
        labels = sliceLabels(reference) if reference is not None else None  # weak labels made on this input
        images = {channel: imageFromVolume(node) for channel, node in inputVolumes.items()}
        return CLDFSegmentationJob(RunRequest(card, dict(inputVolumes), images, labels, device, batchSize,
                                              decoderSeed, refine, keepCache, show, segmenter, overlays))

    def process(self, inputVolumes: dict, bundlePath: str | os.PathLike, device: str = DEVICE,
                batchSize: int = BATCH_SIZE, decoderSeed: int = 0, show: bool = True,
                refine: str | None = None, segmenter: str = "bundle", overlays: bool = True) -> CLDFSegmentationResult:
        """`start` and step to the end."""
        return self.start(inputVolumes, bundlePath, device, batchSize, decoderSeed, show, refine,
                          segmenter=segmenter, overlays=overlays).run()

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

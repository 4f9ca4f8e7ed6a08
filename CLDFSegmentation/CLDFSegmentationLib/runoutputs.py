"""A run's output nodes: made on the main thread once the worker has loaded the bundle, all or none.

The maps lie on the grid the engine cuts: the input's exact geometry, or the input
reoriented to the bundle's orientation (the same voxels, axes permuted and flipped)
when it is stored in another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cldf.defaults import OVERLAY_OPACITY  # plain constants: no torch

from . import display
from .chart import addSliceChart, chartSeries, updateSliceLabels
from .nodes import addVolumeLike, gridNode, nodeIDs, placeBeside, removeNodesAddedSince, tagOutput
from .segmentations import addToScene, newSegmentation


@dataclass
class CLDFSegmentationResult:
    """The run's output nodes and the per-slice presence probabilities."""

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


def createOutputs(engineJob, card, inputNodes: dict, images: dict, labels: np.ndarray | None, show: bool):
    """The output nodes of a loaded engine job (`cldf.segment.SegmentationJob`) on the input of the bundle's first
    channel, its segment named and coloured as the bundle's ``card`` (`cldf.card.CardSummary`) says; returns
    ``(result, grid)``, the grid being the node on whose geometry the engine's arrays lie.

    Nothing is left in the scene when this raises.
    """
    import torch

    from cldf import __version__
    from cldf.hounsfield import describe
    from cldf.orientation import slice_order
    from cldf.terminology import slicer_entry

    segmenter = engineJob.segmenter
    bundle = segmenter.bundle
    first = bundle.channels[0]
    reference = inputNodes[first]
    grid = _engineGrid(reference, images[first], engineJob.result.reference)
    segmentation = newSegmentation(grid, f"{reference.GetName()} {card.target}", card.target, card.color,
                                   slicer_entry(card.code) if card.code else "")
    provenance = {"Bundle": bundle.id, "BundlePath": str(bundle.path), "Device": str(segmenter.device),
                  "Segmenter": engineJob.kind,
                  **({"DecoderSeed": engineJob.decoder_seed} if engineJob.kind == "cldf" else {}),
                  "NoiseSeed": bundle.config.maps.noise_seed, "Intensities": describe(engineJob.intensities),
                  "Versions": f"cldf {__version__}, torch {torch.__version__}"}
    orientation = "" if grid is reference else bundle.config.data.orientation
    before = nodeIDs()
    try:
        result = _addNodes(reference, grid, segmentation, engineJob.total, provenance,
                           slice_order(images[first], orientation), orientation, labels)
        if show:
            showResult(result, reference, "cam", opacity=OVERLAY_OPACITY)
    except Exception:
        removeNodesAddedSince(before)
        raise
    return result, grid


def _addNodes(reference, grid, segmentation: tuple, slices: int, provenance: dict, inputSlices, orientation: str,
              labels: np.ndarray | None) -> CLDFSegmentationResult:
    name = reference.GetName()
    cam = addVolumeLike(reference, f"{name} CAM", grid=grid)
    meanGradient = addVolumeLike(reference, f"{name} mean gradient", grid=grid)
    segmentationNode, segmentId = segmentation
    addToScene(segmentationNode, reference)
    seeds = addVolumeLike(reference, f"{name} seeds", "vtkMRMLLabelMapVolumeNode", np.uint8, grid=grid)  # 1 fg, 2 bg
    table, chart = addSliceChart(name, slices, inputSlices, orientation)
    if labels is not None:
        updateSliceLabels(table, labels)
    for node, role in ((cam, "cam"), (meanGradient, "meanGradient"), (segmentationNode, "segmentation"),
                       (seeds, "seeds"), (table, "table"), (chart, "chart"),
                       *((s, "chartSeries") for s in chartSeries(chart))):
        tagOutput(node, role, reference, provenance)
        placeBeside(node, reference)
    for node in (cam, meanGradient):
        display.styleMap(node)
    return CLDFSegmentationResult(cam, meanGradient, segmentationNode, segmentId, np.zeros(slices, np.float32),
                                  table, chart, seeds)


def _engineGrid(inputNode, inputImage, engineImage):
    """The input itself when the bundle's orientation is the input's, else a `gridNode` of the input reoriented to
    it (the same voxels, axes permuted and flipped)."""
    from cldf.orientation import orientation_of

    return inputNode if orientation_of(engineImage) == orientation_of(inputImage) else gridNode(engineImage)


def showResult(result: CLDFSegmentationResult, inputNode, which: str = "cam", opacity: float | None = None) -> None:
    """Show one map (``cam``, ``meanGradient`` or ``none``) over the input, and the segmentation."""
    maps = {"cam": result.camVolume, "meanGradient": result.meanGradientVolume, "none": None}
    if which not in maps:
        raise ValueError(f"map must be one of {sorted(maps)}, not '{which}'")
    display.showMap(maps[which], backgroundNode=inputNode, opacity=opacity)
    result.segmentation.GetDisplayNode().SetVisibility(True)

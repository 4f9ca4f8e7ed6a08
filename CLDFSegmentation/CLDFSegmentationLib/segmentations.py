"""The mask as a segmentation node, and its export as a label map file, written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .nodes import ijkToRas, nodeIDs, removeNodes, removeNodesAddedSince

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")

_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
_NO_REGION = "~^^~Anatomic codes - DICOM master list~^^~^^"
#: Standard terminology (SNOMED CT codes, Slicer's "TerminologyEntry" tag) of the shipped bundles' targets
TERMINOLOGY = {
    "kidney": f"{_ANATOMY}~SCT^64033007^Kidney{_NO_REGION}",
    "spleen": f"{_ANATOMY}~SCT^78961009^Spleen{_NO_REGION}",
    "liver": f"{_ANATOMY}~SCT^10200004^Liver{_NO_REGION}",
    "tumour": ("Segmentation category and type - 3D Slicer General Anatomy list"
               "~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^"
               "~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^"),
}


def addSegmentation(reference, name: str, segmentName: str, color: tuple[int, int, int]):
    """A segmentation node with one empty segment (named and coloured explicitly) on the reference's grid.

    Returns:
        the node and the segment's ID.
    """
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    segmentId = node.GetSegmentation().AddEmptySegment("", segmentName, [c / 255.0 for c in color])
    if segmentName.lower() in TERMINOLOGY:  # a target of its own name keeps just its name and colour
        node.GetSegmentation().GetSegment(segmentId).SetTag("TerminologyEntry", TERMINOLOGY[segmentName.lower()])
    return node, segmentId


def setSegmentMask(node, segmentId: str, mask: np.ndarray, reference) -> None:
    """Replace the segment's voxels with a ``(Z, Y, X)`` 0/1 array on the reference's grid."""
    _writeSegment(node, segmentId, mask, reference, 0, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)


def addSegmentSlices(node, segmentId: str, mask: np.ndarray, reference, start: int, stop: int) -> None:
    """Add slices ``start:stop`` of a ``(Z, Y, X)`` 0/1 array to the segment (the rest is untouched).

    Only those slices are sent, so filling a volume batch by batch costs the volume once in all.
    """
    if stop > start:
        _writeSegment(node, segmentId, mask[start:stop], reference, start,
                      slicer.vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MAX)


def _writeSegment(node, segmentId: str, slab: np.ndarray, reference, firstSlice: int, mode: int) -> None:
    """Slices ``firstSlice ...`` of the reference's grid, given as a ``(z, Y, X)`` slab, into the segment."""
    image = vtk.vtkImageData()
    z, y, x = slab.shape
    image.SetExtent(0, x - 1, 0, y - 1, firstSlice, firstSlice + z - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = (slab > 0).astype(np.uint8).ravel()
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(image)
    oriented.SetImageToWorldMatrix(ijkToRas(reference))
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(oriented, node, segmentId, mode):
        raise RuntimeError(f"could not write the mask into segment '{segmentId}' of '{node.GetName()}'")


def addLabelmap(segmentation, reference, name: str):
    """A new label map volume node of the segmentation on exactly the reference's grid."""
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentation().GetSegmentIDs(ids)
    exporter = slicer.vtkSlicerSegmentationsModuleLogic
    if not exporter.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, reference,
                                                 slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
        removeNodes([labelmap])
        raise RuntimeError(f"exporting '{segmentation.GetName()}' to a label map failed")
    return labelmap


def exportLabelmap(segmentation, reference, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the segmentation as a label map (segment 1, 2, ... = 1, 2, ...) on the reference's grid.

    The file is written to a temporary name beside ``path`` and renamed, so a
    failure never leaves a half-written file; an existing file is refused
    unless ``overwrite``.
    """
    path = Path(path)
    suffix = next((s for s in LABELMAP_SUFFIXES if path.name.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"label maps are written as {', '.join(LABELMAP_SUFFIXES)}; '{path.name}' has none of these")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder not found: {path.parent}; create it first or choose another")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    before = nodeIDs()
    labelmap = addLabelmap(segmentation, reference, "__CLDF export__")
    tmpDir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = os.path.join(tmpDir, "labelmap" + suffix)
    try:
        storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(tmp)
        storage.SetUseCompression(True)
        if not storage.WriteData(labelmap):
            raise OSError(f"could not write {path}")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpDir, ignore_errors=True)
        removeNodesAddedSince(before)
    return path

"""The mask as a segmentation node, and its export as a label map file, written atomically."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .nodes import ijkToRas, nodeIDs, removeNodes, removeNodesAddedSince

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")

def newSegmentation(reference, name: str, segmentName: str, color: tuple[int, int, int], terminology: str = ""):
    """A segmentation node, not yet in the scene, with one empty segment (named and coloured explicitly) on the
    reference's grid; a first, empty slice is written into it, so a segment that cannot be filled fails here.

    ``terminology``: the segment's standard codes as Slicer's terminology entry (`cldf.terminology.slicer_entry`);
    empty for a bundle whose card records none.

    Returns:
        the node and the segment's ID.
    """
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(slicer.mrmlScene.GenerateUniqueName(name))
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentId = node.GetSegmentation().AddEmptySegment("", segmentName, [c / 255.0 for c in color])
    if not segmentId:
        raise RuntimeError(f"the segment '{segmentName}' could not be created in '{name}'")
    if terminology:
        node.GetSegmentation().GetSegment(segmentId).SetTerminology(terminology)
    x, y, _ = reference.GetImageData().GetDimensions()
    _writeSegment(node, segmentId, np.zeros((1, y, x), np.uint8), reference, 0,
                  slicer.vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MAX)
    return node, segmentId


def addToScene(segmentation, reference) -> None:
    """Add a `newSegmentation` to the scene, displayed, under the reference's transform."""
    slicer.mrmlScene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(reference.GetTransformNodeID())


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

    The file is written to a temporary name beside ``path``, checked (not
    empty, read back voxel for voxel) and only then moved into place, so a
    failure (full disk, read-only folder) raises an ``OSError`` that says what
    to do and leaves an earlier file at ``path`` as it was. An existing file is
    refused unless ``overwrite``.
    """
    path = Path(path)
    suffix = next((s for s in LABELMAP_SUFFIXES if path.name.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"label maps are written as {', '.join(LABELMAP_SUFFIXES)}; '{path.name}' has none of these")
    checkTarget(path, overwrite)
    before = nodeIDs()
    tmpDir = None
    try:
        labelmap = addLabelmap(segmentation, reference, "__CLDF export__")
        tmpDir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
        tmp = os.path.join(tmpDir, "labelmap" + suffix)
        writeVolumeFile(labelmap, tmp)
        _checkWritten(tmp, slicer.util.arrayFromVolume(labelmap))
        if not overwrite and path.exists():  # made while this was writing
            raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
        os.replace(tmp, path)
    except FileExistsError:
        raise
    except OSError as error:
        kept = "the file already there is unchanged" if path.exists() else "nothing was written there"
        failure = OSError(f"the label map could not be written to {path}: {_reason(error)}; {kept}")
        failure.errno = error.errno
        raise failure from error
    finally:
        if tmpDir is not None:
            shutil.rmtree(tmpDir, ignore_errors=True)
        removeNodesAddedSince(before)
    return path


def checkTarget(path: Path, overwrite: bool) -> None:
    """Refuse a target below a missing folder or a file, a folder itself, or (unless ``overwrite``) an existing file."""
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {existing} is a file, not a folder; choose another folder")
    if existing != path.parent:
        raise FileNotFoundError(f"folder not found: {path.parent}; create it first or choose another")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; choose a file name inside it")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")


def writeVolumeFile(node, path: str) -> None:
    """Write a volume node to ``path`` (format from the suffix, compressed) through a storage node."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(True)
    if not storage.WriteData(node):
        messages = storage.GetUserMessages().GetAllMessagesAsString().strip()
        raise OSError(f"the writer failed{': ' + messages if messages else ''}")


def _checkWritten(path: str, expected: np.ndarray) -> None:
    """A written file must be there, not empty, and read back as the voxels that were written."""
    if not os.path.isfile(path):
        raise OSError(errno.EIO, "the writer reported success but wrote no file")
    if os.path.getsize(path) == 0:
        raise OSError(errno.ENOSPC, "the file came out empty (0 bytes), as it does when the disk is full")
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    try:
        written = sitk.GetArrayFromImage(sitk.ReadImage(path))
    except RuntimeError as error:
        raise OSError(errno.EIO, f"the file does not read back ({error})") from error
    if written.shape != expected.shape or not np.array_equal(written, expected):
        raise OSError(errno.EIO, "the file does not read back as the voxels written")


def _reason(error: OSError) -> str:
    """What went wrong, and what to do."""
    what = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return f"{what}. Free some space or choose another drive"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}. Choose a folder you may write to"
    return f"{what}. Choose another folder or check the disk"

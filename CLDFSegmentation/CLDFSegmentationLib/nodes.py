"""MRML volume nodes <-> SimpleITK images, output nodes on a given grid, bookkeeping attributes.

Slicer stores geometry in RAS; SimpleITK (and the `cldf` engine) in LPS. The
conversion lives here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

#: Node attributes written on every output (see `tagOutput`).
ATTRIBUTE_PREFIX = "CLDF."
ROLE = ATTRIBUTE_PREFIX + "Role"
INPUT_ID = ATTRIBUTE_PREFIX + "InputVolumeID"
COMPLETE = ATTRIBUTE_PREFIX + "Complete"

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def checkVolumeNode(node, channel: str) -> None:
    """Refuse what is not a scalar volume with image data, or is moved by a transform not applied to its voxels."""
    if node is None:
        raise ValueError(f"no volume selected for channel '{channel}'")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"channel '{channel}': '{node.GetName()}' is a {node.GetClassName()}, not a scalar volume")
    if node.GetImageData() is None:
        raise ValueError(f"channel '{channel}': volume '{node.GetName()}' holds no image data")
    transform = node.GetParentTransformNode()
    if transform is not None and not _isIdentity(transform):
        raise ValueError(
            f"channel '{channel}': volume '{node.GetName()}' is under the transform '{transform.GetName()}', which is "
            "not applied to its voxels; harden it first (Data module: right-click the volume > Harden transform) "
            "so that it is segmented where it is shown")


def checkStoredValues(node, channel: str) -> None:
    """Refuse a volume whose NIfTI file holds NaN or infinite voxels, which Slicer's reader loaded as 0: the file
    is read as stored while the node is unchanged since it was loaded (an edited node is taken as it is)."""
    storage = node.GetStorageNode()
    if storage is None or not storage.GetFileName() or node.GetModifiedSinceRead():
        return
    path = Path(storage.GetFileName())
    if not path.name.lower().endswith((".nii", ".nii.gz")) or not path.is_file():
        return
    from cldf.images import check_nifti_data

    try:
        check_nifti_data(path, channel)
    except ValueError as e:
        raise ValueError(f"{e} (volume '{node.GetName()}': Slicer shows them as 0)") from None


def _isIdentity(transform) -> bool:
    """True for a linear transform (to the world, parents included) that moves nothing."""
    if not transform.IsTransformToWorldLinear():
        return False
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return np.allclose(slicer.util.arrayFromVTKMatrix(matrix), np.eye(4), atol=1e-6)


def imageFromVolume(node) -> sitk.Image:
    """A SimpleITK image with the node's voxels and geometry (LPS), one component per voxel or more."""
    array = slicer.util.arrayFromVolume(node)
    components = node.GetImageData().GetNumberOfScalarComponents()
    image = sitk.GetImageFromArray(np.array(array), isVector=components > 1)
    if image.GetDimension() == 2:  # a single slice read as (J, I): keep it 3D so the engine names the problem
        image = sitk.JoinSeries(image)
    directions = np.zeros((3, 3))
    node.GetIJKToRASDirections(directions)
    image.SetSpacing(node.GetSpacing())
    image.SetOrigin(tuple(_RAS_TO_LPS @ np.array(node.GetOrigin())))
    image.SetDirection(tuple((_RAS_TO_LPS @ directions).flatten()))
    return image


def gridNode(image: sitk.Image):
    """A volume node, not in the scene and without voxels, on the image's grid (its size and geometry, in RAS):
    the inverse of `imageFromVolume`'s geometry."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("grid")
    data = vtk.vtkImageData()
    data.SetDimensions(image.GetSize())
    node.SetAndObserveImageData(data)
    node.SetSpacing(image.GetSpacing())
    node.SetOrigin(tuple(_RAS_TO_LPS @ np.array(image.GetOrigin())))
    node.SetIJKToRASDirections(_RAS_TO_LPS @ np.array(image.GetDirection()).reshape(3, 3))
    return node


def addVolumeLike(reference, name: str, className: str = "vtkMRMLScalarVolumeNode", dtype=np.float32,
                  grid=None):
    """A new volume node of zeros on exactly the grid of ``grid`` (default: the reference's), under the
    reference's transform."""
    grid = reference if grid is None else grid
    node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
    node.CopyOrientation(grid)
    dims = grid.GetImageData().GetDimensions()
    slicer.util.updateVolumeFromArray(node, np.zeros(dims[::-1], dtype))
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    return node


def writeSlices(node, array: np.ndarray, start: int, stop: int) -> None:
    """Copy slices ``start:stop`` of a ``(Z, Y, X)`` array into the node and notify its viewers."""
    slicer.util.arrayFromVolume(node)[start:stop] = array[start:stop]
    slicer.util.arrayFromVolumeModified(node)


def placeBeside(node, sibling) -> None:
    """Put ``node`` in the data tree under the same parent (the study) as ``sibling``."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    siblingItem = sh.GetItemByDataNode(sibling)
    parent = sh.GetItemParent(siblingItem) if siblingItem else sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def tagOutput(node, role: str, inputNode, provenance: dict[str, str]) -> None:
    """Mark a node as this module's output for ``inputNode``, with what produced it."""
    node.SetAttribute(ROLE, role)
    node.SetAttribute(INPUT_ID, inputNode.GetID())
    node.SetAttribute(COMPLETE, "false")
    for key, value in provenance.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))


def earlierOutputs(inputNode, exclude: list) -> list:
    """Completed outputs of earlier runs on ``inputNode`` (never nodes the user made)."""
    excluded = {n.GetID() for n in exclude}
    found = []
    collection = slicer.mrmlScene.GetNodes()
    for i in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(i)
        if (node.GetAttribute(INPUT_ID) == inputNode.GetID() and node.GetAttribute(COMPLETE) == "true"
                and node.GetID() not in excluded):
            found.append(node)
    return found


def nodeIDs() -> set[str]:
    collection = slicer.mrmlScene.GetNodes()
    return {collection.GetItemAsObject(i).GetID() for i in range(collection.GetNumberOfItems())}


def removeNodesAddedSince(before: set[str]) -> None:
    """Remove every node that is not in ``before`` (temporary nodes and what they brought, e.g. colour tables)."""
    removeNodes([slicer.mrmlScene.GetNodeByID(i) for i in nodeIDs() - before])


def removeNodes(nodes: list) -> None:
    """Remove nodes with their display and storage nodes."""
    scene = slicer.mrmlScene
    for node in nodes:
        if node is None or scene.GetNodeByID(node.GetID()) is None:
            continue
        helpers = []
        if node.IsA("vtkMRMLDisplayableNode"):
            helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and scene.GetNodeByID(helper.GetID()) is not None:
                scene.RemoveNode(helper)


def ijkToRas(node) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix

"""Outside the Slicer application (tests, scripts, README screenshots): a working scene and slice rendering.

The slicer-core wheel gives real MRML; these helpers add what the application
would otherwise provide: the logics that populate colour tables and handle
segmentations, and a slice view rendered through `vtkMRMLSliceLogic`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support


@contextlib.contextmanager
def _vtkErrorsHidden():
    shown = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(shown)


def setUpScene(scene=None):
    """Make ``scene`` (default: a new one) ``slicer.mrmlScene`` with the logics MRML needs outside the application.

    Inside Slicer this is never needed; tests, scripts and the screenshot
    renderer use it with the slicer-core wheel.
    """
    scene = scene if scene is not None else slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    with _vtkErrorsHidden():  # the wheel has no default color files, which only the application has; said as an ERR
        colors.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLApplicationLogic(app)
    segmentations.SetMRMLScene(scene)
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    scene._cldfLogics = (app, colors, segmentations)  # keep them alive as long as the scene
    return scene


def renderSlice(background, foreground=None, label=None, sliceIndex: int | None = None,
                size: int = 256, foregroundOpacity: float = 0.6, path: str | Path | None = None) -> np.ndarray:
    """Blend background + foreground + label layers of one axial slice, as the Red slice view shows them.

    Args:
        background, foreground, label: volume nodes (``label`` a label map volume) or None.
        sliceIndex: axial slice (k index of the background); default: the middle one.
        size: output width and height in pixels.
        path: also write the picture there as PNG.

    Returns:
        ``(size, size, 3)`` uint8 RGB, row 0 at the top of the view.
    """
    scene = slicer.mrmlScene
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(scene._cldfLogics[0])
    logic.SetMRMLScene(scene)
    sliceNode = logic.AddSliceNode("CLDFRender")
    try:
        sliceNode.SetOrientationToAxial()
        sliceNode.SetDimensions(size, size, 1)
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(foregroundOpacity)
        composite.SetLabelVolumeID(label.GetID() if label is not None else None)
        composite.SetLabelOpacity(1.0)
        logic.FitSliceToVolume(background, size, size)
        dims = background.GetImageData().GetDimensions()
        k = dims[2] // 2 if sliceIndex is None else sliceIndex
        ras = [0.0, 0.0, 0.0, 1.0]
        ijkToRas = vtk.vtkMatrix4x4()
        background.GetIJKToRASMatrix(ijkToRas)
        ijkToRas.MultiplyPoint([(dims[0] - 1) / 2, (dims[1] - 1) / 2, k, 1.0], ras)
        sliceNode.JumpSliceByCentering(*ras[:3])
        logic.UpdatePipeline()
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        width, height, _ = image.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        rgb = np.ascontiguousarray(rgba[::-1, :, :3])
        if path is not None:
            writePng(rgb, path)
        return rgb
    finally:
        for node in (logic.GetSliceCompositeNode(), sliceNode):
            if node is not None and scene.GetNodeByID(node.GetID()) is not None:
                scene.RemoveNode(node)


def writePng(rgb: np.ndarray, path: str | Path) -> None:
    """Write an ``(H, W, 3)`` uint8 picture (row 0 at the top) as PNG."""
    height, width, _ = rgb.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = rgb[::-1].reshape(-1, 3)
    writer = vtk.vtkPNGWriter()
    writer.SetInputData(image)
    writer.SetFileName(str(path))
    writer.Write()


def loadVolume(path: str | Path, name: str | None = None, labelmap: bool = False):
    """Read a volume file into a new node through a storage node (``slicer.util.loadVolume`` needs the application)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume file not found: {path}")
    scene = slicer.mrmlScene
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(className, name or path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if labelmap:
        storage.SetCenterImage(False)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise ValueError(f"could not read {path} as a volume")
    node.CreateDefaultDisplayNodes()
    return node

"""A CT in Hounsfield units in the Slicer module (as volumes from DICOM are), on real MRML nodes: it is put through
the abdominal bundle's window, gets the mask of the scan as windowed for training, and the panel says so."""

from __future__ import annotations

import types

import numpy as np
import SimpleITK as sitk
from test_controller import READY, RecordingPanel, UnrefinedLogic, run_to_the_end

from CLDFSegmentationLib import CLDFSegmentationLogic
from CLDFSegmentationLib.controller import CLDFSegmentationController
from CLDFSegmentationLib.headless import loadVolume
from CLDFSegmentationLib.parameters import moduleParameterNode
from conftest import REPO, in_hounsfield

LIVER = REPO / "CLDFSegmentation" / "Resources" / "Models" / "abdomen-ct-liver"
WINDOW = "CT: HU through the window [-125, 275] -> 0..255"


def slab(btcv_root, folder, hounsfield: bool):
    """Slices 10..21 of a real abdominal CT (a validation case), as shipped or in HU, loaded as a volume node."""
    image = sitk.ReadImage(str(btcv_root / "case_24_ct.nii.gz"))[:, :, 10:22]
    if hounsfield:
        hu = sitk.GetImageFromArray(in_hounsfield(sitk.GetArrayFromImage(image)))
        hu.CopyInformation(image)
        image = hu
    path = folder / ("hu.nii.gz" if hounsfield else "levels.nii.gz")
    sitk.WriteImage(image, str(path))
    return loadVolume(path, path.name.split(".")[0])


def segmented(mrml_scene, volume) -> types.SimpleNamespace:
    parameters = moduleParameterNode(mrml_scene)
    parameters.bundlePath, parameters.device = str(LIVER), "cpu"
    parameters.segmenter, parameters.overlays = "student", False
    parameters.setInputVolume(0, volume)
    panel = RecordingPanel()
    controller = CLDFSegmentationController(parameters, UnrefinedLogic(), panel, READY)
    controller.segmentOrCancel()
    run_to_the_end(controller)
    assert not panel.errors, panel.errors
    return types.SimpleNamespace(outputs=parameters.outputs(), status=panel.statuses[-1])


def test_a_ct_in_hu_is_windowed_says_so_on_the_panel_and_gets_the_windowed_scans_mask(mrml_scene, btcv_root,
                                                                                      tmp_path):
    levels = segmented(mrml_scene, slab(btcv_root, tmp_path, hounsfield=False))
    hu = segmented(mrml_scene, slab(btcv_root, tmp_path, hounsfield=True))
    assert WINDOW in hu.status and "unlike" not in hu.status
    assert levels.status == "Segmentation finished"
    assert hu.outputs["segmentation"].GetAttribute("CLDF.Intensities") == WINDOW
    assert levels.outputs["segmentation"].GetAttribute("CLDF.Intensities") == "CT: as given"
    masks = [CLDFSegmentationLogic.exportLabelmap(run.outputs["segmentation"], run.outputs["runInput"],
                                                  tmp_path / f"{name}.nii.gz") for name, run in (("l", levels), ("h", hu))]
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(str(m))) for m in masks]
    assert arrays[0].any()
    np.testing.assert_array_equal(arrays[0], arrays[1])

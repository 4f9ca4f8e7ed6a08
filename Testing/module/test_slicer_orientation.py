"""The Slicer module cuts slices along the bundle's axes: a volume stored in another orientation gives the same
mask in physical space, its outputs lie on its grid reoriented to the bundle's, and its label map on its own grid.

The shipped brain bundle's orientation is LPS (its training scans'); the real patient is stored LPS.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from cldf.metrics import dice
from cldf.orientation import orientation_of
from CLDFSegmentationLib import CLDFSegmentationLogic
from CLDFSegmentationLib.chart import tableColumn
from CLDFSegmentationLib.headless import loadVolume
from CLDFSegmentationLib.labels import markSlices
from CLDFSegmentationLib.nodes import imageFromVolume

SPACING = (0.9, 1.1, 1.5)
ORIGIN = (12.5, -30.0, 40.0)


@pytest.fixture(scope="module")
def stored_as(tumour_case, tmp_path_factory):
    """``{code: {channel: path}}``: slices 9..16 of a real patient (anisotropic spacing, moved origin), stored
    as is (LPS), sagittally (ASR) and with the slice axis flipped (LAI); the voxels are the same.

    Right-handed codes only: Slicer loads a left-handed file (e.g. ASL) with its slice order reversed.
    """
    folder = tmp_path_factory.mktemp("orientations")
    paths: dict[str, dict] = {"LPS": {}, "ASR": {}, "LAI": {}}
    for channel in ("FLAIR", "T1"):
        image = sitk.ReadImage(str(tumour_case[channel]))[:, :, 9:17]  # cropped along the slice axis first
        image.SetSpacing(SPACING)
        image.SetOrigin(ORIGIN)
        for code in paths:
            paths[code][channel] = folder / f"{channel}-{code}.nrrd"
            sitk.WriteImage(sitk.DICOMOrient(image, code), str(paths[code][channel]))
    return paths


def load(paths: dict) -> dict:
    return {channel: loadVolume(path, channel) for channel, path in paths.items()}


def matrix(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def test_a_sagittally_stored_volume_gives_the_same_mask_in_physical_space(mrml_scene, stored_as, brain_bundle,
                                                                          tmp_path):
    logic = CLDFSegmentationLogic()
    axial = load(stored_as["LPS"])
    first = logic.process(axial, brain_bundle, device="cpu", refine="none")
    flair = axial["FLAIR"]
    for node in (first.camVolume, first.meanGradientVolume, first.seedsVolume):  # as before: the input's grid
        assert node.GetImageData().GetDimensions() == flair.GetImageData().GetDimensions()
        np.testing.assert_array_equal(matrix(node), matrix(flair))
    assert first.chart.GetXAxisTitle() == "slice" and first.table.GetAttribute("CLDF.InputSlices") is None
    axialPath = logic.exportLabelmap(first.segmentation, flair, tmp_path / "axial.nii.gz")

    sagittal = load(stored_as["ASR"])
    markSlices(sagittal["FLAIR"], 100, 120, 1)  # weak labels on sagittal slices: no bundle slice is one of them
    second = logic.process(sagittal, brain_bundle, device="cpu", refine="none")
    for node in (second.camVolume, second.meanGradientVolume, second.seedsVolume):  # the bundle's (LPS) grid
        assert node.GetImageData().GetDimensions() == flair.GetImageData().GetDimensions()
        np.testing.assert_allclose(matrix(node), matrix(flair), atol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(second.camVolume),
                               slicer.util.arrayFromVolume(first.camVolume), atol=1e-4)
    np.testing.assert_allclose(second.sliceProbabilities, first.sliceProbabilities, atol=1e-4)
    np.testing.assert_allclose(tableColumn(second.table, "mask area (mm2)"),
                               tableColumn(first.table, "mask area (mm2)"), rtol=1e-3, atol=SPACING[0] * SPACING[1])
    assert "reoriented to LPS" in second.chart.GetXAxisTitle() and "not shown" in second.chart.GetXAxisTitle()
    assert (tableColumn(second.table, "slice label") == -1).all()
    sagittalPath = logic.exportLabelmap(second.segmentation, sagittal["FLAIR"], tmp_path / "sagittal.nii.gz")

    axialMask, sagittalMask = sitk.ReadImage(str(axialPath)), sitk.ReadImage(str(sagittalPath))
    stored = imageFromVolume(sagittal["FLAIR"])  # the export is on the sagittal input's own grid
    assert orientation_of(stored) == "ASR"
    assert sagittalMask.GetSize() == stored.GetSize()
    np.testing.assert_allclose(sagittalMask.GetOrigin(), stored.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(sagittalMask.GetDirection(), stored.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(sagittalMask.GetSpacing(), stored.GetSpacing(), atol=1e-5)
    assert sitk.GetArrayViewFromImage(axialMask).any(), "the bundle finds the tumour in these slices"
    back = sitk.DICOMOrient(sagittalMask, "LPS")
    np.testing.assert_allclose(back.GetOrigin(), axialMask.GetOrigin(), atol=1e-4)
    assert dice(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(axialMask)) >= 0.99


def test_slice_labels_of_a_flipped_volume_are_charted_on_the_bundles_slices(mrml_scene, stored_as, brain_bundle):
    flipped = load(stored_as["LAI"])
    labels = markSlices(flipped["FLAIR"], 0, 1, 1)
    labels = markSlices(flipped["FLAIR"], 5, 5, 0)
    job = CLDFSegmentationLogic().start(flipped, brain_bundle, device="cpu", refine="none")
    job.load()
    result = job.result
    axial = sitk.ReadImage(str(stored_as["LPS"]["FLAIR"]))
    assert result.camVolume.GetImageData().GetDimensions() == axial.GetSize()
    assert json.loads(result.table.GetAttribute("CLDF.InputSlices")) == list(range(8))[::-1]
    np.testing.assert_array_equal(tableColumn(result.table, "slice label"), labels[::-1])
    assert "reoriented to LPS" in result.chart.GetXAxisTitle() and "not shown" not in result.chart.GetXAxisTitle()
    job.cancel()

"""Weak labels made in the scene (real MRML, real scans) and read back by `cldf train`'s data code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from cldf.manifest import load_manifest
from cldf.trainer.slice_set import load_slice_set
from cldf.weak_labels import weak_slice_labels
from CLDFSegmentationLib.headless import loadVolume
from CLDFSegmentationLib.labels import markSlices, saveSliceLabels, sliceIndexAt, sliceLabels, writeManifest


@pytest.fixture()
def volumes(mrml_scene, tumour_case):
    return {c: loadVolume(tumour_case[c], c) for c in ("FLAIR", "T1")}


def test_slices_are_marked_one_at_a_time_or_as_a_range_and_kept_on_the_volume(volumes):
    flair = volumes["FLAIR"]
    z = flair.GetImageData().GetDimensions()[2]
    assert (sliceLabels(flair) == -1).all() and len(sliceLabels(flair)) == z
    markSlices(flair, 12, 9, 1)  # a range, either order
    markSlices(flair, 0, 3, 0)
    labels = markSlices(flair, 10, 10, -1)  # cleared again
    assert labels[[9, 11, 12]].tolist() == [1, 1, 1] and labels[10] == -1 and (labels[:4] == 0).all()
    assert json.loads(flair.GetAttribute("CLDF.SliceLabels")) == labels.tolist()  # saved with the scene
    with pytest.raises(ValueError, match="outside 'FLAIR'"):
        markSlices(flair, z - 1, z, 1)
    with pytest.raises(ValueError, match="is 1 \\(present\\), 0 \\(absent\\) or -1"):
        markSlices(flair, 0, 0, 2)


def test_the_slice_under_a_slice_view_is_the_volumes_k_index(volumes):
    flair = volumes["FLAIR"]
    view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
    view.SetOrientationToAxial()
    ijkToRas = vtk.vtkMatrix4x4()
    flair.GetIJKToRASMatrix(ijkToRas)
    for k in (0, 7, flair.GetImageData().GetDimensions()[2] - 1):
        ras = ijkToRas.MultiplyPoint([10, 20, k, 1])
        view.JumpSliceByCentering(*ras[:3])
        assert sliceIndexAt(flair, view) == k


def test_labels_made_in_the_scene_are_the_labels_cldf_train_reads(volumes, tumour_case, tmp_path):
    flair = volumes["FLAIR"]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(tumour_case["mask"]))) > 0
    present = np.flatnonzero(truth.any(axis=(1, 2)))
    markSlices(flair, present.min(), present.max(), 1)  # the user marks the tumour's range present
    markSlices(flair, 0, present.min() - 1, 0)  # and the slices above it absent; the rest stays unlabelled
    manifest_path = writeManifest({"patient-1": volumes}, tmp_path)
    manifest = load_manifest(manifest_path)
    case = manifest.case("patient-1")
    np.testing.assert_array_equal(weak_slice_labels(case, None, 0.01), sliceLabels(flair))
    data = load_slice_set(manifest, ["patient-1"], ["FLAIR", "T1"], 32, (0.5, 99.5), None, 0.01)
    assert len(data.labels) == int((sliceLabels(flair) != -1).sum()) and set(data.labels.tolist()) == {0, 1}
    written = sitk.ReadImage(str(tmp_path / "patient-1" / "FLAIR.nii.gz"))
    original = sitk.ReadImage(str(tumour_case["FLAIR"]))
    assert written.GetSize() == original.GetSize()
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(original))
    with pytest.raises(FileExistsError, match="already exists"):
        writeManifest({"patient-1": volumes}, tmp_path)


def test_an_unlabelled_volume_is_refused_with_what_to_do(volumes, tmp_path):
    with pytest.raises(ValueError, match="no slice of 'FLAIR' is labelled yet"):
        saveSliceLabels(volumes["FLAIR"], tmp_path / "labels.csv")


def test_a_volume_under_an_unapplied_transform_is_refused_before_anything_is_written(volumes, tmp_path):
    import slicer
    import vtk

    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(1, 3, 7.0)
    transform.SetMatrixTransformToParent(matrix)
    volumes["T1"].SetAndObserveTransformNodeID(transform.GetID())
    markSlices(volumes["FLAIR"], 0, 3, 0)
    with pytest.raises(ValueError, match="channel 'patient-1/T1'.*harden it first"):
        writeManifest({"patient-1": volumes}, tmp_path / "out")
    assert not (tmp_path / "out").exists()

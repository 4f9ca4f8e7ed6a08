"""Nothing silent, nothing lost: refused starts add no node at all, and the label-map export is atomic and honest.

Real MRML nodes (slicer-core), real scans and the shipped brain bundle; a failing disk is the one thing simulated.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from CLDFSegmentationLib import CLDFSegmentationLogic, segmentations
from CLDFSegmentationLib.headless import loadVolume
from CLDFSegmentationLib.segmentations import addToScene, newSegmentation, setSegmentMask


@pytest.fixture(scope="module")
def slab_files(tumour_case, tmp_path_factory):
    """Slices 8..18 of a real patient: FLAIR, T1 and the tumour mask."""
    folder = tmp_path_factory.mktemp("slab")
    paths = {}
    for name in ("FLAIR", "T1", "mask"):
        paths[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(tumour_case[name]))[:, :, 8:19], str(paths[name]))
    return paths


@pytest.fixture()
def inputs(mrml_scene, slab_files):
    return {channel: loadVolume(slab_files[channel], channel) for channel in ("FLAIR", "T1")}


@pytest.fixture()
def added(mrml_scene):
    """One entry per node added to the scene from now on (a node added and removed again still counts)."""
    events: list[str] = []
    tag = mrml_scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, lambda *_: events.append("added"))
    yield events
    mrml_scene.RemoveObserver(tag)


def node_ids(scene) -> set[str]:
    nodes = scene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def refused(inputs, bundle, message: str, added: list) -> None:
    """``start`` or loading the run raises ``message`` and neither adds nor removes a node, not even for a moment."""
    before = node_ids(slicer.mrmlScene)
    added.clear()
    with pytest.raises(ValueError, match=message):
        CLDFSegmentationLogic().start(inputs, bundle, device="cpu", refine="none").load()
    assert node_ids(slicer.mrmlScene) == before and not added


# ------------------------------------------------------------------ start: every check before the first node
def test_a_volume_under_an_unapplied_linear_transform_is_refused(inputs, brain_bundle, added):
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T1 to FLAIR")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 4.5)  # a T1 aligned to the FLAIR only by this transform
    transform.SetMatrixTransformToParent(matrix)
    inputs["T1"].SetAndObserveTransformNodeID(transform.GetID())
    refused(inputs, brain_bundle, r"channel 'T1': volume 'T1' is under the transform 'T1 to FLAIR', which is not "
            r"applied to its voxels; harden it first \(Data module: right-click the volume > Harden transform\)",
            added)


def test_an_identity_transform_moving_nothing_is_accepted_but_not_one_whose_parent_moves(inputs, brain_bundle):
    scene = slicer.mrmlScene
    identity = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "identity")
    for node in inputs.values():
        node.SetAndObserveTransformNodeID(identity.GetID())
    before = node_ids(scene)
    job = CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none")
    job.load()
    assert all(n.GetTransformNodeID() == identity.GetID() for n in (job.result.camVolume, job.result.segmentation))
    job.cancel()
    assert node_ids(scene) == before
    moving = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moving")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, -2.0)
    moving.SetMatrixTransformToParent(matrix)
    identity.SetAndObserveTransformNodeID(moving.GetID())
    with pytest.raises(ValueError, match="channel 'FLAIR': volume 'FLAIR' is under the transform 'identity'"):
        CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none")


def test_a_label_map_given_as_a_channel_is_refused(inputs, slab_files, brain_bundle, added):
    inputs["T1"] = loadVolume(slab_files["mask"], "mask", labelmap=True)
    refused(inputs, brain_bundle, "channel 'T1': 'mask' is a vtkMRMLLabelMapVolumeNode, not a scalar volume", added)
    inputs["T1"] = loadVolume(slab_files["mask"], "mask as a scalar volume")  # the same mask, loaded as a scan
    refused(inputs, brain_bundle, "channel 'T1' looks like a label map", added)


@pytest.mark.parametrize("kind,message", [
    ("one slice", r"channel 'FLAIR' is a single 2D slice .size \(\d+, \d+, 1\)."),  # what Slicer makes of a PNG
    ("vector", "channel 'FLAIR' has 3 components per voxel; give one scalar volume per channel"),  # e.g. an RGB image
])
def test_a_volume_that_is_not_a_3d_scalar_volume_is_refused_before_any_node(inputs, brain_bundle, added, kind, message):
    scan = slicer.util.arrayFromVolume(inputs["FLAIR"])
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode" if kind == "one slice" else
                                              "vtkMRMLVectorVolumeNode", kind)
    slicer.util.updateVolumeFromArray(node, scan[:1] if kind == "one slice" else np.stack([scan] * 3, -1))
    node.CopyOrientation(inputs["FLAIR"])
    inputs["FLAIR"] = node
    refused(inputs, brain_bundle, message, added)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_volume_with_a_nan_or_an_infinite_voxel_is_refused(inputs, brain_bundle, added, value):
    array = slicer.util.arrayFromVolume(inputs["T1"]).astype(np.float32)
    array[3, 10, 10] = value
    slicer.util.updateVolumeFromArray(inputs["T1"], array)
    refused(inputs, brain_bundle, "channel 'T1' contains 1 NaN or infinite voxels", added)


def test_a_nifti_whose_nan_voxels_slicer_loaded_as_0_is_refused_from_its_file(inputs, slab_files, brain_bundle,
                                                                              added, tmp_path):
    image = sitk.Cast(sitk.ReadImage(str(slab_files["T1"])), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[3, 10, 10:12] = np.nan
    nan_file = sitk.GetImageFromArray(array)
    nan_file.CopyInformation(image)
    sitk.WriteImage(nan_file, str(tmp_path / "t1-nan.nii.gz"))
    inputs["T1"] = loadVolume(tmp_path / "t1-nan.nii.gz", "T1 with NaN")
    assert np.isfinite(slicer.util.arrayFromVolume(inputs["T1"])).all()  # what the scene's reader made of them
    refused(inputs, brain_bundle, r"holds 2 NaN or infinite voxels.*'T1 with NaN': Slicer shows them as 0", added)
    slicer.util.arrayFromVolume(inputs["T1"])[3, 10, 10:12] = 0  # the user set them on purpose: taken as it is
    slicer.util.arrayFromVolumeModified(inputs["T1"])
    CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none").load()


def test_a_constant_volume_is_refused(inputs, brain_bundle, added):
    slicer.util.updateVolumeFromArray(inputs["FLAIR"], np.full((11, 256, 256), 7, np.int16))
    refused(inputs, brain_bundle, "channel 'FLAIR' is constant: every voxel is 7", added)


def test_slice_labels_that_do_not_fit_the_input_are_refused_before_any_node(inputs, brain_bundle, added):
    inputs["FLAIR"].SetAttribute("CLDF.SliceLabels", "[1, 0, 1]")
    refused(inputs, brain_bundle, "'FLAIR' has 3 stored slice labels for 11 slices", added)


def test_a_segment_that_cannot_be_filled_is_refused_before_any_node(inputs, brain_bundle, added, monkeypatch):
    def broken(node, segmentId, *args):
        raise RuntimeError(f"could not write the mask into segment '{segmentId}' of '{node.GetName()}'")

    monkeypatch.setattr(segmentations, "_writeSegment", broken)
    before = node_ids(slicer.mrmlScene)
    added.clear()
    with pytest.raises(RuntimeError, match="could not write the mask into segment .* of 'FLAIR tumour'"):
        CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none").load()
    assert node_ids(slicer.mrmlScene) == before and not added


# ------------------------------------------------------------------ export: atomic, never silent
@pytest.fixture()
def segmented(inputs, slab_files):
    """A segmentation holding the real tumour mask, on the FLAIR's grid, made as a run makes it."""
    flair = inputs["FLAIR"]
    segmentation, segmentId = newSegmentation(flair, "FLAIR tumour", "tumour", (255, 0, 0))
    addToScene(segmentation, flair)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(slab_files["mask"]))) > 0
    assert mask.any()
    setSegmentMask(segmentation, segmentId, mask, flair)
    return segmentation, flair, mask.astype(np.uint8)


def export(segmented, path, overwrite: bool = False):
    segmentation, flair, _ = segmented
    return CLDFSegmentationLogic.exportLabelmap(segmentation, flair, path, overwrite=overwrite)


def test_an_existing_file_is_kept_unless_overwriting_is_asked_for(segmented, tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"an earlier file")
    with pytest.raises(FileExistsError, match="already exists; choose another name or allow overwriting"):
        export(segmented, target)
    assert target.read_bytes() == b"an earlier file"
    assert export(segmented, target, overwrite=True) == target
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(target))), segmented[2])
    assert os.listdir(tmp_path) == ["mask.nii.gz"]


@pytest.mark.parametrize("where, error, message", [
    ("file/mask.nii.gz", NotADirectoryError, r"file is a file, not a folder; choose another folder"),
    ("file/deeper/mask.nrrd", NotADirectoryError, r"file is a file, not a folder; choose another folder"),
    ("missing/mask.nii.gz", FileNotFoundError, r"folder not found: .*missing; create it first or choose another"),
    ("folder.nii.gz", IsADirectoryError, r"folder.nii.gz is a folder; choose a file name inside it"),
])
def test_a_target_that_cannot_be_a_file_is_refused_before_anything_is_written(segmented, tmp_path, where, error,
                                                                              message):
    (tmp_path / "file").write_bytes(b"a regular file")
    (tmp_path / "folder.nii.gz").mkdir()
    before = node_ids(slicer.mrmlScene)
    for overwrite in (False, True):
        with pytest.raises(error, match=message):
            export(segmented, tmp_path / where, overwrite)
    assert (tmp_path / "file").read_bytes() == b"a regular file" and not os.listdir(tmp_path / "folder.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["file", "folder.nii.gz"]
    assert node_ids(slicer.mrmlScene) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_with_what_to_do(segmented, tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    (folder / "mask.nii.gz").write_bytes(b"an earlier file")
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match="Permission denied. Choose a folder you may write to; "
                                          "the file already there is unchanged"):
            export(segmented, folder / "mask.nii.gz", overwrite=True)
        assert (folder / "mask.nii.gz").read_bytes() == b"an earlier file" and os.listdir(folder) == ["mask.nii.gz"]
    finally:
        folder.chmod(0o755)


@pytest.fixture()
def earlier(segmented, tmp_path):
    """A label map exported before, and the bytes it holds."""
    path = export(segmented, tmp_path / "mask.nii.gz")
    return path, path.read_bytes()


def test_a_disk_filling_up_mid_write_leaves_the_earlier_file_byte_identical(segmented, earlier, monkeypatch):
    path, content = earlier

    def fills_the_disk(node, tmp):
        with open(tmp, "wb") as f:
            f.write(b"\x1f\x8b\x08" + bytes(100))  # the beginning of a file, then no space
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segmentations, "writeVolumeFile", fills_the_disk)
    before = node_ids(slicer.mrmlScene)
    with pytest.raises(OSError, match=f"the label map could not be written to {path}: No space left on device. "
                                      "Free some space or choose another drive; the file already there is unchanged"):
        export(segmented, path, overwrite=True)
    assert path.read_bytes() == content
    assert os.listdir(path.parent) == [path.name], "no temporary file is left behind"
    assert node_ids(slicer.mrmlScene) == before


@pytest.mark.parametrize("damage, message", [
    (lambda tmp: open(tmp, "wb").close(), r"the file came out empty \(0 bytes\), as it does when the disk is full"),
    (lambda tmp: os.truncate(tmp, os.path.getsize(tmp) // 2), "the file does not read back"),
    (os.remove, "the writer reported success but wrote no file"),
])
def test_a_write_reported_as_successful_is_checked_before_it_replaces_anything(segmented, earlier, monkeypatch,
                                                                                damage, message):
    path, content = earlier
    write = segmentations.writeVolumeFile

    def damaged(node, tmp):
        write(node, tmp)
        damage(tmp)

    monkeypatch.setattr(segmentations, "writeVolumeFile", damaged)
    with pytest.raises(OSError, match=message):
        export(segmented, path, overwrite=True)
    assert path.read_bytes() == content and os.listdir(path.parent) == [path.name]
    with pytest.raises(OSError, match="nothing was written there"):
        export(segmented, path.with_name("new.nrrd"))
    assert os.listdir(path.parent) == [path.name]


# ------------------------------------------------------------------ plausibility: a warning, shown by the module
def test_a_scan_in_other_units_starts_with_a_warning_the_panel_shows(mrml_scene, slab_files, brain_bundle, tmp_path):
    hounsfield = {}
    for channel in ("FLAIR", "T1"):
        image = sitk.ReadImage(str(slab_files[channel]))
        scaled = sitk.GetImageFromArray(sitk.GetArrayFromImage(image).astype(np.float32) * 12 - 1024)
        scaled.CopyInformation(image)
        sitk.WriteImage(scaled, str(tmp_path / f"{channel}.nrrd"))
        hounsfield[channel] = loadVolume(tmp_path / f"{channel}.nrrd", channel)
    job = CLDFSegmentationLogic().start(hounsfield, brain_bundle, device="cpu", refine="none")
    try:
        job.load()
        assert len(job.warnings) == 2 and all("unlike those of the bundle's training scans" in w for w in job.warnings)
    finally:
        job.cancel()
    plain = {channel: loadVolume(slab_files[channel], channel) for channel in ("FLAIR", "T1")}
    job = CLDFSegmentationLogic().start(plain, brain_bundle, device="cpu", refine="none")
    try:
        job.load()
        assert job.warnings == []
    finally:
        job.cancel()

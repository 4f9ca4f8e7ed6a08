"""The Slicer module's logic on real MRML nodes (slicer-core): geometry, stepping, cancel, reruns, refusals, export.

One test runs the shipped bundle as it is (with its SAM refinement); the others pass refine="none" to save minutes.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from CLDFSegmentationLib import CLDFSegmentationLogic, shippedBundles
from CLDFSegmentationLib.headless import loadVolume
from conftest import oblique_direction

SPACING = (0.7, 0.9, 2.5)
ORIGIN = (12.5, -30.0, 40.0)


@pytest.fixture(scope="module")
def oblique_files(tumour_case, tmp_path_factory):
    """Slices 8..18 of a real patient, rewritten with an oblique right-handed direction and anisotropic spacing.

    The direction stays closest to LPS (the brain bundle's orientation), so the slices are cut as stored
    (`test_slicer_orientation.py` covers other orientations).
    """
    folder = tmp_path_factory.mktemp("oblique")
    paths = {}
    direction = oblique_direction()
    for channel in ("FLAIR", "T1"):
        image = sitk.ReadImage(str(tumour_case[channel]))[:, :, 8:19]
        image.SetSpacing(SPACING)
        image.SetOrigin(ORIGIN)
        image.SetDirection(direction)
        paths[channel] = folder / f"{channel}.nii.gz"
        sitk.WriteImage(image, str(paths[channel]))
    return paths


@pytest.fixture()
def inputs(mrml_scene, oblique_files):
    return {channel: loadVolume(path, channel) for channel, path in oblique_files.items()}


def node_ids(scene) -> set[str]:
    nodes = scene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def matrix(node) -> np.ndarray:
    return slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node))


def _ijk_to_ras(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


def test_outputs_and_the_exported_label_map_have_the_exact_geometry_of_an_oblique_input(inputs, brain_bundle, tmp_path):
    flair = inputs["FLAIR"]
    job = CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", segmenter="cldf")  # with its SAM
    result = job.run()
    mask = job.engineResult.mask
    assert mask.any(), "the shipped bundle finds the tumour in these slices"
    assert job.engineResult.coarse_mask is not None, "the shipped bundle refines its masks (chosen on validation)"
    for node in (result.camVolume, result.meanGradientVolume):
        assert node.GetImageData().GetDimensions() == flair.GetImageData().GetDimensions()
        np.testing.assert_allclose(matrix(node), matrix(flair), atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.camVolume), job.engineResult.cam)
    geometry = result.segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert geometry, "the segmentation's reference geometry is set"

    path = CLDFSegmentationLogic.exportLabelmap(result.segmentation, flair, tmp_path / "mask.nii.gz")
    exported = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(exported), mask)
    reference = sitk.ReadImage(str(flair.GetStorageNode().GetFileName()))
    np.testing.assert_allclose(exported.GetSpacing(), SPACING, atol=1e-5)
    np.testing.assert_allclose(exported.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(exported.GetDirection(), reference.GetDirection(), atol=1e-5)
    # the same voxel lands at the same physical point in the input and in the export
    index = tuple(int(v) for v in np.argwhere(mask)[0][::-1])
    np.testing.assert_allclose(exported.TransformIndexToPhysicalPoint(index),
                               reference.TransformIndexToPhysicalPoint(index), atol=1e-4)


def test_stepping_reports_increasing_progress_and_the_cam_fills_in_before_the_end(inputs, brain_bundle):
    job = CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none", batchSize=4)
    assert job.result is None and job.progress == (0, 0), "start loads nothing: the first step does"
    job.load()
    cam = job.result.camVolume
    assert job.progress == (0, 11) and not slicer.util.arrayFromVolume(cam).any()
    seen = []
    while job.step():
        seen.append(job.progress)
        if len(seen) == 1:
            assert slicer.util.arrayFromVolume(cam)[:4].any(), "the CAM node shows the first batch at once"
            assert not slicer.util.arrayFromVolume(cam)[4:].any()
    seen.append(job.progress)
    assert [d for d, _ in seen] == sorted(set(d for d, _ in seen)) and seen[-1] == (11, 11)
    assert not job.step()
    assert job.result.sliceProbabilities.max() > 0.5


def test_cancel_after_one_step_leaves_exactly_the_nodes_there_were(inputs, brain_bundle):
    scene = slicer.mrmlScene
    before = node_ids(scene)
    job = CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none", batchSize=4)
    assert node_ids(scene) == before, "start adds no node"
    job.step()  # loads the bundle and makes the nodes
    assert len(node_ids(scene)) > len(before)
    job.step()
    job.cancel()
    assert node_ids(scene) == before
    assert job.result is None and not job.step()


@pytest.fixture()
def whole_volume(mrml_scene, tumour_case):
    return {channel: loadVolume(tumour_case[channel], channel) for channel in ("FLAIR", "T1")}


def test_a_background_run_fills_in_while_it_goes_and_gives_the_mask_of_a_blocking_run(whole_volume, brain_bundle):
    job = CLDFSegmentationLogic().start(whole_volume, brain_bundle, device="cpu", refine="none", batchSize=4)
    job.startInBackground()
    assert job.stage == "loading model" and job.progress == (0, 0) and job.result is None
    cam_before_end = False
    while job.poll():
        if job.result is not None:
            cam_before_end |= bool(slicer.util.arrayFromVolume(job.result.camVolume).any()) and not job.finished
        time.sleep(0.01)  # the module's timer interval
    total = job.progress[1]
    assert job.finished and job.stage == "finished" and job.progress[0] == total > 0
    assert cam_before_end, "the CAM node fills in while the run goes on"
    np.testing.assert_array_equal(_segment_array(job.result), job.engineResult.mask)
    blocking = CLDFSegmentationLogic().start(whole_volume, brain_bundle, device="cpu", refine="none", batchSize=4)
    blocking.run()  # (replaces the background run's nodes: same input)
    np.testing.assert_array_equal(job.engineResult.mask, blocking.engineResult.mask)


def _segment_array(result) -> np.ndarray:
    from CLDFSegmentationLib.segmentations import addLabelmap

    reference = slicer.mrmlScene.GetNodeByID(result.camVolume.GetAttribute("CLDF.InputVolumeID"))
    labelmap = addLabelmap(result.segmentation, reference, "check")
    return slicer.util.arrayFromVolume(labelmap) > 0


def wait_until(condition, timeout: float = 300.0) -> None:
    """Poll ``condition`` (a guard against a hang, not a timing check)."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "the worker never got there"
        time.sleep(0.01)


def test_cancel_in_the_background_restores_the_scene_at_once_and_the_worker_stops_after_its_batch(whole_volume,
                                                                                                  brain_bundle):
    scene = slicer.mrmlScene
    before = node_ids(scene)
    job = CLDFSegmentationLogic().start(whole_volume, brain_bundle, device="cpu", refine="none", batchSize=2)
    job.startInBackground()
    wait_until(lambda: job.poll() and job.progress[0] > 0)
    job.cancel()
    assert node_ids(scene) == before and not job.poll() and job.stage == "cancelled"
    wait_until(lambda: not job.running)
    assert job.progress[0] < job.progress[1]


def test_cancel_while_the_bundle_loads_leaves_nothing_and_the_worker_stops_once_loaded(whole_volume, brain_bundle):
    scene = slicer.mrmlScene
    before = node_ids(scene)
    job = CLDFSegmentationLogic().start(whole_volume, brain_bundle, device="cpu", refine="none")
    job.startInBackground()
    job.cancel()
    wait_until(lambda: not job.running)
    assert node_ids(scene) == before and not job.poll() and job.progress[0] == 0


def test_an_error_on_the_worker_reaches_the_main_thread_and_leaves_no_nodes(whole_volume, brain_bundle, monkeypatch):
    from cldf.segment import SegmentationJob

    scene = slicer.mrmlScene
    before = node_ids(scene)

    def broken(self):
        raise MemoryError("no memory left for this batch")

    monkeypatch.setattr(SegmentationJob, "step", broken)
    job = CLDFSegmentationLogic().start(whole_volume, brain_bundle, device="cpu", refine="none", batchSize=4,
                                        segmenter="cldf")  # the pipeline's step fails
    job.startInBackground()
    with pytest.raises(MemoryError, match="no memory left"):
        while job.poll():
            time.sleep(0.01)
    assert node_ids(scene) == before and job.result is None


def test_a_second_run_replaces_its_own_outputs_and_leaves_every_other_node_untouched(inputs, brain_bundle):
    scene = slicer.mrmlScene
    logic = CLDFSegmentationLogic()
    first = logic.process(inputs, brain_bundle, device="cpu", refine="none")
    lookalike = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "FLAIR CAM")  # the user's, not ours
    first_ids = _with_display_nodes(first.nodes)
    others = node_ids(scene) - first_ids
    second = logic.process(inputs, brain_bundle, device="cpu", refine="none")
    after = node_ids(scene)
    assert not first_ids & after, "the first run's outputs are gone, display nodes included"
    assert scene.GetNodeByID(lookalike.GetID()) is lookalike
    assert after == others | _with_display_nodes(second.nodes)


def _with_display_nodes(nodes) -> set[str]:
    ids = set()
    for n in nodes:
        ids.add(n.GetID())
        if n.IsA("vtkMRMLDisplayableNode"):
            ids |= {n.GetNthDisplayNode(i).GetID() for i in range(n.GetNumberOfDisplayNodes())}
    return ids


def test_a_cancelled_rerun_keeps_the_earlier_results(inputs, brain_bundle):
    logic = CLDFSegmentationLogic()
    first = logic.process(inputs, brain_bundle, device="cpu", refine="none")
    job = logic.start(inputs, brain_bundle, device="cpu", refine="none", batchSize=4)
    job.step()
    job.cancel()
    assert all(slicer.mrmlScene.GetNodeByID(n.GetID()) is n for n in first.nodes)


def test_outputs_are_named_coloured_placed_under_the_study_and_record_their_provenance(inputs, brain_bundle):
    scene = slicer.mrmlScene
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    for node in inputs.values():
        sh.CreateItem(study, node)
    result = CLDFSegmentationLogic().process(inputs, brain_bundle, device="cpu", refine="none", segmenter="cldf")
    card = json.loads((brain_bundle / "bundle.json").read_text(encoding="utf-8"))
    assert result.camVolume.GetName() == "FLAIR CAM"
    assert result.meanGradientVolume.GetName() == "FLAIR mean gradient"
    segment = result.segmentation.GetSegmentation().GetSegment(result.segmentId)
    assert segment.GetName() == card["task"]["target"]
    np.testing.assert_allclose(segment.GetColor(), np.array(card["task"]["color"]) / 255, atol=1e-6)
    terminology = vtk_string(segment, "TerminologyEntry")
    assert "SCT^108369006^Neoplasm" in terminology and "SCT^12738006^Brain" in terminology
    for node in result.nodes:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
        assert node.GetAttribute("CLDF.Bundle").startswith("brain-mri-flair-t1@")
        assert node.GetAttribute("CLDF.Device") == "cpu" and node.GetAttribute("CLDF.DecoderSeed") == "0"
        assert node.GetAttribute("CLDF.Segmenter") == "cldf"
        assert "torch" in node.GetAttribute("CLDF.Versions")


def vtk_string(segment, tag: str) -> str:
    import vtk

    out = vtk.reference("")
    assert segment.GetTag(tag, out), f"the segment has no '{tag}' tag"
    return str(out)


def test_the_same_input_gives_the_same_mask(inputs, brain_bundle, tmp_path):
    logic = CLDFSegmentationLogic()
    a = logic.exportLabelmap(logic.process(inputs, brain_bundle, device="cpu", refine="none").segmentation, inputs["FLAIR"],
                             tmp_path / "a.nrrd")
    b = logic.exportLabelmap(logic.process(inputs, brain_bundle, device="cpu", refine="none").segmentation, inputs["FLAIR"],
                             tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(b))))


def test_maps_show_as_a_heat_foreground_that_can_be_switched_and_faded(inputs, brain_bundle):
    scene = slicer.mrmlScene
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    logic = CLDFSegmentationLogic()
    result = logic.process(inputs, brain_bundle, device="cpu", refine="none")
    display = result.camVolume.GetDisplayNode()
    assert display.GetColorNode().GetName() == "PET-Heat" and display.GetApplyThreshold()
    assert composite.GetBackgroundVolumeID() == inputs["FLAIR"].GetID()
    assert composite.GetForegroundVolumeID() == result.camVolume.GetID()
    logic.showMap(result, inputs["FLAIR"], "meanGradient")
    assert composite.GetForegroundVolumeID() == result.meanGradientVolume.GetID()
    logic.showMap(result, inputs["FLAIR"], "none")
    assert composite.GetForegroundVolumeID() is None
    logic.setOverlayOpacity(0.25)
    assert composite.GetForegroundOpacity() == 0.25
    with pytest.raises(ValueError, match="opacity must be in"):
        logic.setOverlayOpacity(1.5)
    with pytest.raises(ValueError, match="map must be one of"):
        logic.showMap(result, inputs["FLAIR"], "seeds")


# ------------------------------------------------------------------ refusals: nothing is created
@pytest.mark.parametrize("channels, message", [
    ({"FLAIR": "FLAIR", "T2": "T1"}, r"missing channel\(s\) \['T1'\] and unexpected channel\(s\) \['T2'\]"),
    ({"FLAIR": "FLAIR"}, r"missing channel\(s\) \['T1'\]"),
])
def test_wrong_channel_names_are_refused_before_any_work(inputs, brain_bundle, channels, message):
    before = node_ids(slicer.mrmlScene)
    given = {name: inputs[source] for name, source in channels.items()}
    with pytest.raises(ValueError, match=message):
        CLDFSegmentationLogic().start(given, brain_bundle, device="cpu", refine="none").load()
    assert node_ids(slicer.mrmlScene) == before


def test_inputs_on_different_grids_are_refused(inputs, brain_bundle):
    inputs["T1"].SetSpacing(1.0, 1.0, 1.0)
    before = node_ids(slicer.mrmlScene)
    with pytest.raises(ValueError, match="different voxel grids.*spacing.*resample 'T1' onto 'FLAIR'"):
        CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none").load()
    assert node_ids(slicer.mrmlScene) == before


def test_a_2d_volume_is_refused(inputs, brain_bundle):
    for node in inputs.values():
        slicer.util.updateVolumeFromArray(node, slicer.util.arrayFromVolume(node)[5:6].copy())
    with pytest.raises(ValueError, match="single 2D slice"):
        CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none").load()


def test_a_volume_with_nans_is_refused(inputs, brain_bundle):
    array = slicer.util.arrayFromVolume(inputs["T1"]).astype(np.float32)
    array[3, 10, 10] = np.nan
    slicer.util.updateVolumeFromArray(inputs["T1"], array)
    with pytest.raises(ValueError, match="channel 'T1' contains 1 NaN"):
        CLDFSegmentationLogic().start(inputs, brain_bundle, device="cpu", refine="none").load()


def test_a_label_map_or_an_empty_node_is_refused(inputs, brain_bundle):
    label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(ValueError, match="'labels' is a vtkMRMLLabelMapVolumeNode, not a scalar volume"):
        CLDFSegmentationLogic().start({"FLAIR": inputs["FLAIR"], "T1": label}, brain_bundle, device="cpu", refine="none")
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="volume 'empty' holds no image data"):
        CLDFSegmentationLogic().start({"FLAIR": inputs["FLAIR"], "T1": empty}, brain_bundle, device="cpu", refine="none")


def test_a_tampered_bundle_is_refused(inputs, brain_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(brain_bundle, bundle)
    with open(bundle / "decoders.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    before = node_ids(slicer.mrmlScene)
    with pytest.raises(ValueError, match="does not match the sha256 recorded in bundle.json"):
        CLDFSegmentationLogic().start(inputs, bundle, device="cpu", refine="none").load()
    assert node_ids(slicer.mrmlScene) == before
    with pytest.raises(FileNotFoundError, match="bundle directory not found"):
        CLDFSegmentationLogic().start(inputs, tmp_path / "nowhere", device="cpu", refine="none")


# ------------------------------------------------------------------ export
def test_export_never_overwrites_silently_and_names_what_it_writes(inputs, brain_bundle, tmp_path):
    logic = CLDFSegmentationLogic()
    result = logic.process(inputs, brain_bundle, device="cpu", refine="none")
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"the user's file")
    before = node_ids(slicer.mrmlScene)
    with pytest.raises(FileExistsError, match="already exists"):
        logic.exportLabelmap(result.segmentation, inputs["FLAIR"], target)
    assert target.read_bytes() == b"the user's file"
    logic.exportLabelmap(result.segmentation, inputs["FLAIR"], target, overwrite=True)
    assert sitk.ReadImage(str(target)).GetSize() == (256, 256, 11)
    assert node_ids(slicer.mrmlScene) == before, "exporting leaves no node behind"
    with pytest.raises(ValueError, match="label maps are written as"):
        logic.exportLabelmap(result.segmentation, inputs["FLAIR"], tmp_path / "mask.png")
    with pytest.raises(FileNotFoundError, match="folder not found"):
        logic.exportLabelmap(result.segmentation, inputs["FLAIR"], tmp_path / "no" / "mask.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"], "no temporary file is left behind"


def test_the_shipped_bundles_are_listed_with_their_channels():
    bundles = {b.name: b for b in shippedBundles()}
    assert bundles["brain-mri-flair-t1"].channels == ("FLAIR", "T1")
    assert bundles["brain-mri-flair-t1"].target == "tumour"

"""The module's controller driven as clicks would drive it, on real MRML (slicer-core) and real scans.

The panel's dialogs are the one thing replaced: `RecordingPanel` answers them as a
user would and records what the panel was told to show.
"""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from CLDFSegmentationLib import CLDFSegmentationController, CLDFSegmentationLogic, CLDFSegmentationParameters
from CLDFSegmentationLib import dependencies
from CLDFSegmentationLib.headless import loadVolume


class RecordingPanel:
    def __init__(self, savePath=None, agree=True):
        self.states, self.errors, self.statuses, self.questions = [], [], [], []
        self.timerRunning = False
        self.savePath, self.agree = savePath, agree

    def refresh(self, state):
        self.states.append(state)

    def startTimer(self):
        self.timerRunning = True

    def stopTimer(self):
        self.timerRunning = False

    def askSavePath(self):
        return self.savePath

    def confirm(self, question):
        self.questions.append(question)
        return self.agree

    def showError(self, message):
        self.errors.append(message)

    def showStatus(self, message):
        self.statuses.append(message)

    def showChart(self, chart):
        self.chart = chart


class UnrefinedLogic(CLDFSegmentationLogic):
    """The real logic; masks left unrefined to keep the tests short (the shipped bundle refines with SAM)."""

    def start(self, *args, **kwargs):
        return super().start(*args, refine="none", **kwargs)


READY = types.SimpleNamespace(oldTorch=lambda: None, torchMissing=lambda: False, missingRequirements=lambda: [],
                              TORCH_REQUIREMENT=dependencies.TORCH_REQUIREMENT)


@pytest.fixture(scope="module")
def slab_files(tumour_case, tmp_path_factory):
    """Slices 8..18 of a real patient's FLAIR and T1, and a T1 on another grid (every second column)."""
    folder = tmp_path_factory.mktemp("slab")
    paths = {}
    for channel in ("FLAIR", "T1"):
        paths[channel] = folder / f"{channel}.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(tumour_case[channel]))[:, :, 8:19], str(paths[channel]))
    paths["other"] = folder / "other.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(tumour_case["T1"]))[::2, :, 8:19], str(paths["other"]))
    return paths


@pytest.fixture()
def module(mrml_scene, slab_files, brain_bundle):
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CLDFSegmentation")
    parameters = CLDFSegmentationParameters(node)
    parameters.bundlePath = str(brain_bundle)
    parameters.device = "cpu"
    volumes = {c: loadVolume(slab_files[c], c) for c in ("FLAIR", "T1")}
    panel = RecordingPanel()
    controller = CLDFSegmentationController(parameters, UnrefinedLogic(), panel, READY)
    return types.SimpleNamespace(scene=mrml_scene, parameters=parameters, volumes=volumes, panel=panel,
                                 controller=controller, files=slab_files)


def select_inputs(m) -> None:
    m.parameters.setInputVolume(0, m.volumes["FLAIR"])
    m.parameters.setInputVolume(1, m.volumes["T1"])


def run_to_the_end(controller, timeout: float = 300.0) -> None:
    t0 = time.time()
    while controller.running:
        controller.tick()
        time.sleep(0.01)
        assert time.time() - t0 < timeout


def node_ids(scene) -> set[str]:
    nodes = scene.GetNodes()
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def test_segment_runs_in_the_background_and_the_outputs_go_into_the_parameter_node(module):
    m = module
    assert not m.controller.state().segmentEnabled  # no volumes yet
    select_inputs(m)
    state = m.controller.state()
    assert state.segmentEnabled and state.segmentText == "Segment" and state.channels == ("FLAIR", "T1")
    assert state.bundleInfo == "Segments: tumour. Channels: FLAIR, T1." and not state.exportEnabled
    m.controller.segmentOrCancel()
    assert m.controller.running and m.panel.timerRunning and not m.panel.errors
    running = m.panel.states[-1]
    assert running.segmentText == "Cancel" and running.segmentEnabled and not running.bundleEnabled
    run_to_the_end(m.controller)
    assert not m.panel.timerRunning and m.panel.statuses[-1] == "Segmentation finished"
    outputs = m.parameters.outputs()
    assert outputs["runInput"] is m.volumes["FLAIR"] and outputs["segmentation"].GetAttribute("CLDF.Complete") == "true"
    done = m.controller.state()
    assert done.exportEnabled and done.segmentText == "Segment" and done.bundleEnabled


def test_export_uses_the_runs_own_input_after_the_selector_changed(module, tmp_path):
    m = module
    select_inputs(m)
    m.controller.segmentOrCancel()
    run_to_the_end(m.controller)
    other = loadVolume(m.files["other"], "other")
    m.parameters.setInputVolume(0, other)  # the user picks another volume before exporting
    m.panel.savePath = str(tmp_path / "mask.nii.gz")
    m.controller.export()
    assert not m.panel.errors, m.panel.errors
    written = sitk.ReadImage(m.panel.savePath)
    flair = m.volumes["FLAIR"]
    assert written.GetSize() == flair.GetImageData().GetDimensions()  # the run's grid, not the new selection's
    np.testing.assert_allclose(written.GetSpacing(), flair.GetSpacing(), atol=1e-6)
    assert sitk.GetArrayFromImage(written).any()


def test_cancel_mid_run_restores_the_scene_and_the_panel(module):
    m = module
    select_inputs(m)
    before = node_ids(m.scene)
    m.controller.segmentOrCancel()
    while m.controller.job.progress[0] == 0:
        m.controller.tick()
        time.sleep(0.01)
    m.controller.segmentOrCancel()  # the same button, now "Cancel"
    assert not m.controller.running and not m.panel.timerRunning
    assert node_ids(m.scene) == before and m.parameters.outputs() is None
    assert m.panel.states[-1].segmentText == "Segment"


def test_closing_the_scene_during_a_run_cancels_it(module):
    m = module
    select_inputs(m)
    m.controller.segmentOrCancel()
    job = m.controller.job
    m.controller.sceneClosing()
    assert not m.controller.running and job.cancelled and not job.running
    m.scene.Clear(False)  # what Slicer does next: nothing of the run is left to tidy


def test_a_saved_scene_whose_bundle_folder_is_gone_opens_and_says_what_to_do(module, tmp_path):
    m = module
    select_inputs(m)
    m.parameters.bundlePath = str(tmp_path / "moved-away")
    state = m.controller.state()  # no exception: the module opens
    assert not state.segmentEnabled and "has no bundle.json" in state.bundleInfo and "Choose another" in state.bundleInfo
    m.controller.segmentOrCancel()
    assert "Segmentation could not start" in m.panel.errors[-1] and not m.controller.running
    m.controller.chooseBundle(str(tmp_path))  # not a bundle either: refused, the path unchanged
    assert "not a CLDF model bundle" in m.panel.errors[-1] and m.parameters.bundlePath.endswith("moved-away")


def test_an_old_torch_or_missing_packages_are_met_with_what_to_do(module):
    m = module
    select_inputs(m)
    m.controller.dependencies = types.SimpleNamespace(**{**vars(READY), "oldTorch": lambda: "1.13.1"})
    m.controller.segmentOrCancel()
    assert "torch 1.13.1 is older" in m.panel.errors[-1] and "PyTorch Utils" in m.panel.errors[-1]
    installed = []
    m.controller.dependencies = types.SimpleNamespace(**{**vars(READY), "torchMissing": lambda: True,
                                                         "installMissing": lambda: installed.append(1)})
    m.panel.agree = False
    before = node_ids(m.scene)
    m.controller.segmentOrCancel()
    assert "torch (through the PyTorch extension)" in m.panel.questions[-1]
    assert not installed and not m.controller.running and node_ids(m.scene) == before


def test_a_failing_run_reports_and_keeps_nothing(module):
    m = module
    select_inputs(m)
    before = node_ids(m.scene)
    m.controller.segmentOrCancel()
    job = m.controller.job

    def out_of_memory():
        raise MemoryError("no memory left for this batch")

    job._engine.step = out_of_memory  # fails at its next batch
    run_to_the_end(m.controller)
    assert "Segmentation failed: no memory left" in m.panel.errors[-1]
    assert node_ids(m.scene) == before and m.parameters.outputs() is None


def test_display_choices_live_in_the_parameter_node_and_apply_to_the_last_run(module):
    m = module
    select_inputs(m)
    m.controller.segmentOrCancel()
    run_to_the_end(m.controller)
    composite = m.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # a slice view's layers
    m.parameters.shownMap = "meanGradient"
    m.parameters.overlayOpacity = 0.3
    m.parameters.showMask = False
    m.controller.showDisplay()
    outputs = m.parameters.outputs()
    assert composite.GetForegroundVolumeID() == outputs["meanGradientVolume"].GetID()
    assert composite.GetBackgroundVolumeID() == m.volumes["FLAIR"].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.3)
    assert not outputs["segmentation"].GetDisplayNode().GetVisibility()
    assert not composite.GetLabelVolumeID()  # seeds are an optional layer, off by default
    m.parameters.showSeeds = True
    m.controller.showDisplay()
    assert composite.GetLabelVolumeID() == outputs["seedsVolume"].GetID()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputs["seedsVolume"]), m.controller.lastJob._engine.result.seeds)
    with pytest.raises(ValueError, match="opacity must be in"):
        m.parameters.overlayOpacity = 1.5


@pytest.fixture(scope="module")
def deep_files(tumour_case, tmp_path_factory):
    """The real patient resampled to 155 slices, as deep as a BraTS volume."""
    folder = tmp_path_factory.mktemp("deep")
    paths = {}
    for channel in ("FLAIR", "T1"):
        image = sitk.ReadImage(str(tumour_case[channel]))
        sx, sy, sz = image.GetSpacing()
        size = (*image.GetSize()[:2], 155)
        deep = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                             (sx, sy, sz * image.GetSize()[2] / 155), image.GetDirection())
        paths[channel] = folder / f"{channel}.nii.gz"
        sitk.WriteImage(deep, str(paths[channel]))
    return paths


def test_changing_the_threshold_re_decides_155_slices_in_under_a_second_and_the_chart_follows(module, deep_files):
    from CLDFSegmentationLib.chart import tableColumn

    m = module
    for i, channel in enumerate(("FLAIR", "T1")):
        m.parameters.setInputVolume(i, loadVolume(deep_files[channel], f"deep {channel}"))
    m.controller.segmentOrCancel()
    run_to_the_end(m.controller, timeout=900)
    job, p = m.controller.lastJob, m.parameters
    table = job.result.table
    assert m.panel.chart is job.result.chart and m.controller.state().decideEnabled
    np.testing.assert_allclose(tableColumn(table, "presence"), job.result.sliceProbabilities, atol=1e-6)
    bundle_threshold = p.presenceThreshold
    assert (tableColumn(table, "threshold") == pytest.approx(bundle_threshold))
    before = job._engine.result.mask.copy()
    while job.running:  # the worker clusters the slices the gate passed over, while the user looks
        time.sleep(0.05)
    p.presenceThreshold = bundle_threshold / 4
    t0 = time.perf_counter()
    m.controller.redecide()
    seconds = time.perf_counter() - t0
    assert seconds < 1.0, f"re-deciding 155 slices took {seconds:.2f} s"
    after = job._engine.result.mask
    positive = job.result.sliceProbabilities >= p.presenceThreshold
    np.testing.assert_array_equal(tableColumn(table, "judged positive"), positive.astype(float))
    area = after.reshape(len(after), -1).sum(axis=1) * np.prod(m.volumes["FLAIR"].GetSpacing()[:2])
    np.testing.assert_allclose(tableColumn(table, "mask area (mm2)"), area, rtol=1e-5)
    assert not after[~positive].any() and before.shape == after.shape
    with pytest.raises(ValueError, match="presence threshold must be in"):
        p.presenceThreshold = -0.1


def test_a_run_reloaded_with_the_scene_asks_for_a_new_run_before_re_deciding(module):
    m = module
    select_inputs(m)
    m.controller.segmentOrCancel()
    run_to_the_end(m.controller)
    m.controller.lastJob = None  # what a scene saved and loaded again has: the outputs, not the embeddings
    assert not m.controller.state().decideEnabled
    m.controller.redecide()
    assert "press Segment to run it again" in m.panel.errors[-1]


def test_slices_labelled_in_the_panel_become_a_manifest_cldf_train_reads(module, tmp_path):
    from cldf.data import load_manifest, weak_slice_labels

    m = module
    select_inputs(m)
    m.panel.currentSlice = lambda volume: 4  # the slice the Red view shows
    m.controller.labelSlices(1)
    m.controller.labelSlices(0, 0, 2)
    assert "slices 0..2: absent (1 present, 3 absent)" in m.panel.statuses[-1]
    m.panel.askFolder = lambda: str(tmp_path)
    m.controller.saveManifest()
    assert not m.panel.errors, m.panel.errors
    case = load_manifest(tmp_path / "manifest.json").case("FLAIR")
    assert set(case.channels) == {"FLAIR", "T1"}
    expected = np.full(11, -1)
    expected[4], expected[:3] = 1, 0
    np.testing.assert_array_equal(weak_slice_labels(case, None, 0.01), expected)
    m.controller.labelSlices(1, 0, 99)
    assert "outside 'FLAIR'" in m.panel.errors[-1]
    m.controller.segmentOrCancel()  # a run on the labelled input: its chart shows the labels
    run_to_the_end(m.controller)
    from CLDFSegmentationLib.chart import tableColumn

    table = m.parameters.outputs()["table"]
    np.testing.assert_array_equal(tableColumn(table, "slice label"), expected)
    m.controller.labelSlices(0, 10)
    expected[10] = 0
    np.testing.assert_array_equal(tableColumn(table, "slice label"), expected)


def test_train_runs_cldf_train_as_a_child_process_and_selects_the_new_bundle(module, small_manifest, tmp_path):
    m = module
    out = tmp_path / "my-bundle"
    tiny = ("--set data.resolution=32 --set diffusion.steps=3 --set noisy_classifier.steps=3 "
            "--set cam_classifier.steps=3 --set decoder.epochs=1 --set decoder.pixels_per_class=32 "
            "--decoder-seeds 0 --no-select")  # seconds, not hours
    m.parameters.setTraining(manifest=str(small_manifest), output=str(out), channels="FLAIR, T1", target="1",
                             name="my-bundle", targetName="tumour", extra=tiny)
    m.controller.trainOrCancel()
    assert m.panel.timerRunning and m.panel.states[-1].trainText == "Cancel training"
    t0 = time.time()
    while m.controller.training is not None:
        m.controller.tick()
        time.sleep(0.1)
        assert time.time() - t0 < 600
    assert not m.panel.errors, m.panel.errors
    assert m.parameters.bundlePath == str(out) and (out / "bundle.json").is_file()
    assert "Training finished" in m.panel.statuses[-1] and m.panel.states[-1].trainText == "Train"
    with pytest.raises(ValueError, match="unknown training field"):
        m.parameters.setTraining(epochs="3")

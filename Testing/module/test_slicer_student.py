"""The student in the Slicer module, on real MRML nodes: the panel's segmenter choice and the overlays on demand."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from cldf.bundle import load_bundle, write_card
from cldf.student import StudentSegmenter
from CLDFSegmentationLib import CLDFSegmentationLogic
from CLDFSegmentationLib.headless import loadVolume
from CLDFSegmentationLib.parameters import moduleParameterNode


@pytest.fixture()
def volumes(mrml_scene, case_paths):
    return {channel: loadVolume(case_paths[channel], channel) for channel in ("FLAIR", "T1")}


def exported(result, reference, path) -> np.ndarray:
    """The run's segmentation as the module exports it, on the input's grid."""
    written = CLDFSegmentationLogic.exportLabelmap(result.segmentation, reference, path)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(written))) > 0


def test_the_student_fills_the_segmentation_and_leaves_the_overlays_empty_unless_asked(volumes, tiny_bundle,
                                                                                          case_paths, tmp_path):
    fast = CLDFSegmentationLogic().start(volumes, tiny_bundle, device="cpu", refine="none", segmenter="student",
                                         overlays=False).run()
    assert not slicer.util.arrayFromVolume(fast.camVolume).any()
    for node in fast.nodes:  # the provenance says which segmenter made the mask
        assert node.GetAttribute("CLDF.Segmenter") == "student" and node.GetAttribute("CLDF.DecoderSeed") is None
    engine = StudentSegmenter(load_bundle(tiny_bundle), "cpu", refine="none", maps=False)
    expected = engine.start({c: case_paths[c] for c in ("FLAIR", "T1")}).run(progress=False).on_input_grid().mask
    np.testing.assert_array_equal(exported(fast, volumes["FLAIR"], tmp_path / "mask.nii.gz"), expected > 0)
    assert expected.any(), "the tiny student marks some voxels, so the comparison can fail"
    shown = CLDFSegmentationLogic().start(volumes, tiny_bundle, device="cpu", refine="none", segmenter="student",
                                          overlays=True).run()
    assert slicer.util.arrayFromVolume(shown.camVolume).any()
    assert slicer.util.arrayFromVolume(shown.meanGradientVolume).any()


def test_the_panel_offers_the_segmenters_and_refuses_others(mrml_scene):
    parameters = moduleParameterNode(mrml_scene)
    assert parameters.segmenter == "bundle" and parameters.overlays is True
    parameters.segmenter = "student"
    assert parameters.segmenter == "student"
    with pytest.raises(ValueError):
        parameters.segmenter = "unet"


def test_a_bundle_without_a_student_is_refused_before_any_node_is_added(volumes, tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    card = json.loads((bundle / "bundle.json").read_text())
    (bundle / "student.safetensors").unlink()
    card["files"].pop("student.safetensors")
    write_card(bundle / "bundle.json", card)
    before = {n.GetID() for n in slicer.util.getNodes("*").values()}
    job = CLDFSegmentationLogic().start(volumes, bundle, device="cpu", refine="none", segmenter="student")
    with pytest.raises(ValueError, match="cldf student"):
        job.run()
    assert {n.GetID() for n in slicer.util.getNodes("*").values()} == before


def test_a_students_mask_is_not_decided_again_and_says_how_to_tune_one(volumes, tiny_bundle):
    job = CLDFSegmentationLogic().start(volumes, tiny_bundle, device="cpu", refine="none", segmenter="student",
                                        overlays=False)
    job.run()
    assert job.byStudent
    with pytest.raises(RuntimeError, match="no presence gate or clusters.*'cldf' segmenter"):
        job.requestRedecision(*job.decision)

"""Slice views rendered headless through vtkMRMLSliceLogic: the overlays land on the tumour of a real scan.

With CLDF_SCREENSHOTS_DIR set (``make screenshots``) the pictures are also
written there: they are the README's screenshots.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from scipy import ndimage

from CLDFSegmentationLib import CLDFSegmentationLogic
from CLDFSegmentationLib.headless import loadVolume, renderSlice, setUpScene
from CLDFSegmentationLib.segmentations import addLabelmap
from conftest import REPO, TUMOUR_CASE


def is_grey(rgb: np.ndarray) -> np.ndarray:
    return (rgb.max(axis=-1).astype(int) - rgb.min(axis=-1)) <= 2


@pytest.fixture(scope="module")
def rendered(tumour_case, brain_bundle, tmp_path_factory):
    setUpScene()
    flair = loadVolume(tumour_case["FLAIR"], "FLAIR")
    t1 = loadVolume(tumour_case["T1"], "T1")
    truth = loadVolume(tumour_case["mask"], "ground truth", labelmap=True)
    k = int(slicer.util.arrayFromVolume(truth).sum(axis=(1, 2)).argmax())
    result = CLDFSegmentationLogic().process({"FLAIR": flair, "T1": t1}, brain_bundle, device="cpu")
    mask = addLabelmap(result.segmentation, flair, "mask")
    out = Path(os.environ.get("CLDF_SCREENSHOTS_DIR") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return {
        "plain": renderSlice(flair, sliceIndex=k),
        "truth": renderSlice(flair, label=truth, sliceIndex=k),
        "cam": renderSlice(flair, result.camVolume, sliceIndex=k, path=out / "cam-overlay.png"),
        "cam+mask": renderSlice(flair, result.camVolume, mask, sliceIndex=k, path=out / "mask-overlay.png"),
        "mean gradient": renderSlice(flair, result.meanGradientVolume, sliceIndex=k,
                                     path=out / "mean-gradient-overlay.png"),
    }


def test_the_background_alone_is_grey(rendered):
    assert is_grey(rendered["plain"]).all()


@pytest.mark.parametrize("view", ["cam", "cam+mask", "mean gradient"])
def test_the_overlay_tints_the_tumour_and_leaves_far_pixels_grey(rendered, view):
    tumour = ~is_grey(rendered["truth"])  # where the ground-truth label layer colours the view
    assert tumour.sum() > 500, "the chosen slice shows a large tumour"
    far = ndimage.distance_transform_edt(~tumour) > 40
    tinted = ~is_grey(rendered[view])
    assert tinted[tumour].mean() > 0.5, f"{view}: only {tinted[tumour].mean():.0%} of the tumour is tinted"
    assert is_grey(rendered[view])[far].mean() > 0.97, f"{view}: pixels far from the tumour are tinted"



# ------------------------------------------------------------------ the sample as a radiologist sees it
SAMPLE = REPO / "Resources" / "SampleData" / TUMOUR_CASE
NOSE_SLICE = 5  # a low slice of the sample, through the nose and the cerebellum


def head_outline(rgb: np.ndarray) -> np.ndarray:
    """The largest bright object of a rendered slice, holes filled: the head."""
    head = ndimage.binary_fill_holes(ndimage.binary_opening(rgb[..., 0] > 20, iterations=2))
    labels, _ = ndimage.label(head)
    return labels == np.bincount(labels.ravel())[1:].argmax() + 1


def screen_columns(rgb_with_label: np.ndarray) -> np.ndarray:
    """The view's columns (0: the screen's left) that a label layer tints."""
    return np.flatnonzero((~is_grey(rgb_with_label)).any(axis=0))


def test_the_sample_shows_the_face_at_the_top_of_the_axial_view(mrml_scene):
    """The nose is the narrow end of the head's outline in a low slice: it must point up."""
    head = head_outline(renderSlice(loadVolume(SAMPLE / "flair.nii.gz", "FLAIR"), sliceIndex=NOSE_SLICE))
    rows = np.flatnonzero(head.any(axis=1))
    inset = (rows[-1] - rows[0]) // 10
    width = head.sum(axis=1)
    assert width[rows[0] + inset] < 0.5 * width[rows[-1] - inset], "the narrow end (the nose) is not at the top"


def test_the_sample_shows_the_patients_right_on_the_screens_left(mrml_scene, tmp_path):
    """The tumour lies in the patient's right hemisphere (the source images are radiological: their columns run
    from the patient's right to left). SimpleITK reads it there and the Red view shows it on the screen's left;
    voxels SimpleITK places on the patient's left appear on the screen's right."""
    flair = loadVolume(SAMPLE / "flair.nii.gz", "FLAIR")
    stored = sitk.ReadImage(str(SAMPLE / "mask.nii.gz"))
    mask = sitk.GetArrayFromImage(stored)
    k, width = int(mask.sum(axis=(1, 2)).argmax()), mask.shape[2]
    columns = np.flatnonzero(mask[k].any(axis=0))
    assert columns.max() < width // 2, "in the source's layout the tumour lies in the patient's right half"
    def x(column: float) -> float:
        return stored.TransformContinuousIndexToPhysicalPoint([float(column), 0.0, float(k)])[0]

    assert x(columns.mean()) < x((width - 1) / 2), "LPS: x grows towards the patient's left"
    truth = loadVolume(SAMPLE / "mask.nii.gz", "ground truth", labelmap=True)
    view = renderSlice(flair, label=truth, sliceIndex=k)
    middle = view.shape[1] // 2
    tumour = screen_columns(view)
    assert len(tumour) > 20 and tumour.max() < middle, "the tumour (patient's right) is on the screen's left"

    left = np.zeros_like(mask)
    left[k, 100:150, width // 2 + 20 : width // 2 + 60] = 1
    assert x(width // 2 + 20) > x((width - 1) / 2), "these columns lie on the patient's left"
    image = sitk.GetImageFromArray(left)
    image.CopyInformation(stored)
    sitk.WriteImage(image, str(tmp_path / "left.nii.gz"))
    marker = loadVolume(tmp_path / "left.nii.gz", "patient's left", labelmap=True)
    assert screen_columns(renderSlice(flair, label=marker, sliceIndex=k)).min() > middle, "left: the screen's right"


def test_a_headless_start_prints_no_error_line_and_has_the_colour_tables():
    code = ("import slicer; from CLDFSegmentationLib.headless import setUpScene; scene = setUpScene(); "
            "print(scene.GetNumberOfNodesByClass('vtkMRMLColorTableNode'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO / "CLDFSegmentation")
    assert run.returncode == 0, run.stderr
    assert "ERR|" not in run.stderr and "WARN|" not in run.stderr, run.stderr
    assert int(run.stdout.split()[-1]) > 10  # the logic still made its colour tables (Labels, Grey, ...)

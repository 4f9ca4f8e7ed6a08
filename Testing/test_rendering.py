"""Slice views rendered headless through vtkMRMLSliceLogic: the overlays land on the tumour of a real scan.

With CLDF_SCREENSHOTS_DIR set (``make screenshots``) the pictures are also
written there: they are the README's screenshots.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import slicer
from scipy import ndimage

from CLDFSegmentationLib import CLDFSegmentationLogic
from CLDFSegmentationLib.headless import loadVolume, renderSlice, setUpScene
from CLDFSegmentationLib.segmentations import addLabelmap


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

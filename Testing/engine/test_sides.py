"""The CAM classifier on half slices (``cam_classifier.sides``): the halves, their maps put back, a real run."""

from __future__ import annotations

import json

import pytest
import torch

from cldf.bundle import load_bundle
from cldf.config import ClassifierConfig
from cldf.manifest import load_manifest
from cldf.maps import LayerCAM
from cldf.models import SliceClassifier
from cldf.segment import Segmenter
from cldf.sides import SidedCAM, SidedClassifier, check_sides, half_images, place_halves
from cldf.trainer.train import TrainRequest, train
from cldf.weak_labels import AMBIGUOUS, side_slice_labels, weak_slice_labels
from conftest import data_root, tiny_config


def patient_left_marker(orientation: str) -> torch.Tensor:
    """Slices with a bright block on the patient's left, away from the midline."""
    x = torch.full((3, 1, 8, 16), -1.0)
    cols = slice(12, 15) if orientation[0] == "L" else slice(1, 4)  # "L..": columns run towards the left
    x[..., 2:5, cols] = 1.0
    return x


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_the_left_half_is_the_patients_left_in_either_orientation(orientation):
    x = patient_left_marker(orientation)
    left, right = half_images(x, "left", orientation), half_images(x, "right", orientation)
    assert left.shape == (3, 1, 8, 8) and float(left.max()) == 1.0 and float(right.max()) == -1.0
    assert float(left[..., 4:7].max()) == 1.0  # midline first: the marker sits 4-6 columns out from it
    assert torch.equal(half_images(x, "both", orientation), torch.cat([left, right]))


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_maps_of_both_halves_go_back_where_they_came_from(orientation):
    x = torch.randn(3, 1, 8, 16)
    assert torch.equal(place_halves(half_images(x, "both", orientation)[:, 0], "both", orientation), x[:, 0])
    left_only = place_halves(half_images(x, "left", orientation)[:, 0], "left", orientation)
    seen = slice(8, 16) if orientation[0] == "L" else slice(0, 8)
    assert torch.equal(left_only[..., seen], x[:, 0, :, seen])
    assert float(left_only.abs().sum()) == pytest.approx(float(x[:, 0, :, seen].abs().sum()))  # the rest is 0


def test_a_slice_is_judged_by_its_most_confident_half_and_its_cam_stays_on_the_seen_halves():
    torch.manual_seed(0)
    net = SliceClassifier(ClassifierConfig(max_timestep=0), 1).eval()
    x = torch.randn(4, 1, 32, 32).clamp(-1, 1)
    t = torch.zeros(4, dtype=torch.long)
    halves = net(half_images(x, "both", "LPS"), t.repeat(2)).view(2, 4, 2)
    judged = SidedClassifier(net, "both", "LPS")(x, t)
    margin = halves[..., 1] - halves[..., 0]
    assert torch.allclose(judged, halves[margin.argmax(0), torch.arange(4)])
    cam, presence = SidedCAM(LayerCAM(net, [1, 2]), "left", "LPS")(x)
    assert cam.shape == (4, 32, 32) and float(cam[..., :16].abs().max()) == 0.0 and float(cam[..., 16:].max()) > 0
    both, p_both = SidedCAM(LayerCAM(net, [1, 2]), "both", "LPS")(x)
    assert torch.allclose(p_both, judged.softmax(1)[:, 1], atol=1e-5)
    assert float(both.max()) <= 1.0 and float(both.min()) >= 0.0


def test_sides_need_columns_that_run_left_right():
    check_sides("whole", "PLS")  # the whole slice needs no side
    with pytest.raises(ValueError, match="data.orientation starting with L or R"):
        check_sides("left", "PLS")
    with pytest.raises(ValueError, match="unknown cam_classifier.sides 'middle'"):
        check_sides("middle", "LPS")


def test_a_bundle_trained_on_both_halves_segments_a_real_volume(small_manifest, case_paths, tmp_path):
    cfg = tiny_config()
    cfg.cam_classifier.sides, cfg.cam_classifier.flips, cfg.data.orientation = "both", False, "LPS"
    out = train(TrainRequest(manifest=small_manifest, out=tmp_path / "sided", config=cfg, target_labels=[1],
                             decoder_seeds=(0,), progress=False, select=False))
    card = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    assert card["config"]["cam_classifier"]["sides"] == "both" and card["config"]["cam_classifier"]["flips"] is False
    seg = Segmenter(load_bundle(out), "cpu", batch_size=8)
    assert isinstance(seg.bundle.slice_classifier, SidedClassifier)
    result = seg.start({"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}).run(progress=False)
    assert result.cam.shape == result.mask.shape and result.cam.max() > 0.0
    assert ((result.presence >= 0) & (result.presence <= 1)).all()


def test_each_kidney_gets_its_own_slice_labels_on_the_slices_training_keeps():
    """Per-side labels are slice-level like the slice labels: a side is present only where the target is."""
    path = data_root() / "btcv" / "manifest.json"
    if not path.is_file():
        pytest.skip(f"BTCV data not found at {path}")
    manifest = load_manifest(path)
    case = manifest.cases[0]
    union = weak_slice_labels(case, [2, 3], 0.01)
    sides = side_slice_labels(manifest, [case.id], [2, 3], ([3], [2]), 0.01, "LPS")
    assert sides.shape == (int((union != AMBIGUOUS).sum()), 2)
    kept = torch.from_numpy(union[union != AMBIGUOUS])  # LPS keeps this case's slice order
    assert bool((sides[kept == 0] == 0).all()) and bool((sides == 1).any(dim=0).all())
    assert bool((kept[(sides == 1).any(dim=1)] == 1).all())
    assert bool(((sides[:, 0] == 1) != (sides[:, 1] == 1)).any())  # the poles: one kidney without the other

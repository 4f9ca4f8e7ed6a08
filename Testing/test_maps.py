"""CAM and mean-gradient maps: range, hooks removed, determinism."""

from __future__ import annotations

import pytest
import torch

from cldf.config import ClassifierConfig, DiffusionConfig
from cldf.maps import ActivationRecorder, GradCAM, LayerCAM, MeanGradient, normalise_per_slice
from cldf.models import NoiseSchedule, SliceClassifier


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return SliceClassifier(ClassifierConfig(), 2).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def x():
    return torch.rand(4, 2, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _hook_count(net) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


@pytest.mark.parametrize("cam_class,layers", [(LayerCAM, [0, 1, 2]), (GradCAM, [2])])
def test_cams_are_in_unit_range_and_leave_no_hooks(classifier, x, cam_class, layers):
    cam, presence = cam_class(classifier, layers)(x)
    assert cam.shape == (4, 32, 32) and presence.shape == (4,)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert torch.all((presence >= 0) & (presence <= 1))
    assert _hook_count(classifier) == 0


def test_recorder_removes_hooks_even_on_error(classifier, x):
    with pytest.raises(RuntimeError):
        with ActivationRecorder([classifier.down_blocks[0]]):
            assert _hook_count(classifier) == 1
            raise RuntimeError("boom")
    assert _hook_count(classifier) == 0


def test_mean_gradient_is_deterministic_and_independent_of_the_batch(classifier, x):
    mg = MeanGradient(classifier, NoiseSchedule(DiffusionConfig()), [10, 20, 30], noise_seed=0)
    a, b = mg(x), mg(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[1:2], mg(x[1:2]), atol=1e-5, rtol=1e-4)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0


def test_normalise_per_slice_maps_a_flat_slice_to_zero():
    m = torch.stack([torch.full((4, 4), 3.0), torch.arange(16.0).view(4, 4)])
    n = normalise_per_slice(m)
    assert float(n[0].abs().max()) == 0.0 and float(n[1].max()) == 1.0 and float(n[1].min()) == 0.0


def test_unknown_cam_layer_is_refused(classifier):
    with pytest.raises(ValueError, match=r"CAM layers \[5\] do not exist"):
        LayerCAM(classifier, [0, 5])

"""CAM, mean-gradient and CDM-saliency maps, and seeds: range, hooks removed, determinism."""

from __future__ import annotations

import pytest
import torch

from cldf.config import ClassifierConfig, DiffusionConfig, SaliencyConfig, SeedConfig
from cldf.maps import ActivationRecorder, CDMSaliency, GradCAM, LayerCAM, MeanGradient, normalise_per_slice
from cldf.maps.cdm import ddim_timesteps
from cldf.maps.gradient import shift_offsets
from cldf.models import NoiseSchedule, SliceClassifier, build_cdm
from cldf.seeds import BACKGROUND, FOREGROUND, fuse_seeds


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


def test_mean_gradient_shifts_cycle_through_the_lattice_and_keep_the_batch_independence(classifier, x):
    assert shift_offsets(5, 0) == [(0, 0)] * 5
    assert shift_offsets(6, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1)]
    with pytest.raises(ValueError, match="shift period must be 0"):
        shift_offsets(3, -1)
    mg = MeanGradient(classifier, NoiseSchedule(DiffusionConfig()), [10, 20, 30, 40], noise_seed=0, shift_period=2)
    shifted = mg(x)
    torch.testing.assert_close(shifted[2:3], mg(x[2:3]), atol=1e-5, rtol=1e-4)
    plain = MeanGradient(classifier, NoiseSchedule(DiffusionConfig()), [10, 20, 30, 40], noise_seed=0)(x)
    assert not torch.allclose(shifted, plain)


def test_sub_stride_shifts_remove_the_stripes_of_a_real_mean_gradient(brain_bundle, tumour_case):
    """The shipped classifier's gradient peaks at the stride's frequencies; the shifts flatten those peaks."""
    import sys
    from pathlib import Path

    from cldf.bundle import load_bundle
    from cldf.images import read_channels
    from cldf.slices import normalise, to_slices
    from cldf.weak_labels import target_mask

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from mg_stripes import stripe_index

    bundle = load_bundle(brain_bundle)
    volume, _ = read_channels({c: tumour_case[c] for c in bundle.channels}, bundle.channels)
    tumour = target_mask(tumour_case["mask"], [1]).mean(axis=(1, 2)) > 0.01
    x = to_slices(normalise(volume, (0.5, 99.5)), 64)[torch.from_numpy(tumour)]
    cfg = bundle.config.maps
    index = {p: stripe_index(MeanGradient(bundle.noisy_classifier, bundle.schedule, cfg.mg_timesteps, 0, p)(x).numpy())
             for p in (0, 4)}
    assert index[0] > 1.5 and index[4] < index[0] - 0.2, index


def test_normalise_per_slice_maps_a_flat_slice_to_zero():
    m = torch.stack([torch.full((4, 4), 3.0), torch.arange(16.0).view(4, 4)])
    n = normalise_per_slice(m)
    assert float(n[0].abs().max()) == 0.0 and float(n[1].max()) == 1.0 and float(n[1].min()) == 0.0


def test_unknown_cam_layer_is_refused(classifier):
    with pytest.raises(ValueError, match=r"CAM layers \[5\] do not exist"):
        LayerCAM(classifier, [0, 5])


@pytest.fixture(scope="module")
def cdm():
    torch.manual_seed(1)
    return build_cdm(DiffusionConfig(), 2).eval().requires_grad_(False)


def test_cdm_saliency_is_deterministic_independent_of_the_batch_and_restores_the_cdm(cdm, classifier, x):
    before = cdm.class_embedding.weight.clone()
    sal = CDMSaliency(cdm, classifier, NoiseSchedule(DiffusionConfig()), SaliencyConfig(steps=4), noise_seed=0)
    a = sal(x)
    assert a.shape == (4, 32, 32) and float(a.min()) == 0.0 and float(a.max()) == 1.0
    torch.testing.assert_close(a, sal(x))
    torch.testing.assert_close(a[2:3], sal(x[2:3]), atol=1e-4, rtol=1e-3)  # float summation order
    assert cdm.class_embedding.num_embeddings == 2 and torch.equal(cdm.class_embedding.weight, before)


def test_cdm_saliency_is_blank_when_the_conditions_do_not_differ(cdm, classifier, x):
    """tau = 0 and no guidance: both paths are the positive one, so nothing is salient."""
    same = SaliencyConfig(steps=3, tau=0.0, guidance=0.0)
    assert float(CDMSaliency(cdm, classifier, NoiseSchedule(DiffusionConfig()), same)(x).abs().max()) == 0.0
    guided = SaliencyConfig(steps=3, tau=0.0, guidance=10.0)
    assert float(CDMSaliency(cdm, classifier, NoiseSchedule(DiffusionConfig()), guided)(x).max()) == 1.0


def test_ddim_timesteps_stride_from_the_noise_level_to_the_clean_image():
    pairs = ddim_timesteps(400, 10)
    assert pairs[0] == (400, 360) and pairs[-1] == (40, -1) and len(pairs) == 10
    with pytest.raises(ValueError, match="steps <= noise_level"):
        ddim_timesteps(5, 10)
    with pytest.raises(ValueError, match="outside the schedule"):
        CDMSaliency(build_cdm(DiffusionConfig(), 1), None, NoiseSchedule(DiffusionConfig()), SaliencyConfig(noise_level=1000))


@pytest.mark.parametrize("source", ["both", "cam", "mg"])
def test_seeds_from_one_map_or_both(source):
    g = torch.Generator().manual_seed(0)
    cam, mg = torch.rand(2, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g)
    cfg = SeedConfig(cam_threshold=0.5, mg_threshold=0.3, background_per_slice=10_000, background_in_body=False)
    seeds = fuse_seeds(cam, mg, torch.ones(2, 16, 16, dtype=torch.bool), cfg, torch.arange(2), source=source)
    on = {"both": (cam > 0.5) & (mg > 0.3), "cam": cam > 0.5, "mg": mg > 0.3}[source]
    off = {"both": (cam <= 0.5) & (mg <= 0.3), "cam": cam <= 0.5, "mg": mg <= 0.3}[source]
    assert torch.equal(seeds == FOREGROUND, on) and torch.equal(seeds == BACKGROUND, off)
    with pytest.raises(ValueError, match="seed source"):
        fuse_seeds(cam, mg, torch.ones(2, 16, 16, dtype=torch.bool), cfg, torch.arange(2), source="fusion")

"""Diffusion features: the fast path (project, then upsample) equals the paper-literal stack."""

from __future__ import annotations

import pytest
import torch

from cldf.config import DecoderConfig, DiffusionConfig, FeatureConfig
from cldf.decoder import PixelDecoder
from cldf.features import DiffusionFeatures, gather_at_pixels, literal_feature_stack
from cldf.models import NoiseSchedule, build_cdm


@pytest.fixture(scope="module")
def cdm():
    torch.manual_seed(0)
    return build_cdm(DiffusionConfig(), 2).eval()


@pytest.fixture(scope="module")
def slices():
    return torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("blocks", [(0,), (0, 1), (1, 2), (0, 1, 2)])
def test_fast_embeddings_equal_the_literal_path(cdm, slices, blocks):
    cfg = FeatureConfig(blocks=blocks)
    sched = NoiseSchedule(DiffusionConfig())
    feats = DiffusionFeatures(cdm, sched, cfg)
    block = feats(slices)
    stack = literal_feature_stack(cdm, sched, cfg, slices)
    assert stack.shape == (3, sum(feats.block_channels), 32, 32)
    g = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 32 * 32, (50,), generator=g)
    labels = torch.tensor([1] * 20 + [2] * 30)
    data = [stack[i].flatten(1).T[pixels] for i in range(3)]
    decoder = PixelDecoder(DecoderConfig(epochs=1)).fit(data, [labels] * 3, progress=False)
    fast = decoder.embed(block, (32, 32), feats.block_channels)
    literal = decoder.embed_stack(stack)
    torch.testing.assert_close(fast, literal, atol=1e-4, rtol=1e-4)
    projected = feats(slices, project=decoder.block_weights(feats.block_channels))
    assert all(p.shape[1] == 16 for p in projected)
    torch.testing.assert_close(decoder.embed_projected(projected, (32, 32)), literal, atol=1e-4, rtol=1e-4)


def test_gathering_at_seed_pixels_equals_indexing_the_upsampled_stack(cdm, slices):
    cfg = FeatureConfig(blocks=(0, 1))
    sched = NoiseSchedule(DiffusionConfig())
    block = DiffusionFeatures(cdm, sched, cfg)(slices)
    stack = literal_feature_stack(cdm, sched, cfg, slices)
    pixels = torch.tensor([0, 31, 32, 500, 1023, 777])
    got = gather_at_pixels([f[1:2] for f in block], pixels, (32, 32))
    torch.testing.assert_close(got, stack[1].flatten(1).T[pixels], atol=1e-5, rtol=1e-5)


def test_features_do_not_depend_on_the_batch(cdm, slices):
    feats = DiffusionFeatures(cdm, NoiseSchedule(DiffusionConfig()), FeatureConfig())
    together = feats(slices)
    alone = feats(slices[2:3])
    for a, b in zip(together, alone):
        torch.testing.assert_close(a[2:3], b, atol=1e-5, rtol=1e-5)


def test_refuses_blocks_and_timesteps_that_do_not_exist(cdm):
    sched = NoiseSchedule(DiffusionConfig())
    with pytest.raises(ValueError, match=r"blocks \[7\] do not exist"):
        DiffusionFeatures(cdm, sched, FeatureConfig(blocks=(0, 7)))
    with pytest.raises(ValueError, match=r"timesteps \[1000\] are outside"):
        DiffusionFeatures(cdm, sched, FeatureConfig(timesteps=(1, 1000)))


def test_chunked_forward_passes_give_the_same_features(cdm, slices):
    sched = NoiseSchedule(DiffusionConfig())
    one = DiffusionFeatures(cdm, sched, FeatureConfig(max_batch=1))(slices)
    all_at_once = DiffusionFeatures(cdm, sched, FeatureConfig(max_batch=64))(slices)
    for a, b in zip(one, all_at_once):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

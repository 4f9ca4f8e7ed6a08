"""The supervised contrastive loss against the paper's equation, and the decoder estimator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cldf.config import DecoderConfig
from cldf.decoder import PixelDecoder, supervised_contrastive_loss


def eq1_direct(z: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """CLDF Eq. 1 written out with loops: sum over anchors of -1/|P(i)| sum_p log softmax."""
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(len(z)) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


@pytest.mark.parametrize("seed,tau", [(0, 0.1), (1, 0.5), (2, 1.0)])
def test_loss_equals_a_direct_implementation_of_eq1(seed, tau):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(23, 16, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(1, 3, (23,), generator=g)
    y[0] = 3  # an anchor without positives is skipped
    assert float(supervised_contrastive_loss(z, y, tau)) == pytest.approx(eq1_direct(z, y, tau), rel=1e-9)


def test_loss_is_lower_when_classes_separate():
    y = torch.tensor([1] * 10 + [2] * 10)
    apart = F.normalize(torch.cat([torch.ones(10, 2) * torch.tensor([1.0, 0]), torch.ones(10, 2) * torch.tensor([0, 1.0])]), dim=1)
    mixed = F.normalize(torch.randn(20, 2, generator=torch.Generator().manual_seed(0)), dim=1)
    assert supervised_contrastive_loss(apart, y, 0.1) < supervised_contrastive_loss(mixed, y, 0.1)


def _blobs(seed: int):
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for _ in range(8):
        fg = torch.randn(40, 12, generator=g) + 2.0
        bg = torch.randn(120, 12, generator=g) - 2.0
        feats.append(torch.cat([fg, bg]))
        labels.append(torch.tensor([1] * 40 + [2] * 120))
    return feats, labels


def test_fit_returns_self_with_fitted_attributes_and_is_seeded():
    feats, labels = _blobs(0)
    cfg = DecoderConfig(lr=0.1, momentum=0.9, epochs=3)
    a = PixelDecoder(cfg).fit(feats, labels, progress=False)
    b = PixelDecoder(cfg).fit(feats, labels, progress=False)
    assert isinstance(a, PixelDecoder) and a.loss_history_ and a.foreground_prototype_.shape == (16,)
    assert a.loss_history_ == b.loss_history_
    assert a.loss_history_[-1] < a.loss_history_[0]


def test_fit_within_a_time_limit_stops_at_a_batch_boundary_after_the_first_batch():
    feats, labels = _blobs(2)
    cfg = DecoderConfig(epochs=3, batch_slices=2)
    whole = PixelDecoder(cfg).fit(feats, labels, progress=False)
    cut = PixelDecoder(cfg).fit(feats, labels, progress=False, seconds=0.0)
    assert whole.epochs_ == 3 and len(whole.loss_history_) == 12
    assert cut.epochs_ == 0.25 and cut.loss_history_ == whole.loss_history_[:1]  # the same first step, then stopped
    assert cut.foreground_prototype_.shape == whole.foreground_prototype_.shape


def test_state_round_trip_gives_the_same_embeddings():
    feats, labels = _blobs(1)
    a = PixelDecoder(DecoderConfig(epochs=1)).fit(feats, labels, progress=False)
    b = PixelDecoder(DecoderConfig(epochs=1)).load_state_dict(a.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(a.mlp_(x), b.mlp_(x))


def test_fit_without_seeds_says_so():
    with pytest.raises(ValueError, match="no seed pixels"):
        PixelDecoder(DecoderConfig()).fit([], [])

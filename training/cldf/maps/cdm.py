"""CDM saliency (Hu et al., MICCAI 2023), the method CLDF builds on: where the two conditions' denoising paths part.

A slice is noised to level Q, then denoised with DDIM in R steps. At every step
the CDM predicts the next image twice from the same ``x_t``: under the positive
condition (target present) and under a condition embedding moved by tau from
the positive class towards the negative one, the latter optionally pushed
further towards "absent" by classifier guidance of scale s. The absolute
difference of the two predictions, summed over channels and accumulated over
the steps, is the saliency map; the path continues from the positive
prediction. Q and R are indices into the bundle's own noise schedule, so with
the paper's T = 1000 linear schedule the paper's Q = 400 and R = 10 are used
unchanged; for another T they scale as ``Q * T / 1000``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..config import SaliencyConfig
from ..models import NoiseSchedule, SliceClassifier
from .base import normalise_per_slice

MOVED = 2  # the extra class index that carries the moved condition embedding


@contextlib.contextmanager
def moved_condition(cdm: nn.Module, tau: float) -> Iterator[None]:
    """Give the CDM a third class embedding ``e1 + tau * (e0 - e1)`` for the duration of a block."""
    original = cdm.class_embedding
    e = original.weight.detach()
    extended = nn.Embedding(3, e.shape[1]).to(e.device, e.dtype)
    extended.weight.data = torch.cat([e, (e[1] + tau * (e[0] - e[1]))[None]])
    cdm.class_embedding = extended
    cdm.num_class_embeds = 3
    try:
        yield
    finally:
        cdm.class_embedding = original
        cdm.num_class_embeds = original.num_embeddings


def ddim_timesteps(noise_level: int, steps: int) -> list[tuple[int, int]]:
    """``(t, t_prev)`` pairs from Q down to 0 in R equal strides; ``t_prev = -1`` means the clean image."""
    if not 0 < steps <= noise_level:
        raise ValueError(f"CDM saliency needs 0 < steps <= noise_level, not steps={steps}, noise_level={noise_level}")
    ts = [round(noise_level * (steps - i) / steps) for i in range(steps)]
    return list(zip(ts, ts[1:] + [-1]))


class CDMSaliency:
    """The CDM saliency map of clean slices, in [0, 1] per slice.

    One seeded noise is shared by every slice, so a slice's map does not
    depend on which batch it was in.
    """

    def __init__(self, cdm: nn.Module, classifier: SliceClassifier | None, schedule: NoiseSchedule, cfg: SaliencyConfig,
                 noise_seed: int = 0):
        schedule.check([cfg.noise_level], "CDM saliency noise level")
        self.pairs = ddim_timesteps(cfg.noise_level, cfg.steps)
        self.cdm = cdm
        self.classifier = classifier if cfg.guidance > 0 else None
        self.schedule = schedule
        self.cfg = cfg
        self.noise_seed = noise_seed

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` clean slices -> ``(B, H, W)`` maps in [0, 1]."""
        b, dev = len(x0), x0.device
        a_bar = self.schedule.alphas_cumprod.to(dev)
        g = torch.Generator().manual_seed(self.noise_seed)
        noise = torch.randn(x0.shape[1:], generator=g).to(dev, x0.dtype).expand_as(x0)
        q = torch.full((b,), self.cfg.noise_level, device=dev)
        x = self.schedule.add_noise(x0, noise, q)
        labels = torch.tensor([1] * b + [MOVED] * b, device=dev)
        saliency = torch.zeros(b, *x0.shape[-2:], device=dev)
        with moved_condition(self.cdm, self.cfg.tau), torch.no_grad():
            for t, t_prev in self.pairs:
                tt = torch.full((2 * b,), t, device=dev)
                eps = self.cdm(torch.cat([x, x]), tt, class_labels=labels).float()
                eps_pos, eps_neg = eps[:b], eps[b:]
                if self.classifier is not None:
                    eps_neg = eps_neg - (1 - a_bar[t]).sqrt() * self.cfg.guidance * self._grad_log_absent(x, t)
                a_prev = a_bar[t_prev] if t_prev >= 0 else torch.ones((), device=dev)
                x_pos = _ddim_step(x, eps_pos, a_bar[t], a_prev)
                x_neg = _ddim_step(x, eps_neg, a_bar[t], a_prev)
                saliency += (x_pos - x_neg).abs().sum(dim=1)
                x = x_pos
        return normalise_per_slice(saliency)

    def _grad_log_absent(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """``d log p(y=0 | x_t, t) / d x_t`` of the noisy classifier (classifier guidance)."""
        with torch.enable_grad():
            xt = x.detach().float().requires_grad_(True)
            log_p = self.classifier(xt, torch.full((len(x),), t, device=x.device)).float().log_softmax(dim=1)[:, 0]
            (grad,) = torch.autograd.grad(log_p.sum(), xt)
        return grad


def _ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0) from ``x_t`` to ``x_{t_prev}`` given the predicted noise."""
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

"""The mean-gradient map of the noisy-image classifier (CLDF, Sec. 2.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import NoiseSchedule, SliceClassifier
from .base import normalise_per_slice


def shift_offsets(n: int, period: int) -> list[tuple[int, int]]:
    """``(dy, dx)`` for each of ``n`` timesteps, cycling through the ``period x period`` lattice (all zero if period < 2)."""
    if period < 0:
        raise ValueError(f"the mean-gradient shift period must be 0 (no shifts) or a positive number of pixels, not {period}")
    if period < 2:
        return [(0, 0)] * n
    return [((j // period) % period, j % period) for j in range(n)]


# Noisy images per backward pass, in pixels: 16 at 64 x 64, 1 at 256 x 256. The maps do not depend on it;
# the autograd activations (a large part of the peak memory of training and inference) grow with it.
PIXELS_PER_PASS = 2**16


class MeanGradient:
    """``mean_t |d log p(y=1 | x_t, t) / d x_t|``, summed over channels, min-max per slice.

    One seeded noise per timestep is shared by every slice, so a slice's map
    does not depend on which batch it was in. The classifier's strided
    convolutions make the gradient of one input periodic in the stride (stripes
    in the map); with ``shift_period`` each timestep's noisy input is rolled by
    another sub-stride offset and its gradient rolled back, so the average over
    timesteps also averages the stride pattern out, at no extra cost.
    """

    def __init__(self, classifier: SliceClassifier, schedule: NoiseSchedule, timesteps: Sequence[int], noise_seed: int,
                 shift_period: int = 0):
        schedule.check(timesteps, "mean-gradient timesteps")
        self.classifier = classifier
        self.schedule = schedule
        self.timesteps = list(timesteps)
        self.noise_seed = noise_seed
        self.offsets = shift_offsets(len(self.timesteps), shift_period)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` clean slices -> ``(B, H, W)`` maps in [0, 1]."""
        b, n_t = len(x0), len(self.timesteps)
        g = torch.Generator().manual_seed(self.noise_seed)
        noise = torch.randn((n_t, *x0.shape[1:]), generator=g).to(x0.device, x0.dtype)
        t = torch.tensor(self.timesteps, device=x0.device).repeat_interleave(b)
        # timesteps go into the batch dimension: (T*B, C, H, W)
        xt = self.schedule.add_noise(x0.repeat(n_t, 1, 1, 1), noise.repeat_interleave(b, dim=0), t)
        xt = self._roll(xt, b, sign=1)
        per_pass = max(1, PIXELS_PER_PASS // (x0.shape[-2] * x0.shape[-1]))
        grad = torch.cat([self._gradient(xi, ti) for xi, ti in zip(xt.split(per_pass), t.split(per_pass))])
        grad = self._roll(grad, b, sign=-1)
        mg = grad.float().abs().sum(dim=1).view(n_t, b, *x0.shape[-2:]).mean(dim=0)
        return normalise_per_slice(mg)

    def _gradient(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            log_p = self.classifier(xt, t).float().log_softmax(dim=1)[:, 1]
            (grad,) = torch.autograd.grad(log_p.sum(), xt)
        return grad

    def _roll(self, x: torch.Tensor, b: int, sign: int) -> torch.Tensor:
        """Roll each timestep's ``b`` images by its offset (``sign=-1`` undoes it)."""
        if all(o == (0, 0) for o in self.offsets):
            return x
        parts = x.split(b)
        return torch.cat([p.roll((sign * dy, sign * dx), dims=(-2, -1)) for p, (dy, dx) in zip(parts, self.offsets)])

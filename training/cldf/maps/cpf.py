"""CPF-CTE as a CAM source: the same call contract as `LayerCAM` and `AmeCamMap`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cpf_cte import TARGET, CpfCte
from .base import normalise_per_slice


class CpfCteMap:
    """The CPF-CTE target map and presence of a batch of clean slices at the bundle's resolution."""

    def __init__(self, network: CpfCte):
        self.network = network.eval()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps for a batch of clean slices.

        Args:
            x: ``(B, C, R, R)`` slices in [-1, 1].

        Returns:
            ``(B, R, R)`` maps in [0, 1] per slice (the target's patch probabilities, upsampled bilinearly and
            min-max normalised) and ``(B,)`` probabilities that the target is present (its top-k pooled score).
        """
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):  # a small network: float32
            out = self.network(x.float())
            grid = out.target_map()[:, None]
        up = F.interpolate(grid, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        return normalise_per_slice(up).clamp(0.0, 1.0), out.scores[:, TARGET].float()

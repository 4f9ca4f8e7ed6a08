"""What the networks give per slice at the bundle's resolution (`SliceMaps`), and the slice gate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def slice_presence(classifier: torch.nn.Module, x: torch.Tensor, device: torch.device, batch: int = 16) -> torch.Tensor:
    """Probability that each of ``(N, C, H, W)`` clean slices holds the target (the slice gate)."""
    if len(x) == 0:
        return torch.zeros(0)
    with torch.inference_mode():
        return torch.cat([classifier(b.to(device), torch.zeros(len(b), dtype=torch.long, device=device))
                          .float().softmax(1)[:, 1].cpu() for b in x.split(batch)])


@dataclass
class SliceMaps:
    """Per-slice results at bundle resolution, ``(B, R, R)`` unless noted."""

    cam: torch.Tensor
    mean_gradient: torch.Tensor
    presence: torch.Tensor  # (B,) probability that the target is in the slice
    body: torch.Tensor
    seeds: torch.Tensor  # 1 foreground, 2 background, 0 none; empty on slices judged negative
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # optional maps, e.g. "cdm"
    other_cams: dict[str, torch.Tensor] = field(default_factory=dict)  # CAM sources besides the bundle's

"""AME-CAM (Chen et al., MICCAI 2023) as a CAM source: the same call contract as `LayerCAM`."""

from __future__ import annotations

import torch

from ..ame_cam import AmeCam


class AmeCamMap:
    """The AME-CAM map and presence of a batch of clean slices.

    The networks see the slices at their own resolution (``ame_cam.resolution``):
    give them slices cut at that size from the volume, not resized bundle slices.
    """

    def __init__(self, networks: AmeCam):
        self.networks = networks.eval()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps for a batch of clean slices.

        Args:
            x: ``(B, C, H, W)`` slices in [-1, 1].

        Returns:
            ``(B, H, W)`` maps in [0, 1] (high on the target) and ``(B,)`` probabilities that the
            target is present (the last exit's).
        """
        with torch.inference_mode():
            cam, presence = self.networks(x)
        return cam.float().clamp(0.0, 1.0), presence.float()

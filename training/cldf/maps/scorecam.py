"""Score-CAM (Wang et al., CVPRW 2020): channel weights from how much each activation, used as a mask, raises the score.

A gradient-free CAM, a baseline of the CLDF paper's Table 1. For every channel
k of one encoder level: upsample its activation to the slice, min-max it to a
mask M_k, blend the slice towards the background by that mask
(``M_k x + (1 - M_k) b``, with ``b`` the padding value -1 of normalised
slices), and take the increase of the target probability over the blank
slice's as the channel's score; the map is ``ReLU(sum_k softmax(score)_k A_k)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import SliceClassifier
from .base import ActivationRecorder, normalise_per_slice

BACKGROUND = -1.0  # normalised slices are padded with -1


class ScoreCAM:
    """Score-CAM of one encoder level of the clean-slice classifier.

    Args:
        classifier: the clean-slice classifier.
        layer: encoder level whose channels are scored.
        batch: masked slices per forward pass.
    """

    def __init__(self, classifier: SliceClassifier, layer: int, batch: int = 64):
        n = len(classifier.down_blocks)
        if not 0 <= layer < n:
            raise ValueError(f"Score-CAM layer {layer} does not exist; the classifier has encoder levels 0..{n - 1}")
        self.classifier = classifier
        self.layer = layer
        self.batch = batch

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` slices -> ``(B, H, W)`` maps in [0, 1] and ``(B,)`` presence probabilities."""
        zeros = torch.zeros(len(x), dtype=torch.long, device=x.device)
        with ActivationRecorder([self.classifier.down_blocks[self.layer]]) as rec:
            presence = self.classifier(x, zeros).float().softmax(dim=1)[:, 1]
            acts = rec.outputs[0].float()
        blank = self._probability(torch.full_like(x[:1], BACKGROUND))
        masks = normalise_per_slice(F.interpolate(acts, size=x.shape[-2:], mode="bilinear", align_corners=False)
                                    .flatten(0, 1)).view(*acts.shape[:2], *x.shape[-2:])  # (B, K, H, W)
        maps = []
        for xi, mi, ai in zip(x, masks, acts):
            blended = mi[:, None] * xi[None] + (1 - mi[:, None]) * BACKGROUND  # (K, C, H, W)
            scores = torch.cat([self._probability(part) for part in blended.split(self.batch)]) - blank
            weights = scores.softmax(dim=0)
            cam = F.relu((weights[:, None, None] * ai).sum(dim=0))
            maps.append(F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0])
        return normalise_per_slice(torch.stack(maps)), presence

    def _probability(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return self.classifier(x, t).float().softmax(dim=1)[:, 1]

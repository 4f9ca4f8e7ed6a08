"""Grad-CAM (Selvaraju et al. 2017) and LayerCAM (Jiang et al. 2021) on the slice classifier; `build_cam` picks a CAM source."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..ame_cam import AmeCam
from ..config.constraints import CAM_METHODS
from ..cpf_cte import CpfCte
from ..models import SliceClassifier
from .ame import AmeCamMap
from .base import ActivationRecorder, normalise_per_slice
from .cpf import CpfCteMap


class _CAM:
    """Shared part: record activations of some encoder levels, take gradients of the class-1 logit."""

    def __init__(self, classifier: SliceClassifier, layers: Sequence[int]):
        n = len(classifier.down_blocks)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"CAM layers {bad} do not exist; the classifier has encoder levels 0..{n - 1}")
        self.classifier = classifier
        self.layers = list(layers)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps for a batch of clean slices.

        Args:
            x: ``(B, C, H, W)`` slices.

        Returns:
            ``(B, H, W)`` maps in [0, 1] and ``(B,)`` probabilities that the target is present.
        """
        modules = [self.classifier.down_blocks[i] for i in self.layers]
        # frozen weights: the input carries the graph so activations get gradients
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), ActivationRecorder(modules) as rec:
            logits = self.classifier(x, torch.zeros(len(x), dtype=torch.long, device=x.device))
            acts = rec.outputs
            grads = torch.autograd.grad(logits[:, 1].sum(), acts)
        maps = [self.combine(a.detach().float(), g.float()) for a, g in zip(acts, grads)]
        maps = [normalise_per_slice(F.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]) for m in maps]
        cam = normalise_per_slice(torch.stack(maps).mean(dim=0))
        return cam, logits.detach().float().softmax(dim=1)[:, 1]

    @staticmethod
    def combine(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GradCAM(_CAM):
    """Channel weights are the spatially averaged gradients of one layer."""

    @staticmethod
    def combine(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        weights = grads.mean(dim=(2, 3), keepdim=True)
        return F.relu((weights * acts).sum(dim=1))


class LayerCAM(_CAM):
    """Each location weighted by its own positive gradient; per-layer maps normalised and averaged."""

    @staticmethod
    def combine(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return F.relu((F.relu(grads) * acts).sum(dim=1))


def build_cam(method: str, classifier: SliceClassifier, layers: Sequence[int], gradcam_layer: int,
              ame_cam: AmeCam | None = None, cpf_cte: CpfCte | None = None) -> _CAM | AmeCamMap | CpfCteMap:
    """The bundle's CAM source; ``"ame-cam"`` and ``"cpf-cte"`` need the bundle's networks of that name."""
    if method == "layercam":
        return LayerCAM(classifier, layers)
    if method == "gradcam":
        return GradCAM(classifier, [gradcam_layer])
    if method == "ame-cam":
        if ame_cam is None:
            raise ValueError("CAM method 'ame-cam' needs AME-CAM networks, and this bundle has none "
                             "(no ame_cam.safetensors); train one with --set ame_cam.enabled=true")
        return AmeCamMap(ame_cam)
    if method == "cpf-cte":
        if cpf_cte is None:
            raise ValueError("CAM method 'cpf-cte' needs a CPF-CTE network, and this bundle has none "
                             "(no cpf_cte.safetensors); add one with `cldf cpf-cte --bundle BUNDLE --data MANIFEST`")
        return CpfCteMap(cpf_cte)
    raise ValueError(f"unknown CAM method '{method}'; choose one of {CAM_METHODS}")

"""Saliency maps from slice classifiers, each in [0, 1] per slice.

`GradCAM` and `LayerCAM` explain the clean-slice classifier; `MeanGradient`
explains the noisy-image classifier over a range of timesteps; `CDMSaliency`
compares the diffusion model's denoising under the two conditions; `AmeCamMap`
is AME-CAM's map of its own multi-exit classifier; `CpfCteMap` the patch map of the CPF-CTE ViT.
"""

from .ame import AmeCamMap
from .base import ActivationRecorder, normalise_per_slice
from .cam import GradCAM, LayerCAM, build_cam
from .cdm import CDMSaliency
from .cpf import CpfCteMap
from .gradient import MeanGradient

__all__ = ["ActivationRecorder", "AmeCamMap", "CDMSaliency", "CpfCteMap", "GradCAM", "LayerCAM", "MeanGradient", "build_cam", "normalise_per_slice"]

"""AME-CAM networks and losses (Chen, Hu, Shi, Ho, MICCAI 2023; METHODS.md, "AME-CAM").

Three pieces:

1. `MultiExitClassifier`: a ResNet-18-like encoder (MONAI basic blocks, instance
   norm) with an exit after each of its four stages. Exit k is a 1x1 convolution
   to one channel, the activation map ``M_k``; its global average (or the mean of its
   top pixels, ``top_fraction``) is the exit's logit, so every exit's map is a class
   activation map by construction.
2. `AttentionAggregator`: from the grey image times the min-max normalised exit
   maps, a small conv net predicts per-pixel softmax weights ``W`` over the four
   exits; the fused map is ``F = sum_c W_c A_c`` of the raw (upsampled) maps.
3. `AmeCam`: both, with the inference map ``minmax(mean(A_1..A_4, F))`` and the
   slice presence ``sigmoid(logit_4)``.

Losses: `multi_exit_loss` (Eq. 1: weighted BCE of the exits) and
`region_contrastive_loss` (Eqs. 2-4: pull foreground regions of a batch together,
background regions together, push foreground from background).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from .config import AmeCamConfig
from .config.constraints import STEM_STRIDES

N_EXITS = 4


def check_config(cfg: AmeCamConfig) -> None:
    """Refuse settings the networks cannot be built with, naming the value and what is allowed."""
    if len(cfg.widths) != N_EXITS or min(cfg.widths) < 1:
        raise ValueError(f"ame_cam.widths must be {N_EXITS} positive channel counts, not {tuple(cfg.widths)}")
    if len(cfg.exit_weights) != N_EXITS or min(cfg.exit_weights) < 0:
        raise ValueError(f"ame_cam.exit_weights must be {N_EXITS} non-negative weights, not {tuple(cfg.exit_weights)}")
    if cfg.stem_stride not in STEM_STRIDES:
        raise ValueError(f"ame_cam.stem_stride must be one of {STEM_STRIDES}, not {cfg.stem_stride}")
    if not 0 < cfg.top_fraction <= 1:
        raise ValueError(f"ame_cam.top_fraction must be in (0, 1], not {cfg.top_fraction}")
    if not cfg.map_exits or len(set(cfg.map_exits)) != len(cfg.map_exits) or not set(cfg.map_exits) <= set(range(N_EXITS)):
        raise ValueError(f"ame_cam.map_exits must be distinct exits among 0..{N_EXITS - 1}, not {tuple(cfg.map_exits)}")
    if cfg.resolution < 0:
        raise ValueError(f"ame_cam.resolution must be 0 (the bundle's) or a positive size, not {cfg.resolution}")


def grey(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` slices in [-1, 1] -> ``(B, 1, H, W)`` channel mean in [0, 1] (air is 0)."""
    return (x.mean(dim=1, keepdim=True) + 1.0) / 2.0


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each ``(H, W)`` map of a ``(B, K, H, W)`` batch to [0, 1] (differentiable; a flat map gives 0)."""
    flat = maps.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values.unsqueeze(-1)
    hi = flat.max(dim=2, keepdim=True).values.unsqueeze(-1)
    return (maps - lo) / (hi - lo).clamp_min(1e-6)


class MultiExitClassifier(nn.Module):
    """ResNet-18-like encoder with one exit per stage.

    Args:
        cfg: widths of the four stages and the stem stride.
        in_channels: image channels.
    """

    def __init__(self, cfg: AmeCamConfig, in_channels: int):
        super().__init__()
        check_config(cfg)
        self.stem_stride = cfg.stem_stride
        self.top_fraction = cfg.top_fraction
        self.encoder = ResNet(
            "basic", [2, 2, 2, 2], list(cfg.widths), spatial_dims=2, n_input_channels=in_channels,
            conv1_t_size=7, conv1_t_stride=1 if cfg.stem_stride == 1 else 2, no_max_pool=cfg.stem_stride < 4,
            feed_forward=False, norm=("instance", {"affine": True}),
        )
        self.exits = nn.ModuleList(nn.Conv2d(w, 1, kernel_size=1) for w in cfg.widths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Exit logits and maps.

        Args:
            x: ``(B, C, H, W)`` slices.

        Returns:
            ``(B, 4)`` logits (shallow to deep; each its map pooled by `pool`) and the four
            ``(B, 1, h_k, w_k)`` raw exit maps, ``h_k = H / (stem_stride * 2**k)``.
        """
        e = self.encoder
        h = e.act(e.bn1(e.conv1(x)))
        if self.stem_stride == 4:
            h = e.maxpool(h)
        maps = []
        for stage, exit_conv in zip((e.layer1, e.layer2, e.layer3, e.layer4), self.exits):
            h = stage(h)
            maps.append(exit_conv(h))
        logits = torch.stack([pool(m, self.top_fraction) for m in maps], dim=1)
        return logits, maps


def pool(m: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(B, 1, h, w)`` map -> ``(B,)`` mean of its top ``fraction`` of pixels (at least one; 1.0: the mean)."""
    flat = m.flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.mean(dim=1) if k >= flat.shape[1] else flat.topk(k, dim=1).values.mean(dim=1)


def upsample(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Four ``(B, 1, h_k, w_k)`` maps -> ``(B, 4, H, W)`` (bilinear): the paper's ``A``."""
    return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)


class AttentionAggregator(nn.Module):
    """Per-pixel weights over the exits from the image masked by each exit map.

    Three conv3x3 + BN + ReLU layers of ``hidden`` channels and a conv3x3 to 4
    channels; a softmax over those gives ``W`` (sums to 1 at every pixel).
    """

    def __init__(self, hidden: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (N_EXITS, hidden, hidden):
            layers += [nn.Conv2d(c_in, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(hidden, N_EXITS, 3, padding=1))

    def forward(self, x: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse the exit maps of a batch.

        Args:
            x: ``(B, C, H, W)`` slices in [-1, 1].
            maps: ``(B, 4, H, W)`` raw exit maps ``A`` at the slice size.

        Returns:
            the fused map ``F = sum_c W_c A_c`` ``(B, H, W)`` and the weights ``W`` ``(B, 4, H, W)``.
        """
        weights = self.net(grey(x) * minmax(maps)).softmax(dim=1)
        return (weights * maps).sum(dim=1), weights


class AmeCam(nn.Module):
    """The multi-exit classifier and the aggregator: what ``ame_cam.safetensors`` holds."""

    def __init__(self, cfg: AmeCamConfig, in_channels: int):
        super().__init__()
        self.classifier = MultiExitClassifier(cfg, in_channels)
        self.aggregator = AttentionAggregator()
        self.map_exits = list(cfg.map_exits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The AME-CAM map and the slice presence.

        Args:
            x: ``(B, C, H, W)`` slices in [-1, 1].

        Returns:
            ``(B, H, W)`` map in [0, 1] per slice (mean of the exit maps in ``map_exits``, all four in
            the paper, and the fused map, min-max normalised; high on the target) and ``(B,)``
            presence ``sigmoid(logit_4)``.
        """
        logits, exit_maps = self.classifier(x)
        a = upsample(exit_maps, tuple(x.shape[-2:]))
        fused, _ = self.aggregator(x, a)
        mean = torch.cat([a[:, self.map_exits], fused[:, None]], dim=1).mean(dim=1)
        return minmax(mean[:, None])[:, 0], torch.sigmoid(logits[:, -1])


# --------------------------------------------------------------------------- losses
def multi_exit_loss(logits: torch.Tensor, labels: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_k w_k BCE(logit_k, y)`` (AME-CAM Eq. 1): deeper exits weigh more.

    Args:
        logits: ``(B, 4)`` exit logits; labels: ``(B,)`` 0 / 1 slice labels; weights: the four ``w_k``.
    """
    y = labels.float()[:, None].expand_as(logits)
    per_exit = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=0)
    return (per_exit * torch.as_tensor(weights, dtype=per_exit.dtype, device=per_exit.device)).sum()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, D)``, ``(M, D)`` -> ``(N, M)`` cosine similarities, clamped away from 0 and 1 for the logs."""
    return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).clamp(5e-4, 1 - 5e-4)


def pull_together(e: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rank-weighted ``-log sim`` over all pairs of a batch's region features ``(N, D)``.

    The most similar other region of each row weighs 1, the next ``exp(-alpha)``, and so on
    (a row's own entry, ``-log 1 = 0``, adds nothing).
    """
    sim = _cosine(e, e)
    rank = sim.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = itself
    weights = torch.exp(-alpha * (rank - 1).clamp_min(0).float())
    return (-sim.log() * weights).mean()


def push_apart(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """``-log(1 - sim)`` between every foreground and every background region feature."""
    return -(1 - _cosine(fg, bg)).log().mean()


def region_contrastive_loss(x: torch.Tensor, fused: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """AME-CAM's aggregation loss on a batch of positive slices.

    Foreground features are ``grey(x) * F`` and background features ``grey(x) * (1 - F)``
    (flattened), with ``F`` min-max normalised per slice so both regions are proper
    weightings (the released code uses the raw map); foregrounds are pulled together,
    backgrounds together, and foregrounds pushed from backgrounds.

    Args:
        x: ``(B, C, H, W)`` slices; fused: ``(B, H, W)`` raw fused maps.
    """
    if len(x) < 2:
        raise ValueError(f"the region-contrastive loss compares slices: it needs a batch of at least 2, not {len(x)}")
    g = grey(x)[:, 0]
    f = minmax(fused[:, None])[:, 0]
    fg, bg = (g * f).flatten(1), (g * (1 - f)).flatten(1)
    return pull_together(fg, alpha) + push_apart(fg, bg) + pull_together(bg, alpha)

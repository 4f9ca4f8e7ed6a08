"""CPF-CTE: Context Patch Fusion with Class Token Enhancement, a ViT whose patch classifier localises.

Read for a slice-labelled task with two classes, background (0) and target (1):

1. **Encoder**: a ViT over non-overlapping ``patch`` x ``patch`` patches of the slice (a strided
   convolution embeds them), with learnt position embeddings, ``depth`` pre-norm transformer blocks
   and a final LayerNorm. Departure (``attention_radius``): each patch token attends only to the
   patches within that many grid steps. With 0 it is the paper's plain ViT, global attention and its
   single class token (which takes part in attention and is dropped afterwards); trained from scratch
   on a few hundred slices, that lets patches far from the target carry the slice's evidence, and on
   the brain bundle's validation patients its map never pointed at the tumour. With local attention
   no patch may read a class token (it would carry the whole slice), so there is none.
2. **CF-BiLSTM** (context fusion): the patch tokens, laid out on their grid in raster order, pass one
   bidirectional LSTM along each row and another along each column; the forward and backward
   hidden states (``width / 2`` each) are concatenated, projected back to ``width`` by a linear layer
   per direction of travel (rows, columns), and added to the tokens. A patch's token thus carries the
   context of its row and its column, in time linear in the number of patches.
3. **Class token enhancement**: after the encoder, one learnable token per class. Each patch
   embedding is concatenated with class ``k``'s token and projected back to ``width`` by one linear
   layer shared by the classes, giving a class-specific embedding per patch (the classes never compete
   inside attention).
4. **Patch classifier**: one linear layer; class ``k``'s logit of a patch is read from its class-``k``
   embedding, and a softmax over the two classes gives per-patch class probabilities.
5. **Image scores**: per class, the mean probability of the ``top_k`` most confident patches (top-k
   pooling), trained with a multi-label binary cross-entropy (`cpf_cte_loss`).

Both classes are scored: the target against the slice label, the background against "present"
on every slice (the target never fills a whole slice). With the per-patch softmax, the background
term asks every positive slice to keep ``top_k`` patches that are clearly background, so the target
map cannot spread over the whole slice; the target term alone would let it.

Map (`CpfCteMap`): the target's patch probabilities, upsampled bilinearly to the slice size and
min-max normalised per slice; the slice's presence is its pooled target score.

Sharpening: the paper refines its pseudo-masks with a dense CRF. No dense-CRF package installs
here without compiling (pydensecrf2 1.1 ships a source archive only), so none is used: CPF-CTE's
map seeds the pixel decoders like the other maps (the ``cpf-cte+cl`` row), and the project's
sharpening step is the LiteMedSAM refinement of the final masks (`cldf.refine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CpfCteConfig

N_CLASSES = 2  # background, target
TARGET = 1


def check_config(cfg: CpfCteConfig, resolution: int) -> None:
    """Refuse settings the network cannot be built with, naming the value and what is allowed."""
    if cfg.patch < 1 or resolution % cfg.patch:
        raise ValueError(f"cpf_cte.patch must divide the slice size {resolution}, not {cfg.patch}")
    if cfg.width < 2 or cfg.width % 2:
        raise ValueError(f"cpf_cte.width must be an even number of at least 2, not {cfg.width}")
    if cfg.heads < 1 or cfg.width % cfg.heads:
        raise ValueError(f"cpf_cte.heads must divide cpf_cte.width {cfg.width}, not {cfg.heads}")
    if cfg.depth < 1 or cfg.mlp_ratio < 1:
        raise ValueError(f"cpf_cte.depth and cpf_cte.mlp_ratio must be at least 1, not {cfg.depth}, {cfg.mlp_ratio}")
    if cfg.attention_radius < 0:
        raise ValueError(f"cpf_cte.attention_radius must be 0 (global) or a positive number of patches, "
                         f"not {cfg.attention_radius}")
    n = (resolution // cfg.patch) ** 2
    if not 1 <= cfg.top_k <= n:
        raise ValueError(f"cpf_cte.top_k must be between 1 and the {n} patches of a slice, not {cfg.top_k}")


@dataclass
class CpfCteOutput:
    """What the network gives for ``(B, C, H, W)`` slices with a ``gh`` x ``gw`` patch grid (``N = gh * gw``)."""

    patch_logits: torch.Tensor  # (B, N, 2)
    patch_probs: torch.Tensor  # (B, N, 2): softmax over the classes, per patch
    scores: torch.Tensor  # (B, 2): top-k pooled probabilities, per class
    grid: tuple[int, int]  # (gh, gw)

    def target_map(self) -> torch.Tensor:
        """``(B, gh, gw)`` target probability of each patch."""
        return self.patch_probs[..., TARGET].reshape(-1, *self.grid)


class ContextFusion(nn.Module):
    """CF-BiLSTM: a bidirectional LSTM along the rows and one along the columns of the patch grid, added back."""

    def __init__(self, width: int):
        super().__init__()
        self.rows = nn.LSTM(width, width // 2, batch_first=True, bidirectional=True)
        self.cols = nn.LSTM(width, width // 2, batch_first=True, bidirectional=True)
        self.row_proj = nn.Linear(width, width)
        self.col_proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(B, N, D)`` patch tokens in raster order -> the same tokens plus their row and column context."""
        b, n, d = tokens.shape
        gh, gw = grid
        t = tokens.reshape(b, gh, gw, d)
        rows, _ = self.rows(t.reshape(b * gh, gw, d))  # each row, left to right and back
        cols, _ = self.cols(t.transpose(1, 2).reshape(b * gw, gh, d))  # each column, top to bottom and back
        rows = self.row_proj(rows).reshape(b, n, d)
        cols = self.col_proj(cols).reshape(b, gw, gh, d).transpose(1, 2).reshape(b, n, d)
        return tokens + rows + cols


def top_k_pool(probs: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, N, K)`` per-patch probabilities -> ``(B, K)``: per class, the mean of its ``k`` highest."""
    return probs.topk(k, dim=1).values.mean(dim=1)


def local_attention_mask(grid: tuple[int, int], radius: int) -> torch.Tensor | None:
    """``(N, N)`` mask of a patch grid in raster order, True where attention is not allowed: each patch attends
    to the patches within ``radius`` grid steps (Chebyshev distance); None (global attention) for 0."""
    if radius == 0:
        return None
    rows, cols = (g.flatten() for g in torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"))
    return ((rows[:, None] - rows[None]).abs() > radius) | ((cols[:, None] - cols[None]).abs() > radius)


class CpfCte(nn.Module):
    """The CPF-CTE classifier: what ``cpf_cte.safetensors`` holds.

    Args:
        cfg: the ``cpf_cte`` settings.
        in_channels: image channels.
        resolution: side of the square slices it sees (the bundle's ``data.resolution``).
    """

    def __init__(self, cfg: CpfCteConfig, in_channels: int, resolution: int):
        super().__init__()
        check_config(cfg, resolution)
        self.resolution, self.top_k = resolution, cfg.top_k
        self.grid = (resolution // cfg.patch,) * 2
        self.register_buffer("attention_mask", local_attention_mask(self.grid, cfg.attention_radius), persistent=False)
        d = cfg.width
        self.embed = nn.Conv2d(in_channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        n_cls = int(cfg.attention_radius == 0)  # the paper's class token, with global attention only
        self.cls_token = nn.Parameter(torch.zeros(1, n_cls, d))
        self.pos = nn.Parameter(torch.zeros(1, n_cls + self.grid[0] * self.grid[1], d))
        block = nn.TransformerEncoderLayer(d, cfg.heads, cfg.mlp_ratio * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.context = ContextFusion(d)
        self.class_tokens = nn.Parameter(torch.zeros(N_CLASSES, d))
        self.enhance = nn.Linear(2 * d, d)
        self.classifier = nn.Linear(d, N_CLASSES)
        for p in (self.cls_token, self.pos, self.class_tokens):
            nn.init.trunc_normal_(p, std=0.02)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` slices -> ``(B, N, D)`` patch tokens after the encoder and the context fusion."""
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"CPF-CTE was built for {self.resolution} x {self.resolution} slices, "
                             f"not {x.shape[-2]} x {x.shape[-1]}")
        t = self.embed(x).flatten(2).transpose(1, 2)  # raster order
        n_cls = self.cls_token.shape[1]
        t = torch.cat([self.cls_token.expand(len(x), -1, -1), t], dim=1) + self.pos
        t = self.norm(self.encoder(t, mask=self.attention_mask))[:, n_cls:]  # the class token is dropped
        return self.context(t, self.grid)

    def forward(self, x: torch.Tensor) -> CpfCteOutput:
        """Patch logits and probabilities and the pooled class scores of a batch of slices in [-1, 1]."""
        t = self.tokens(x)
        b, n, d = t.shape
        cls = self.class_tokens[None, :, None, :].expand(b, N_CLASSES, n, d)
        z = self.enhance(torch.cat([t[:, None].expand(b, N_CLASSES, n, d), cls], dim=-1))  # (B, K, N, D)
        logits = torch.einsum("bknd,kd->bnk", z, self.classifier.weight) + self.classifier.bias
        probs = logits.softmax(dim=-1)
        return CpfCteOutput(logits, probs, top_k_pool(probs, self.top_k), self.grid)


def cpf_cte_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE of the pooled scores ``(B, 2)``: background present on every slice, target as labelled ``(B,)``."""
    targets = torch.stack([torch.ones_like(labels, dtype=scores.dtype), labels.to(scores.dtype)], dim=1)
    return F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), targets)

"""The pixel decoder (CLDF, Sec. 2.4): an MLP trained with a supervised contrastive loss on seeds."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import DecoderConfig


def supervised_contrastive_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, Eq. 2; CLDF Eq. 1).

    For anchor i with positives P(i) (same label, not i) and all others A(i):
    ``-1/|P(i)| sum_p log(exp(z_i.z_p / tau) / sum_a exp(z_i.z_a / tau))``,
    averaged over anchors that have a positive.

    Args:
        z: ``(N, E)`` L2-normalised embeddings.
        labels: ``(N,)`` integer labels.
    """
    n = len(z)
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(dim=1)
    has_pos = n_pos > 0
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(dim=1)[has_pos]) / n_pos[has_pos]
    return per_anchor.mean()


class _MLP(nn.Module):
    """``D -> hidden[0] -> ... -> hidden[-1]`` with ReLU between layers; inputs standardised."""

    def __init__(self, in_features: int, hidden: Sequence[int]):
        super().__init__()
        dims = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("in_mean", torch.zeros(in_features))
        self.register_buffer("in_std", torch.ones(in_features))

    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the first layer with the input standardisation folded in."""
        w = self.layers[0].weight / self.in_std
        return w, self.layers[0].bias - w @ self.in_mean

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after the first linear layer, on ``(..., hidden[0])``."""
        for layer in self.layers[1:]:
            h = layer(F.relu(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.first_layer()
        return self.tail(x @ w.T + b)


def _mean_std(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (unbiased) standard deviation over every pixel, one slice at a time."""
    n, total, squares = 0, 0.0, 0.0
    for f in features:
        f = f.double()
        n, total, squares = n + len(f), total + f.sum(dim=0), squares + (f * f).sum(dim=0)
    mean = total / n
    var = (squares - n * mean * mean) / max(n - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float()


class PixelDecoder:
    """Seeds' diffusion features -> embeddings where foreground and background separate.

    Follows the scikit-learn contract: settings in ``__init__``, ``fit`` returns
    ``self``, fitted attributes end in ``_``.
    """

    def __init__(self, cfg: DecoderConfig):
        self.cfg = cfg

    def fit(self, features: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], progress: bool = True,
            seconds: float = math.inf) -> "PixelDecoder":
        """Train on seed pixels.

        Args:
            features: per slice ``(P_i, D)`` features at its seed pixels: a list, or any sequence that
                reads them on indexing (`training.tensorstore.TensorStore`); one batch is held at a time.
            labels: per slice ``(P_i,)`` seed labels (1 foreground, 2 background).
            seconds: stop at a batch boundary once they are used (the first batch always runs);
                ``epochs_`` then says how far training got.
        """
        if not len(features):
            raise ValueError("no seed pixels to train the pixel decoder on: no positive slice produced seeds")
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.mlp_ = _MLP(features[0].shape[1], cfg.hidden)
        mean, std = _mean_std(features)
        self.mlp_.in_mean.copy_(mean)
        self.mlp_.in_std.copy_(std.clamp_min(1e-6))
        opt = torch.optim.SGD(self.mlp_.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        self.loss_history_: list[float] = []
        n, t0, batches = len(features), time.monotonic(), -(-len(features) // cfg.batch_slices)
        bar = tqdm(total=cfg.epochs * batches, desc="pixel decoder", disable=not progress, leave=False)
        starts = [start for _ in range(cfg.epochs) for start in range(0, n, cfg.batch_slices)]
        for done, start in enumerate(starts):
            if done and time.monotonic() - t0 >= seconds:
                break
            if start == 0:
                order = torch.randperm(n, generator=g).tolist()
            x, y = self._batch([features[i] for i in order[start : start + cfg.batch_slices]],
                               [labels[i] for i in order[start : start + cfg.batch_slices]], g)
            bar.update()
            self.epochs_ = (done + 1) / batches
            if len(torch.unique(y)) < 2:
                continue
            loss = supervised_contrastive_loss(F.normalize(self.mlp_(x), dim=1), y, cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.loss_history_.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        self.mlp_.eval()
        with torch.no_grad():
            total = sum(F.normalize(self.mlp_(f[lab == 1]), dim=1).sum(dim=0) for f, lab in zip(features, labels))
            self.foreground_prototype_ = F.normalize(total, dim=0)
        return self

    def _batch(self, feats: list[torch.Tensor], labs: list[torch.Tensor], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.cfg.pixels_per_class
        xs, ys = [], []
        for f, lab in zip(feats, labs):
            for cls in (1, 2):
                idx = (lab == cls).nonzero()[:, 0]
                if cap and len(idx) > cap:
                    idx = idx[torch.randperm(len(idx), generator=g)[:cap]]
                xs.append(f[idx])
                ys.append(lab[idx])
        return torch.cat(xs), torch.cat(ys)

    def block_weights(self, block_channels: list[int]) -> list[torch.Tensor]:
        """The first layer split per feature block: ``W_i`` of shape ``(hidden[0], C_i)``."""
        w, _ = self.mlp_.first_layer()
        return list(torch.split(w, block_channels, dim=1))

    def embed(self, block_features: list[torch.Tensor], size: tuple[int, int], block_channels: list[int]) -> torch.Tensor:
        """Fast path from native-resolution block features ``(B, C_i, h_i, w_i)``; see `embed_projected`."""
        projected = [torch.einsum("oc,bchw->bohw", w_i.to(f.dtype), f)
                     for w_i, f in zip(self.block_weights(block_channels), block_features)]
        return self.embed_projected(projected, size)

    def embed_projected(self, projected: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Fast path: blocks already projected by ``W_i`` at native resolution, upsampled and added.

        ``W . concat_i(up(f_i)) + b = sum_i up(W_i . f_i) + b`` because the first layer
        and bilinear upsampling are both linear (and act on different axes).

        Args:
            projected: per block ``(B, hidden[0], h_i, w_i)``.

        Returns:
            ``(B, E, H, W)`` L2-normalised embeddings.
        """
        _, b = self.mlp_.first_layer()
        h = b.view(1, -1, 1, 1)
        for p in projected:
            h = h + F.interpolate(p.float(), size=size, mode="bilinear", align_corners=False)
        out = self.mlp_.tail(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.normalize(out, dim=1)

    def embed_stack(self, stack: torch.Tensor) -> torch.Tensor:
        """Literal path: the MLP applied to every pixel of a ``(B, D, H, W)`` stack."""
        out = self.mlp_(stack.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.normalize(out, dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"mlp.{k}": v for k, v in self.mlp_.state_dict().items()}, "foreground_prototype": self.foreground_prototype_}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "PixelDecoder":
        self.mlp_ = _MLP(state["mlp.in_mean"].numel(), self.cfg.hidden)
        self.mlp_.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mlp.")})
        self.mlp_.eval()
        self.foreground_prototype_ = state["foreground_prototype"]
        return self

"""Overlap of binary masks: the one Dice (and IoU) of the product, selection, evaluation and benchmarks.

The rule for empty masks, everywhere: two empty masks agree perfectly (Dice and IoU 1.0); one empty
mask against a non-empty one scores 0.
"""

from __future__ import annotations

import numpy as np


def dice(pred, truth) -> float:
    """``2 |P & G| / (|P| + |G|)`` of two boolean masks of one shape (arrays or tensors); 1.0 when both are empty."""
    return float(slice_dice(_boolean(pred)[None], _boolean(truth)[None])[0])


def iou(pred, truth) -> float:
    """``|P & G| / |P | G|``; 1.0 when both are empty."""
    p, g = _boolean(pred), _boolean(truth)
    union = int((p | g).sum())
    return 1.0 if union == 0 else int((p & g).sum()) / union


def slice_dice(pred, truth) -> np.ndarray:
    """Dice of each slice of two ``(N, ...)`` masks, as `dice` does it: ``(N,)`` float64."""
    p, g = _boolean(pred), _boolean(truth)
    p, g = p.reshape(len(p), int(np.prod(p.shape[1:]))), g.reshape(len(g), int(np.prod(g.shape[1:])))
    total = p.sum(axis=1) + g.sum(axis=1)
    inter = (p & g).sum(axis=1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def target_slice_dice(pred, truth) -> list[float]:
    """Dice on every slice of a ``(Z, Y, X)`` volume that holds any target (the independent scorer's protocol)."""
    g = _boolean(truth)
    holding = g.reshape(len(g), -1).any(axis=1)
    return slice_dice(_boolean(pred)[holding], g[holding]).tolist()


def _boolean(mask) -> np.ndarray:
    if hasattr(mask, "detach"):  # a torch tensor
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool, copy=False)

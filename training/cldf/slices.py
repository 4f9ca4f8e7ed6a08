"""Volumes to network slices and back: robust intensity normalisation, square padding, resizing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def robust_range(volume: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """``(C, 2)``: each channel's intensities at the two percentiles, as stored (e.g. Hounsfield units for CT)."""
    return np.stack([np.percentile(volume[c], percentiles) for c in range(volume.shape[0])])


def normalise(volume: np.ndarray, percentiles: tuple[float, float], ranges: np.ndarray | None = None) -> np.ndarray:
    """Map each channel's robust range (``ranges``, else computed) to [-1, 1] (per volume), clipping outside it."""
    out = np.empty_like(volume, dtype=np.float32)
    ranges = robust_range(volume, percentiles) if ranges is None else ranges
    for c in range(volume.shape[0]):
        lo, hi = ranges[c]
        if hi <= lo:
            lo, hi = float(volume[c].min()), float(volume[c].max())
        out[c] = np.clip((volume[c] - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
    return out


def to_slices(volume: np.ndarray, resolution: int) -> torch.Tensor:
    """``(C, Z, Y, X)`` normalised volume -> ``(Z, C, R, R)`` slices, padded square with -1."""
    c, z, y, x = volume.shape
    t = torch.from_numpy(np.ascontiguousarray(volume.transpose(1, 0, 2, 3)))
    t = F.pad(t, _square_padding(y, x), value=-1.0)
    if t.shape[-1] != resolution:
        t = F.interpolate(t, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return t.clamp_(-1.0, 1.0).contiguous()


def from_slices(maps: torch.Tensor, shape: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """``(Z, R, R)`` maps at bundle resolution -> ``(Z, Y, X)`` on the input's in-plane grid.

    ``mode="mask"`` resizes the 0/1 mask as a soft map and thresholds it at 0.5;
    ``"nearest"`` is for label maps (seeds).
    """
    y, x = shape
    side = max(y, x)
    m = maps.float().unsqueeze(1)
    interp = "nearest" if mode == "nearest" else "bilinear"
    kw = {} if interp == "nearest" else {"align_corners": False}
    m = F.interpolate(m, size=(side, side), mode=interp, **kw)[:, 0]
    left, _, top, _ = _square_padding(y, x)
    m = m[:, top : top + y, left : left + x]
    if mode == "mask":
        m = m > 0.5
    return m.cpu().numpy()


def _square_padding(y: int, x: int) -> tuple[int, int, int, int]:
    side = max(y, x)
    left, top = (side - x) // 2, (side - y) // 2
    return left, side - x - left, top, side - y - top

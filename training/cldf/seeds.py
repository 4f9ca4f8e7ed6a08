"""Seed fusion (CLDF, Sec. 2.3): foreground where CAM and mean gradient agree, background where neither fires."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .config import SeedConfig

FOREGROUND, BACKGROUND = 1, 2
SEED_SOURCES = ("both", "cam", "mg")

# fill holes within each slice, never across slices
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of one map (256 bins); +inf for a flat map, so nothing passes."""
    if values.max() <= values.min():
        return float("inf")
    f = sitk.OtsuThresholdImageFilter()
    f.SetNumberOfHistogramBins(256)
    f.Execute(sitk.GetImageFromArray(values.astype(np.float32)))
    return float(f.GetThreshold())


def threshold_maps(maps: torch.Tensor, threshold: str | float) -> torch.Tensor:
    """``(B, H, W)`` maps in [0, 1] -> boolean activation, per slice Otsu or a fixed value."""
    if threshold == "otsu":
        arr = maps.detach().float().cpu().numpy()
        th = torch.tensor([otsu_threshold(m) for m in arr], device=maps.device).view(-1, 1, 1)
        return maps > th
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a map threshold must be 'otsu' or a number in [0, 1], not {threshold!r}")
    return maps > value


def body_mask(slices: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cheap body mask of ``(B, C, H, W)`` normalised slices: any channel above ``threshold``, holes filled."""
    raw = (slices.amax(dim=1) > threshold).cpu().numpy()
    return torch.from_numpy(ndimage.binary_fill_holes(raw, structure=_IN_PLANE)).to(slices.device)


def fuse_seeds(
    cam: torch.Tensor,
    mg: torch.Tensor,
    body: torch.Tensor,
    cfg: SeedConfig,
    slice_ids: torch.Tensor,
    seed: int = 0,
    source: str = "both",
) -> torch.Tensor:
    """Seed label map: 1 foreground (CAM and MG active), 2 background (neither, sampled), 0 unused.

    Args:
        cam, mg: ``(B, H, W)`` maps in [0, 1].
        body: ``(B, H, W)`` boolean body mask.
        slice_ids: ``(B,)`` stable slice identifiers; background sampling is seeded per slice.
        source: ``"both"`` (CLDF), or ``"cam"`` / ``"mg"`` for seeds from one map only
            (the paper's Table 3 ablations).

    Returns:
        ``(B, H, W)`` uint8 seed map.
    """
    if source not in SEED_SOURCES:
        raise ValueError(f"seed source must be one of {SEED_SOURCES}, not '{source}'")
    cam_on = threshold_maps(cam, cfg.cam_threshold) if source != "mg" else None
    mg_on = threshold_maps(mg, cfg.mg_threshold) if source != "cam" else None
    on = [m for m in (cam_on, mg_on) if m is not None]
    fg = on[0] & on[-1]
    bg = ~on[0] & ~on[-1]
    if cfg.background_in_body:
        bg &= body
    seeds = torch.zeros(cam.shape, dtype=torch.uint8, device=cam.device)
    seeds[fg] = FOREGROUND
    for b in range(len(seeds)):
        idx = bg[b].flatten().nonzero()[:, 0]
        if len(idx) > cfg.background_per_slice:
            g = torch.Generator().manual_seed(seed * 1_000_003 + int(slice_ids[b]))
            idx = idx[torch.randperm(len(idx), generator=g)[: cfg.background_per_slice].to(idx.device)]
        seeds[b].view(-1)[idx] = BACKGROUND
    return seeds


def keep_seeded_components(mask: torch.Tensor, foreground_seeds: torch.Tensor) -> torch.Tensor:
    """Keep the connected components (8-connected) of a ``(H, W)`` mask that hold a foreground seed."""
    labels, n = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    keep = np.unique(labels[foreground_seeds.cpu().numpy() & (labels > 0)])
    return torch.from_numpy(np.isin(labels, keep[keep > 0])).to(mask.device)

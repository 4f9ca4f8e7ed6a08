"""Inference clustering (CLDF, Sec. 2.5): K-means on pixel embeddings, foreground by seed proximity.

`cluster_slice` applies them to one slice: ``nearest`` keeps the one cluster
whose centroid is nearest the foreground seeds' mean embedding (the paper);
``closer_than_background`` every cluster nearer to it than to the background seeds' mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from .config import ClusterConfig
from .defaults import CLUSTER_RULES
from .postprocess import mask_similarity
from .seeds import BACKGROUND, FOREGROUND, keep_seeded_components

RULES = CLUSTER_RULES


def kmeans(embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Seeded K-means: ``(P,)`` labels and ``(k, E)`` centroids (None when there are too few pixels)."""
    if k < 2:
        raise ValueError(f"K-means needs k >= 2 clusters, not {k}")
    if len(embeddings) <= k:
        return np.zeros(len(embeddings), dtype=np.int64), None
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(embeddings.astype(np.float64))
    return km.labels_, km.cluster_centers_


def choose_clusters(centers: np.ndarray, foreground: np.ndarray, background: np.ndarray | None, rule: str) -> np.ndarray:
    """Indices of the clusters that form the foreground under ``rule``."""
    if rule not in RULES:
        raise ValueError(f"unknown cluster rule '{rule}'; choose one of {RULES}")
    to_fg = np.linalg.norm(centers - foreground[None], axis=1)
    if rule == "closer_than_background" and background is not None:
        keep = np.nonzero(to_fg < np.linalg.norm(centers - background[None], axis=1))[0]
        if len(keep):
            return keep
    return np.array([int(np.argmin(to_fg))])


def seed_references(e: torch.Tensor, seeds: torch.Tensor, prototype: torch.Tensor):
    """Normalised mean embeddings of a slice's foreground and background seeds.

    Args:
        e: ``(H*W, E)`` pixel embeddings; seeds: ``(H*W,)`` seed labels;
        prototype: the bundle's foreground prototype, used when the slice has no foreground seed.

    Returns:
        foreground reference ``(E,)``, background reference ``(E,)`` or None, foreground-seed mask.
    """
    fg, bg = seeds == FOREGROUND, seeds == BACKGROUND
    ref_fg = F.normalize(e[fg].mean(dim=0) if fg.any() else prototype.cpu(), dim=0).numpy()
    ref_bg = F.normalize(e[bg].mean(dim=0), dim=0).numpy() if bg.any() else None
    return ref_fg, ref_bg, fg


def cluster_slice(emb: torch.Tensor, seeds: torch.Tensor, body: torch.Tensor, prototype: torch.Tensor,
                  cfg: ClusterConfig, kmeans_cache: dict | None = None, key=None) -> tuple[torch.Tensor, float]:
    """One slice: ``(E, H, W)`` embeddings -> ``(H, W)`` boolean mask and its similarity to the prototype.

    ``kmeans_cache``: K-means results by ``(key, k, within_body)`` and the seed references by
    ``("references", key)``, so that re-deciding with another foreground rule or gate reuses them (`Redecider`).
    """
    e = emb.flatten(1).T.float()  # (H*W, E)
    if kmeans_cache is not None and ("references", key) in kmeans_cache:
        ref_fg, ref_bg, fg = kmeans_cache[("references", key)]
    else:
        ref_fg, ref_bg, fg = seed_references(e, seeds.flatten(), prototype)
        if kmeans_cache is not None:
            kmeans_cache[("references", key)] = ref_fg, ref_bg, fg
    pixels = body.flatten() if cfg.within_body else torch.ones(len(e), dtype=torch.bool)
    memo = (key, cfg.k, cfg.within_body)
    if kmeans_cache is None or memo not in kmeans_cache:
        found = kmeans(e[pixels].numpy(), cfg.k, cfg.seed)
        if kmeans_cache is not None:
            kmeans_cache[memo] = found
    else:
        found = kmeans_cache[memo]
    labels, centers = found
    mask = torch.zeros(len(e), dtype=torch.bool)
    if centers is not None:
        chosen = np.isin(labels, choose_clusters(centers, ref_fg, ref_bg, cfg.rule))
        mask[pixels.nonzero()[:, 0][torch.from_numpy(chosen)]] = True
    mask = mask.view(emb.shape[1:])
    if cfg.seeded_components and fg.any():
        mask = keep_seeded_components(mask, fg.view(emb.shape[1:]))
    return mask, mask_similarity(e, mask.flatten(), prototype)

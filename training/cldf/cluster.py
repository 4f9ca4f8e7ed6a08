"""Inference clustering (CLDF, Sec. 2.5): K-means on pixel embeddings, foreground by seed proximity.

`segment.cluster_slice` applies them to one slice: ``nearest`` keeps the one cluster
whose centroid is nearest the foreground seeds' mean embedding (the paper);
``closer_than_background`` every cluster nearer to it than to the background seeds' mean.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


RULES = ("nearest", "closer_than_background")


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

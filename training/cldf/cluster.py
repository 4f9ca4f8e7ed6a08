"""Inference clustering (CLDF, Sec. 2.5): K-means on pixel embeddings, foreground by seed proximity."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


RULES = ("nearest", "closer_than_background")


def foreground_cluster(
    embeddings: np.ndarray,
    foreground: np.ndarray,
    background: np.ndarray | None,
    k: int,
    seed: int,
    rule: str = "nearest",
) -> np.ndarray:
    """Cluster pixels and keep the foreground cluster(s).

    Args:
        embeddings: ``(P, E)`` L2-normalised pixel embeddings of one slice.
        foreground: ``(E,)`` mean embedding of the slice's foreground seeds (or the
            bundle's foreground prototype when the slice has none).
        background: ``(E,)`` mean embedding of the background seeds (rule
            ``closer_than_background`` only).
        k: number of clusters (2 in the paper).
        seed: K-means random state.
        rule: ``nearest``: the one cluster whose centroid is nearest ``foreground``
            (the paper); ``closer_than_background``: every cluster nearer
            ``foreground`` than ``background``.

    Returns:
        ``(P,)`` boolean foreground.
    """
    labels, centers = kmeans(embeddings, k, seed)
    if centers is None:
        return np.zeros(len(embeddings), dtype=bool)
    return np.isin(labels, choose_clusters(centers, foreground, background, rule))


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

"""Inference clustering (CLDF, Sec. 2.5): K-means on pixel embeddings, foreground by seed proximity."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def foreground_cluster(embeddings: np.ndarray, reference: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster pixels and keep the cluster whose centroid is nearest the foreground reference.

    Args:
        embeddings: ``(P, E)`` L2-normalised pixel embeddings of one slice.
        reference: ``(E,)`` mean embedding of the slice's foreground seeds (or the
            bundle's foreground prototype when the slice has none).
        k: number of clusters (2 in the paper).
        seed: K-means random state.

    Returns:
        ``(P,)`` boolean foreground.
    """
    if k < 2:
        raise ValueError(f"K-means needs k >= 2 clusters, not {k}")
    if len(embeddings) <= k:
        return np.zeros(len(embeddings), dtype=bool)
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(embeddings.astype(np.float64))
    nearest = int(np.argmin(np.linalg.norm(km.cluster_centers_ - reference[None], axis=1)))
    return km.labels_ == nearest

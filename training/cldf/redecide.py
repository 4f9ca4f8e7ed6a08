"""Re-deciding a segmented volume's masks for other settings from its cached pixel embeddings, no network run."""

from __future__ import annotations

import numpy as np
import torch

from . import cluster as clustering
from .config import ClusterConfig, PostprocessConfig
from .postprocess import SliceEvidence, keep_main_components, keep_slices
from .seeds import FOREGROUND
from .segment import Segmenter
from .slices import from_slices
from .volume_result import VolumeResult


class Redecider:
    """A segmented volume's masks for another gate threshold, clustering or post-processing, from its `SliceCache`.

    No network runs: K-means is the one cost, remembered per slice and k, so a new gate threshold or
    foreground rule takes a fraction of a second for a whole volume. The masks are the unrefined ones
    (SAM refinement is not re-run).
    """

    def __init__(self, segmenter: Segmenter, result: VolumeResult, decoder_seed: int = 0):
        if result.cache is None:
            raise ValueError("this result keeps no slice cache: segment with keep_cache=True to re-decide its masks")
        self.cache = result.cache
        self.shape = result.mask.shape
        self.prototype = segmenter.bundle.decoders[segmenter.variant][decoder_seed].foreground_prototype_
        self._kmeans = self.cache.kmeans
        self.cancelled = False

    def prepare(self, cluster: ClusterConfig) -> None:
        """K-means on every slice not clustered yet (those the gate passed over), so that moving the gate
        threshold later costs no K-means at all. Seconds for a whole volume; `cancel` stops it."""
        c = self.cache
        for i in range(len(c.presence)):
            if self.cancelled:
                return
            if (i, cluster.k, cluster.within_body) not in self._kmeans:
                clustering.cluster_slice(torch.from_numpy(c.embeddings[i]), torch.from_numpy(c.seeds[i]),
                              torch.from_numpy(c.body[i]), self.prototype, cluster, self._kmeans, i)

    def mask(self, cluster: ClusterConfig, post: PostprocessConfig) -> np.ndarray:
        """``(Z, Y, X)`` uint8 mask on the input's grid, as the run would have made it with these settings."""
        c = self.cache
        z = len(c.presence)
        small = torch.zeros(c.seeds.shape, dtype=torch.bool)
        similarity = torch.full((z,), float("nan"))
        gated = c.presence >= cluster.presence_threshold
        for i in np.flatnonzero(gated):
            small[i], similarity[i] = clustering.cluster_slice(torch.from_numpy(c.embeddings[i]), torch.from_numpy(c.seeds[i]),
                                                    torch.from_numpy(c.body[i]), self.prototype, cluster,
                                                    self._kmeans, int(i))
        n_seeds = torch.from_numpy(((c.seeds == FOREGROUND) & gated[:, None, None]).reshape(z, -1).sum(axis=1))
        small[~keep_slices(SliceEvidence(similarity, n_seeds, torch.from_numpy(c.presence)), post)] = False
        mask = from_slices(small, self.shape[1:], mode="mask")
        return keep_main_components(mask, post.min_component_fraction).astype(np.uint8)

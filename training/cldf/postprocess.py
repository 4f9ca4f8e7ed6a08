"""After clustering: decide per slice whether the foreground cluster is the target, then keep the volume's main object(s).

K-means always returns a "foreground" cluster, so without these rules every slice
the gate passes gets a mask, however little target it holds. Two steps, both
settings of `config.PostprocessConfig` chosen on the validation split
(`volume_select.select_postprocess`):

1. per slice (on the bundle's grid, as slices are segmented): drop the mask
   when its mean embedding is far from the decoder's foreground prototype,
   when the slice holds no foreground seed, or when the gate is unsure;
2. per volume (on the input's grid, once every slice is done): keep only the
   3D connected components that are large next to the largest one, so
   islands in single slices go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .config import PostprocessConfig

_CONNECTIVITY_3D = ndimage.generate_binary_structure(3, 3)  # 26-connected


@dataclass
class SliceEvidence:
    """What a slice's mask rests on, ``(B,)`` each: the inputs of the per-slice rule."""

    similarity: torch.Tensor  # cosine similarity of the mask's mean embedding to the foreground prototype; nan if empty
    foreground_seeds: torch.Tensor  # foreground seed pixels in the slice
    presence: torch.Tensor  # the gate's presence probability
    embeddings: torch.Tensor | None = None  # (B, E, R, R) pixel embeddings, when asked for (`Segmenter.masks_with_evidence`)


def mask_similarity(embeddings: torch.Tensor, mask: torch.Tensor, prototype: torch.Tensor) -> float:
    """Cosine similarity of the mean embedding of a slice's mask to the foreground prototype.

    Args:
        embeddings: ``(P, E)`` L2-normalised pixel embeddings of one slice.
        mask: ``(P,)`` boolean mask.
        prototype: ``(E,)`` the decoder's foreground prototype (unit length).

    Returns:
        the similarity in [-1, 1], or nan for an empty mask.
    """
    if not mask.any():
        return float("nan")
    mean = F.normalize(embeddings[mask].mean(dim=0), dim=0)
    return float(mean @ F.normalize(prototype.to(mean), dim=0))


def keep_slices(evidence: SliceEvidence, cfg: PostprocessConfig) -> torch.Tensor:
    """``(B,)`` True where a slice's mask passes the per-slice rule."""
    keep = evidence.presence >= cfg.min_presence
    if cfg.min_similarity > -1.0:
        keep &= torch.nan_to_num(evidence.similarity, nan=-1.0) >= cfg.min_similarity
    if cfg.require_seeds:
        keep &= evidence.foreground_seeds > 0
    return keep


def keep_main_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Keep the 3D connected components of a ``(Z, Y, X)`` mask with at least ``min_fraction`` of the largest's voxels."""
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_component_fraction must be in [0, 1], not {min_fraction}")
    if min_fraction == 0.0 or not mask.any():
        return mask
    return components_at_least(*component_sizes(mask), min_fraction).astype(mask.dtype)


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected 3D components of a ``(Z, Y, X)`` mask: the label volume and each label's voxel count (0 for label 0)."""
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY_3D)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels, sizes


def components_at_least(labels: np.ndarray, sizes: np.ndarray, min_fraction: float) -> np.ndarray:
    """Boolean mask of the components holding at least ``min_fraction`` of the largest one's voxels."""
    if sizes.max() == 0:
        return labels > 0
    return np.isin(labels, np.nonzero(sizes >= min_fraction * sizes.max())[0])

"""The training set: slices of the training patients with their weak slice labels, never pixel masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import cases
from ..config import DataConfig
from ..images import InputError, read_images
from ..manifest import Manifest
from ..weak_labels import AMBIGUOUS, labels_in_orientation, weak_slice_labels


@dataclass
class SliceSet:
    """Slices for training: images and slice labels, never pixel masks."""

    images: torch.Tensor  # (N, C, R, R) in [-1, 1]
    labels: torch.Tensor  # (N,) 0 / 1
    case_index: torch.Tensor  # (N,) index into case_ids
    case_ids: list[str]
    ranges: np.ndarray | None = None  # (cases, C, 2): each case's `robust_range`, for the bundle's data card
    side_labels: torch.Tensor | None = None  # (N, 2): slice labels of the left and right organ (`side_slice_labels`)

    def __len__(self) -> int:
        return len(self.labels)


def load_slice_set(
    manifest: Manifest,
    case_ids: list[str],
    channels: list[str],
    resolution: int,
    percentiles: tuple[float, float],
    target_labels: list[int] | None,
    positive_fraction: float,
    orientation: str = "",
    ct_window: tuple[float, float] | None = None,
) -> SliceSet:
    """Images of the given cases (reoriented to ``orientation``; CT in HU through ``ct_window``) with their weak
    slice labels; ambiguous slices dropped."""
    data = DataConfig(channels=list(channels), resolution=resolution, percentiles=tuple(percentiles),
                      orientation=orientation, ct_window=ct_window)
    images, labels, index, ranges = [], [], [], []
    for i, cid in enumerate(case_ids):
        case = manifest.case(cid)
        # a manifest may hold more channels than the bundle uses (e.g. T1ce); missing ones are refused
        stored = read_images({k: v for k, v in case.channels.items() if k in channels}, channels)
        read = cases.case_from_images(stored, data)
        y = weak_slice_labels(case, target_labels, positive_fraction)
        if len(y) != read.volume.shape[1]:
            raise InputError(f"case '{cid}': {len(y)} slice labels for {read.volume.shape[1]} slices")
        y = labels_in_orientation(y, stored[channels[0]], orientation)
        keep = y != AMBIGUOUS
        ranges.append(read.ranges)
        images.append(read.slices(resolution)[torch.from_numpy(keep)])
        labels.append(torch.from_numpy(y[keep]))
        index.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
    return SliceSet(torch.cat(images), torch.cat(labels), torch.cat(index), list(case_ids), np.stack(ranges))

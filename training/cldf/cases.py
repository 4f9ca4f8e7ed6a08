"""A case read the way its bundle reads it: channels reoriented to the bundle's orientation, stacked,
normalised per volume, cut into slices.

The one path from files (or images in memory) to network input: `cldf segment` and the Slicer module
(`case_from_images`), training's selection, evaluation, the figure and the benchmarks (`read_case`).
Ground truth is read by `read_truth`, for scoring only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .config import DataConfig
from .hounsfield import to_bundle_units
from .images import InputError, read_images, stack_channels
from .manifest import Manifest
from .slices import normalise, robust_range, to_slices
from .weak_labels import target_mask


@dataclass
class CaseVolume:
    """One case on the bundle's grid.

    Attributes:
        volume: ``(C, Z, Y, X)`` intensities in the units of the bundle's training scans (a CT in HU put
            through the bundle's ``data.ct_window``, else as stored), channels in the bundle's order.
        reference: the first channel's image on that grid (geometry of every output).
        ranges: ``(C, 2)`` each channel's robust intensity range (`slices.robust_range`).
        normalised: ``volume`` with each range mapped to [-1, 1].
        intensities: per channel, what was done to its intensities (`hounsfield.to_bundle_units`).
    """

    volume: np.ndarray
    reference: sitk.Image
    ranges: np.ndarray
    normalised: np.ndarray
    intensities: dict[str, dict] = field(default_factory=dict)

    @property
    def in_plane_spacing(self) -> tuple[float, float]:
        """``(row, column)`` spacing in mm, as the refinement takes it."""
        x, y = self.reference.GetSpacing()[:2]
        return y, x

    def slices(self, resolution: int) -> torch.Tensor:
        """``(Z, C, resolution, resolution)`` network input."""
        return to_slices(self.normalised, resolution)


def case_from_images(images: dict[str, sitk.Image], data: DataConfig, reorient_to_bundle: bool = True) -> CaseVolume:
    """Images already read (one per channel) -> the case on the bundle's grid.

    ``reorient_to_bundle``: cut the slices along the bundle's axes (``data.orientation``); without it,
    along the images' third voxel axis.
    """
    code = data.orientation if reorient_to_bundle else ""
    volume, reference = stack_channels(images, list(data.channels), code)
    volume, intensities = to_bundle_units(volume, list(data.channels), data.ct_window, images)
    ranges = robust_range(volume, tuple(data.percentiles))
    return CaseVolume(volume, reference, ranges, normalise(volume, tuple(data.percentiles), ranges), intensities)


def read_case(channels: dict[str, str | Path], data: DataConfig, reorient_to_bundle: bool = True) -> CaseVolume:
    """Read a case's channel files (extra channels ignored) the way its bundle reads them."""
    wanted = {name: path for name, path in channels.items() if name in data.channels}
    return case_from_images(read_images(wanted, list(data.channels)), data, reorient_to_bundle)


def read_truth(mask: Path | None, target_labels: list[int] | None, data: DataConfig, case_id: str = "",
               reorient_to_bundle: bool = True) -> np.ndarray:
    """The case's ground-truth target on the bundle's grid: for scoring only, never for training."""
    if mask is None:
        raise InputError(f"case '{case_id}' has no mask: scoring needs ground truth")
    return target_mask(mask, target_labels, data.orientation if reorient_to_bundle else "")


def scored_slices(manifest: Manifest, case_ids: list[str], target_labels: list[int] | None, data: DataConfig,
                  resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For scoring maps: positive slices (target > ``data.positive_fraction``), their target masks at
    ``resolution`` and the negative slices (no target), of every case, each ``(N, ...)``."""
    positives, truths, negatives = [], [], []
    for cid in case_ids:
        case = manifest.case(cid)
        slices = read_case(case.channels, data).slices(resolution)
        truth = read_truth(case.mask, target_labels, data, cid)
        positive = truth.mean(axis=(1, 2)) > data.positive_fraction
        positives.append(slices[positive])
        truths.append(to_slices(truth[positive][None].astype(np.float32), resolution)[:, 0] > 0.5)
        negatives.append(slices[truth.sum(axis=(1, 2)) == 0])
    return torch.cat(positives), torch.cat(truths), torch.cat(negatives)

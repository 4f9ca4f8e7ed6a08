"""Weak supervision boundary: ground-truth masks become one label per slice here.

Training sees images and these slice labels only (`weak_slice_labels`, `side_slice_labels`); `target_mask`
reads a whole mask, for scoring and for deriving slice labels, nowhere else.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .images import InputError, read_image
from .manifest import Case, Manifest
from .orientation import orientation_of, reorient, slice_order

AMBIGUOUS = -1  # slice label for 0 < target fraction <= positive_fraction: not used for training


def target_mask(mask_path: Path, target_labels: list[int] | None, orientation: str = "") -> np.ndarray:
    """Binary ``(Z, Y, X)`` target from a label volume (values in ``target_labels``, or > 0), reoriented."""
    m = sitk.GetArrayFromImage(reorient(read_image(Path(mask_path), "mask"), orientation))
    return np.isin(m, target_labels) if target_labels else m > 0


def weak_slice_labels(case: Case, target_labels: list[int] | None, positive_fraction: float) -> np.ndarray:
    """The only image-level information training may see: one label per slice.

    1 = positive (target fraction > ``positive_fraction``), 0 = negative (no target),
    ``AMBIGUOUS`` = in between (dropped from training). From a CSV (``slice,label``)
    when the case has one, else derived from the mask's per-slice area fraction.
    """
    if case.slice_labels is not None:
        return _labels_from_csv(case.slice_labels)
    if case.mask is None:
        raise InputError(f"case '{case.id}' has neither 'slice_labels' nor 'mask': training needs one of them")
    return _labels_from_fraction(target_mask(case.mask, target_labels).mean(axis=(1, 2)), positive_fraction)


def _labels_from_fraction(fraction: np.ndarray, positive_fraction: float) -> np.ndarray:
    """Per-slice target area fractions -> 1 (above ``positive_fraction``), ``AMBIGUOUS`` (above 0), 0."""
    return np.where(fraction > positive_fraction, 1, np.where(fraction > 0, AMBIGUOUS, 0)).astype(np.int64)


def side_slice_labels(manifest: Manifest, case_ids: list[str], target_labels: list[int] | None,
                      sides: tuple[list[int], list[int]], positive_fraction: float, orientation: str) -> torch.Tensor:
    """``(N, 2)`` slice labels of a left and a right organ (e.g. the kidneys, mask labels 3 and 2), for the
    slices `load_slice_set` keeps: image-level labels like `weak_slice_labels`, one per side.

    Each side's label is 1, 0 or ``AMBIGUOUS`` by the same rule (its area fraction of the whole slice).
    """
    rows = []
    for cid in case_ids:
        case = manifest.case(cid)
        if case.slice_labels is not None or case.mask is None:
            raise InputError(f"case '{cid}': per-side slice labels (cam_classifier.left_labels / right_labels) "
                             "are derived from a mask, and this case has slice labels only; leave them unset")
        stored = read_image(Path(case.mask), "mask")  # read once for the target and both sides
        values = sitk.GetArrayFromImage(stored)

        def labels_of(target: list[int] | None) -> np.ndarray:
            inside = np.isin(values, target) if target else values > 0
            return labels_in_orientation(_labels_from_fraction(inside.mean(axis=(1, 2)), positive_fraction),
                                         stored, orientation)

        keep = labels_of(target_labels) != AMBIGUOUS
        rows.append(np.stack([labels_of(list(labels))[keep] for labels in sides], axis=1))
    return torch.from_numpy(np.concatenate(rows))


def _labels_from_csv(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"slice-label CSV not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"slice", "label"} <= set(rows[0]):
        raise InputError(f"{path} needs a header 'slice,label' and one row per slice")
    try:
        pairs = [(int(r["slice"]), int(r["label"])) for r in rows]
    except (TypeError, ValueError):
        raise InputError(f"{path}: every row needs an integer slice index and a label 1, 0 or -1") from None
    bad = [f"row {i + 2}" for i, (z, y) in enumerate(pairs) if z < 0 or y not in (1, 0, AMBIGUOUS)]
    if bad:
        raise InputError(f"{path}: slice indices start at 0 and labels are 1 (present), 0 (absent) or -1 "
                         f"(unsure); see {', '.join(bad[:5])}")
    labels = np.full(max(z for z, _ in pairs) + 1, AMBIGUOUS, dtype=np.int64)
    for z, y in pairs:
        labels[z] = y
    return labels


def labels_in_orientation(labels: np.ndarray, stored: sitk.Image, orientation: str) -> np.ndarray:
    """Slice labels of a volume as stored, in the order of its slices once reoriented to ``orientation``."""
    order = slice_order(stored, orientation)
    if order is None:
        raise InputError(f"slice labels were made on slices along another axis than the one the bundle's orientation "
                         f"{orientation} cuts (the volume is stored as {orientation_of(stored)}); "
                         "label the slices of the volume resampled to that orientation")
    return labels[order]


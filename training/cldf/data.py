"""Volumes in, slices out: reading, validation, normalisation, slicing, labels, splits.

Weak supervision boundary: ground-truth masks are read here in exactly one
place, `weak_slice_labels`, which reduces them to one label per slice. Training
receives `SliceSet`s (images + slice labels) and nothing else.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

AMBIGUOUS = -1  # slice label for 0 < target fraction <= positive_fraction: not used for training


class InputError(ValueError):
    """Input that cannot be processed; the message says what to do."""


# --------------------------------------------------------------------------- manifests
@dataclass
class Case:
    id: str
    channels: dict[str, Path]
    mask: Path | None = None
    slice_labels: Path | None = None
    split: str | None = None


@dataclass
class Manifest:
    path: Path
    name: str
    cases: list[Case]

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise InputError(f"case '{case_id}' is not in {self.path}")


def load_manifest(path: str | Path) -> Manifest:
    """Read a dataset manifest (format in the README, "Your own data")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset manifest not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw.get("cases"), list) or not raw["cases"]:
        raise InputError(f"{path} has no 'cases' list; see the README for the manifest format")
    root = path.parent
    cases = []
    for i, c in enumerate(raw["cases"]):
        if "id" not in c or not isinstance(c.get("channels"), dict):
            raise InputError(f"case #{i} in {path} needs an 'id' and a 'channels' mapping")
        cases.append(
            Case(
                id=str(c["id"]),
                channels={k: root / v for k, v in c["channels"].items()},
                mask=root / c["mask"] if c.get("mask") else None,
                slice_labels=root / c["slice_labels"] if c.get("slice_labels") else None,
                split=c.get("split"),
            )
        )
    return Manifest(path=path, name=str(raw.get("name", path.parent.name)), cases=cases)


# --------------------------------------------------------------------------- volumes
def read_channels(paths: dict[str, str | Path], channels: list[str]) -> tuple[np.ndarray, sitk.Image]:
    """Read one volume per channel and stack them in the bundle's order.

    Args:
        paths: channel name -> image file.
        channels: the channel names the bundle expects, in order.

    Returns:
        ``(C, Z, Y, X)`` float32 array and the first channel's image (the reference grid).
    """
    check_channel_names(list(paths), channels)
    images = {}
    for name in channels:
        p = Path(paths[name])
        if not p.is_file():
            raise FileNotFoundError(f"channel '{name}': file not found: {p}")
        try:
            images[name] = sitk.ReadImage(str(p))
        except RuntimeError as e:
            raise InputError(f"channel '{name}': cannot read {p} as an image ({e})") from e
    return stack_channels(images, channels)


def stack_channels(images: dict[str, sitk.Image], channels: list[str]) -> tuple[np.ndarray, sitk.Image]:
    """Check images already in memory (one per channel) and stack them in the bundle's order.

    Returns:
        ``(C, Z, Y, X)`` float32 array and the first channel's image (the reference grid).
    """
    check_channel_names(list(images), channels)
    ref = images[channels[0]]
    for name in channels:
        check_volume(images[name], name)
        if name != channels[0]:
            check_same_grid(ref, images[name], channels[0], name)
    arrays = [sitk.GetArrayFromImage(images[n]).astype(np.float32) for n in channels]
    for name, a in zip(channels, arrays):
        check_values(a, name)
    return np.stack(arrays), ref


def check_channel_names(given: list[str], channels: list[str]) -> None:
    """Exactly the bundle's channels, no more, no fewer."""
    missing = [c for c in channels if c not in given]
    extra = [c for c in given if c not in channels]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing channel(s) {missing}")
        if extra:
            parts.append(f"unexpected channel(s) {extra}")
        raise InputError(f"{' and '.join(parts)}: this bundle needs exactly {channels}, given {given}")


def check_volume(image: sitk.Image, name: str) -> None:
    if image.GetDimension() != 3:
        raise InputError(f"channel '{name}' is {image.GetDimension()}D; a 3D volume (a stack of axial slices) is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"channel '{name}' has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give one scalar volume per channel"
        )
    if 0 in image.GetSize():
        raise InputError(f"channel '{name}' is empty (size {image.GetSize()})")
    if image.GetSize()[2] == 1:
        raise InputError(
            f"channel '{name}' is a single 2D slice (size {image.GetSize()}); "
            "a 3D volume (a stack of axial slices) is needed"
        )


def check_same_grid(a: sitk.Image, b: sitk.Image, name_a: str, name_b: str) -> None:
    """Channels of one case must share one voxel grid: resample them first if not."""
    problems = []
    if a.GetSize() != b.GetSize():
        problems.append(f"size {a.GetSize()} vs {b.GetSize()}")
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4):
        problems.append(f"spacing {a.GetSpacing()} vs {b.GetSpacing()}")
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3):
        problems.append(f"origin {a.GetOrigin()} vs {b.GetOrigin()}")
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4):
        problems.append("direction matrices differ")
    if problems:
        raise InputError(
            f"channels '{name_a}' and '{name_b}' are on different voxel grids ({'; '.join(problems)}); "
            f"resample '{name_b}' onto '{name_a}' first"
        )


def check_values(a: np.ndarray, name: str) -> None:
    if not np.isfinite(a).all():
        raise InputError(f"channel '{name}' contains {int((~np.isfinite(a)).sum())} NaN or infinite voxels; fix or mask them first")
    if a.max() <= a.min():
        what = "empty: every voxel is 0" if a.flat[0] == 0 else f"constant: every voxel is {a.flat[0]:g}"
        raise InputError(f"channel '{name}' is {what}; it holds no image")


def normalise(volume: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map each channel's robust range to [-1, 1] (per volume), clipping outside it."""
    out = np.empty_like(volume, dtype=np.float32)
    for c in range(volume.shape[0]):
        lo, hi = np.percentile(volume[c], percentiles)
        if hi <= lo:
            lo, hi = float(volume[c].min()), float(volume[c].max())
        out[c] = np.clip((volume[c] - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
    return out


# --------------------------------------------------------------------------- slices
def to_slices(volume: np.ndarray, resolution: int) -> torch.Tensor:
    """``(C, Z, Y, X)`` normalised volume -> ``(Z, C, R, R)`` slices, padded square with -1."""
    c, z, y, x = volume.shape
    t = torch.from_numpy(np.ascontiguousarray(volume.transpose(1, 0, 2, 3)))
    t = F.pad(t, _square_padding(y, x), value=-1.0)
    if t.shape[-1] != resolution:
        t = F.interpolate(t, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return t.clamp_(-1.0, 1.0).contiguous()


def from_slices(maps: torch.Tensor, shape: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """``(Z, R, R)`` maps at bundle resolution -> ``(Z, Y, X)`` on the input's in-plane grid.

    ``mode="mask"`` resizes the 0/1 mask as a soft map and thresholds it at 0.5;
    ``"nearest"`` is for label maps (seeds).
    """
    y, x = shape
    side = max(y, x)
    m = maps.float().unsqueeze(1)
    interp = "nearest" if mode == "nearest" else "bilinear"
    kw = {} if interp == "nearest" else {"align_corners": False}
    m = F.interpolate(m, size=(side, side), mode=interp, **kw)[:, 0]
    left, _, top, _ = _square_padding(y, x)
    m = m[:, top : top + y, left : left + x]
    if mode == "mask":
        m = m > 0.5
    return m.cpu().numpy()


def _square_padding(y: int, x: int) -> tuple[int, int, int, int]:
    side = max(y, x)
    left, top = (side - x) // 2, (side - y) // 2
    return left, side - x - left, top, side - y - top


# --------------------------------------------------------------------------- weak labels
def target_mask(mask_path: Path, target_labels: list[int] | None) -> np.ndarray:
    """Binary ``(Z, Y, X)`` target from a label volume (values in ``target_labels``, or > 0)."""
    m = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))
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
    fraction = target_mask(case.mask, target_labels).mean(axis=(1, 2))
    labels = np.where(fraction > positive_fraction, 1, np.where(fraction > 0, AMBIGUOUS, 0))
    return labels.astype(np.int64)


def _labels_from_csv(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"slice-label CSV not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"slice", "label"} <= set(rows[0]):
        raise InputError(f"{path} needs a header 'slice,label' and one row per slice")
    labels = np.full(max(int(r["slice"]) for r in rows) + 1, AMBIGUOUS, dtype=np.int64)
    for r in rows:
        labels[int(r["slice"])] = int(r["label"])
    return labels


# --------------------------------------------------------------------------- splits
def split_cases(manifest: Manifest, fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Deterministic patient-level split: explicit ``split`` fields win, the rest by a seeded hash."""
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    free = []
    for c in manifest.cases:
        if c.split:
            if c.split not in splits:
                raise InputError(f"case '{c.id}': split must be one of {list(splits)}, not '{c.split}'")
            splits[c.split].append(c.id)
        else:
            free.append(c.id)
    free.sort(key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_train = round(fractions[0] * len(free))
    n_val = round(fractions[1] * len(free))
    splits["train"] += free[:n_train]
    splits["val"] += free[n_train : n_train + n_val]
    splits["test"] += free[n_train + n_val :]
    return {k: sorted(v) for k, v in splits.items()}


# --------------------------------------------------------------------------- slice sets
@dataclass
class SliceSet:
    """Slices for training: images and slice labels, never pixel masks."""

    images: torch.Tensor  # (N, C, R, R) in [-1, 1]
    labels: torch.Tensor  # (N,) 0 / 1
    case_index: torch.Tensor  # (N,) index into case_ids
    case_ids: list[str]

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
) -> SliceSet:
    """Images of the given cases with their weak slice labels; ambiguous slices dropped."""
    images, labels, index = [], [], []
    for i, cid in enumerate(case_ids):
        case = manifest.case(cid)
        # a manifest may hold more channels than the bundle uses (e.g. T1ce); missing ones are refused
        volume, _ = read_channels({k: v for k, v in case.channels.items() if k in channels}, channels)
        y = weak_slice_labels(case, target_labels, positive_fraction)
        if len(y) != volume.shape[1]:
            raise InputError(f"case '{cid}': {len(y)} slice labels for {volume.shape[1]} slices")
        keep = y != AMBIGUOUS
        images.append(to_slices(normalise(volume, percentiles), resolution)[torch.from_numpy(keep)])
        labels.append(torch.from_numpy(y[keep]))
        index.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
    return SliceSet(torch.cat(images), torch.cat(labels), torch.cat(index), list(case_ids))

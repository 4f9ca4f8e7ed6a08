"""Volumes in, slices out: reading, validation, normalisation, slicing, labels, splits.

Weak supervision boundary: ground-truth masks are read here in exactly one
place, `weak_slice_labels`, which reduces them to one label per slice. Training
receives `SliceSet`s (images + slice labels) and nothing else.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import locale
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .orientation import orientation_of, reorient, slice_order
from .slices import normalise, robust_range, to_slices

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
    if not isinstance(raw, dict) or not isinstance(raw.get("cases"), list) or not raw["cases"]:
        raise InputError(f"{path} has no 'cases' list; see the README for the manifest format")
    root = path.parent
    cases, seen = [], set()
    for i, c in enumerate(raw["cases"]):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("channels"), dict):
            raise InputError(f"case #{i} in {path} needs an 'id' and a 'channels' mapping")
        if str(c["id"]) in seen:
            raise InputError(f"case id '{c['id']}' appears twice in {path}; give every case its own id")
        seen.add(str(c["id"]))
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
MIN_IN_PLANE = 16  # pixels per side: below this a "slice" holds no anatomy to segment
LABEL_LIKE_VALUES = 8  # an integer image with at most this many distinct values is a label map, not a scan
IMAGE_FORMATS = ".nii.gz, .nii, .nrrd, .mha, or a folder holding one DICOM series"


def read_channels(paths: dict[str, str | Path], channels: list[str],
                  orientation: str = "") -> tuple[np.ndarray, sitk.Image]:
    """Read one volume per channel and stack them in the bundle's order.

    Args:
        paths: channel name -> image file (or DICOM series folder).
        channels: the channel names the bundle expects, in order.
        orientation: reorient every channel to this orientation code (e.g. ``"LPS"``) first; ``""`` keeps
            the stored voxel order.

    Returns:
        ``(C, Z, Y, X)`` float32 array and the first channel's image (the reference grid).
    """
    images = read_images(paths, channels)
    return stack_channels({n: reorient(im, orientation) for n, im in images.items()}, channels)


def read_images(paths: dict[str, str | Path], channels: list[str]) -> dict[str, sitk.Image]:
    """Read and check every channel's file; any problem is an `InputError` that names the file."""
    check_channel_names(list(paths), channels)
    return {name: read_image(Path(paths[name]), name) for name in channels}


def read_image(path: Path, name: str) -> sitk.Image:
    """One channel from a file or a DICOM series folder, refusing what cannot be read completely."""
    if path.is_dir():
        return _read_dicom_series(path, name)
    if not path.exists():
        raise FileNotFoundError(f"channel '{name}': file not found: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"channel '{name}': {path} cannot be read (permission denied); check its permissions")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"channel '{name}': {path} is not an image this tool can read, or it is corrupted; "
                         f"give {IMAGE_FORMATS}") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(path, name)
    return image


@contextlib.contextmanager
def _locale_kept() -> Iterator[None]:
    """GDCM may switch the process's locale to "C" (then Python reads text files as ASCII): put it back."""
    kept = locale.setlocale(locale.LC_CTYPE)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, kept)


def _read_dicom_series(folder: Path, name: str) -> sitk.Image:
    with _locale_kept():
        return _read_series(folder, name)


def _read_series(folder: Path, name: str) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"channel '{name}': {folder} is a folder without a DICOM series; give {IMAGE_FORMATS}")
    if len(series) > 1:
        raise InputError(f"channel '{name}': {folder} holds {len(series)} DICOM series ({', '.join(series)}); "
                         "put the series to segment in a folder of its own")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return reader.Execute()
    except RuntimeError:
        raise InputError(f"channel '{name}': the DICOM series in {folder} cannot be read as one volume "
                         "(missing or inconsistent slices?)") from None


def _check_nifti_data(path: Path, name: str) -> None:
    """NIfTI data read in full, as stored: SimpleITK pads a truncated file and reads NaN and Inf as 0."""
    import nibabel

    try:
        with nibabel.openers.ImageOpener(str(path)) as f:
            header = nibabel.Nifti1Header.from_fileobj(f, check=False)  # as written: loading "fixes" a 0 spacing
        spacing = header["pixdim"][1 : 1 + min(int(header["dim"][0]), 3)]
        if not (np.isfinite(spacing).all() and (spacing > 0).all()):
            raise InputError(f"channel '{name}': {path} declares an invalid voxel spacing {tuple(spacing.tolist())}; "
                             "every spacing must be positive: fix the image header")
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise InputError(f"channel '{name}': {path} is truncated or corrupted ({str(e).splitlines()[0]}); copy or export it again") from None
    if data.dtype.kind in "fc":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputError(f"channel '{name}': {path} holds {bad} NaN or infinite voxels; "
                             "replace them (e.g. by the background value) first")


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
    arrays = []
    for name in channels:
        a = sitk.GetArrayViewFromImage(images[name])
        check_values(a, name)
        arrays.append(a.astype(np.float32))
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
    """A 3D scalar volume with a usable voxel grid."""
    if image.GetDimension() != 3:
        raise InputError(f"channel '{name}' is {image.GetDimension()}D; a 3D volume (a stack of axial slices) is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"channel '{name}' has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give one scalar volume per channel"
        )
    size = image.GetSize()
    if 0 in size:
        raise InputError(f"channel '{name}' is empty (size {size})")
    if sorted(size)[1] < MIN_IN_PLANE:
        raise InputError(f"channel '{name}' is too small to segment (size {size}); "
                         f"slices need at least {MIN_IN_PLANE} x {MIN_IN_PLANE} voxels")
    if sorted(size)[0] == 1:
        raise InputError(f"channel '{name}' is a single 2D slice (size {size}); "
                         "a 3D volume (a stack of axial slices) is needed")
    spacing = np.asarray(image.GetSpacing())
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(f"channel '{name}' has an invalid voxel spacing {tuple(spacing)}; "
                         "every spacing must be positive: fix the image header")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.isfinite(direction).all() or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise InputError(f"channel '{name}' has an invalid direction matrix (not a rotation); fix the image header")


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
    """Finite, representable, not constant, and not a label map (checked on the stored values)."""
    if a.dtype.kind == "f":
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise InputError(f"channel '{name}' contains {bad} NaN or infinite voxels; "
                             "replace them (e.g. by the background value) first")
    lo, hi = a.min(), a.max()
    if max(abs(float(lo)), abs(float(hi))) > float(np.finfo(np.float32).max):
        raise InputError(f"channel '{name}' holds values up to {max(abs(float(lo)), abs(float(hi))):.3g}, beyond what "
                         "float32 holds; rescale the image to its real intensity range first")
    if hi <= lo:
        what = "empty: every voxel is 0" if lo == 0 else f"constant: every voxel is {float(lo):g}"
        raise InputError(f"channel '{name}' is {what}; it holds no image")
    if len(np.unique(a[::3, ::3, ::3])) <= LABEL_LIKE_VALUES and len(np.unique(a)) <= LABEL_LIKE_VALUES:
        raise InputError(f"channel '{name}' looks like a label map or mask (only the values "
                         f"{', '.join(f'{v:g}' for v in np.unique(a))}), not a scan; give the scan itself")


# --------------------------------------------------------------------------- orientation
def stored_orientation(case: "Case", channel: str) -> str:
    """The orientation code of a case's channel as stored (read from the header only, for files)."""
    path = Path(case.channels[channel])
    if path.is_dir() or not path.is_file():
        return orientation_of(read_image(path, channel))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return orientation_of(read_image(path, channel))  # read_image says what is wrong with it
    return orientation_of(reader)


# --------------------------------------------------------------------------- weak labels
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
) -> SliceSet:
    """Images of the given cases (reoriented to ``orientation``) with their weak slice labels; ambiguous slices dropped."""
    images, labels, index, ranges = [], [], [], []
    for i, cid in enumerate(case_ids):
        case = manifest.case(cid)
        # a manifest may hold more channels than the bundle uses (e.g. T1ce); missing ones are refused
        stored = read_images({k: v for k, v in case.channels.items() if k in channels}, channels)
        volume, _ = stack_channels({n: reorient(im, orientation) for n, im in stored.items()}, channels)
        y = weak_slice_labels(case, target_labels, positive_fraction)
        if len(y) != volume.shape[1]:
            raise InputError(f"case '{cid}': {len(y)} slice labels for {volume.shape[1]} slices")
        y = labels_in_orientation(y, stored[channels[0]], orientation)
        keep = y != AMBIGUOUS
        ranges.append(robust_range(volume, percentiles))
        images.append(to_slices(normalise(volume, percentiles, ranges[-1]), resolution)[torch.from_numpy(keep)])
        labels.append(torch.from_numpy(y[keep]))
        index.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
    return SliceSet(torch.cat(images), torch.cat(labels), torch.cat(index), list(case_ids), np.stack(ranges))

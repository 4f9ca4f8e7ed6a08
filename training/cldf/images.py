"""Reading scans and refusing the ones that cannot be segmented: formats, grids, values, channel names.

Every problem is an `InputError` whose message names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import locale
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .hounsfield import MODALITY_TAG, RESCALE_TAG
from .orientation import reorient

POSITION_TAG = "0020|0032"  # Image Position (Patient)


class InputError(ValueError):
    """Input that cannot be processed; the message says what to do."""



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
    return stack_channels(read_images(paths, channels), channels, orientation)


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
        check_nifti_data(path, name)
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
    reader.MetaDataDictionaryArrayUpdateOn()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # uneven slices are said below, in words
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError(f"channel '{name}': the DICOM series in {folder} cannot be read as one volume "
                         "(missing or inconsistent slices?)") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    _check_even_spacing(reader, image, folder, name)
    for tag in (MODALITY_TAG, RESCALE_TAG):  # the modality and rescale say whether a series is CT in HU
        if reader.HasMetaDataKey(0, tag):
            image.SetMetaData(tag, reader.GetMetaData(0, tag))
    return image


def _check_even_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path, name: str) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal (a gap, a repeated or a missing slice):
    read as one volume it would get one mean spacing, and every mask on it would be misplaced."""
    files = reader.GetFileNames()
    if len(files) < 3 or not all(reader.HasMetaDataKey(i, POSITION_TAG) for i in range(len(files))):
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    where = np.array([[float(v) for v in reader.GetMetaData(i, POSITION_TAG).split("\\")] for i in range(len(files))])
    steps = np.diff(where @ normal)
    usual = float(np.median(steps))
    odd = np.flatnonzero(np.abs(steps - usual) > max(0.01, 0.01 * abs(usual)))
    if odd.size:
        i = int(odd[0])
        raise InputError(f"channel '{name}': the slices of the DICOM series in {folder} are not evenly spaced "
                         f"({steps[i]:g} mm between {Path(files[i]).name} and {Path(files[i + 1]).name}, "
                         f"{usual:g} mm elsewhere: a missing, repeated or extra slice?). Export the whole series "
                         "again, or resample it to even spacing (e.g. in Slicer) and give that file")


def check_nifti_data(path: Path, name: str) -> None:
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


def stack_channels(images: dict[str, sitk.Image], channels: list[str],
                   orientation: str = "") -> tuple[np.ndarray, sitk.Image]:
    """Check images already in memory (one per channel), reorient them to ``orientation`` (``""``: as stored)
    and stack them in the bundle's order. Every check comes first: nothing a library may raise on runs before.

    Returns:
        ``(C, Z, Y, X)`` float32 array and the first channel's image (the reference grid).
    """
    check_channel_names(list(images), channels)
    for name in channels:
        check_volume(images[name], name)
        if name != channels[0]:
            check_same_grid(images[channels[0]], images[name], channels[0], name)
    images = {name: reorient(images[name], orientation) for name in channels}
    ref = images[channels[0]]
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
    if image.GetDimension() == 2:
        raise InputError(f"channel '{name}' is a 2D image; a 3D volume (a stack of axial slices) is needed")
    if image.GetDimension() != 3:
        raise InputError(f"channel '{name}' is {image.GetDimension()}D (several volumes in one file); give each "
                         "channel as its own 3D volume (a stack of axial slices)")
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

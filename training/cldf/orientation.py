"""Orientation codes and reorienting: the same voxels with their axes permuted and flipped, never resampled.

A bundle cuts slices along the axes of its ``data.orientation``; every scan is reoriented to it
first and its outputs go back onto the scan's own grid.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

ORIENTATION_AXES = ("RL", "AP", "SI")  # an orientation code takes one letter of each, in any order


def check_orientation(code: str) -> str:
    """``code`` if it is an orientation code (e.g. ``"LPS"``, ``"ASR"``); a ValueError that says what is allowed."""
    letters = code.upper() if isinstance(code, str) else ""
    if len(letters) != 3 or sorted(next((i for i, a in enumerate(ORIENTATION_AXES) if c in a), 3)
                                   for c in letters) != [0, 1, 2]:
        raise ValueError(f"'{code}' is not an orientation code: give three letters, one of each pair "
                         f"{', '.join('/'.join(a) for a in ORIENTATION_AXES)}, e.g. LPS")
    return letters


def orientation_of(image: sitk.Image) -> str:
    """The image's orientation code (e.g. ``"LPS"``: its voxel axes point closest to these directions)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image: sitk.Image, orientation: str) -> sitk.Image:
    """The same voxels with their axes permuted and flipped to ``orientation`` (no resampling); ``""``: as is."""
    if not orientation or orientation_of(image) == orientation:
        return image
    return sitk.DICOMOrient(image, orientation)


def slice_order(stored: sitk.Image, orientation: str) -> np.ndarray | None:
    """For each slice of ``stored`` reoriented to ``orientation``, the index of the stored slice it is.

    None when reorienting moves the slice axis in-plane (then slices do not correspond one to one).
    """
    depth = stored.GetSize()[2]
    if not orientation or orientation_of(stored) == orientation:
        return np.arange(depth)
    index = np.broadcast_to(np.arange(depth, dtype=np.int32)[:, None, None], sitk.GetArrayViewFromImage(stored).shape)
    image = sitk.GetImageFromArray(np.ascontiguousarray(index))
    image.CopyInformation(stored)
    moved = sitk.GetArrayFromImage(reorient(image, orientation))
    return moved[:, 0, 0] if (moved == moved[:, :1, :1]).all() else None

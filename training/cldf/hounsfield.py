"""CT in Hounsfield units, put through the window its bundle's training scans were made with.

The shipped abdominal bundles were trained on 8-bit CT: the abdomen window [-125, 275] HU mapped
linearly onto 0..255, values outside it clipped (the BTCV / Synapse preprocessing). A bundle records
that window as ``data.ct_window``. A channel recognised as HU (`is_hounsfield`) goes through it before
normalisation, exactly as the training scans did, so a CT straight from a converter or a DICOM series
looks like them; a channel already in 0..255 is used as given. A bundle without a window (an MR
bundle) reads every input as given.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .defaults import ABDOMEN_CT_WINDOW

LEVELS = 255  # the windowed scans' intensities run 0..LEVELS
AIR_BELOW = -200.0  # HU: CT holds air, lungs and gas far below this; 8-bit and MR intensities never reach it
AIR_FRACTION = 1e-3  # of a channel's voxels below AIR_BELOW, for it to be taken as HU
DEFAULT_CT_WINDOW = ABDOMEN_CT_WINDOW  # a cohort in HU trains through it unless told another
MODALITY_TAG, RESCALE_TAG = "0008|0060", "0028|1052"  # DICOM Modality and Rescale Intercept


def is_hounsfield(channel: np.ndarray, image: sitk.Image | None = None) -> bool:
    """Is a channel CT in Hounsfield units? From a DICOM series' modality and rescale when it was read from one,
    else from its values: a CT in HU holds air, far below anything an 8-bit or MR scan stores."""
    if image is not None and image.HasMetaDataKey(MODALITY_TAG) and image.HasMetaDataKey(RESCALE_TAG):
        return image.GetMetaData(MODALITY_TAG).strip().upper() == "CT"
    return float(np.count_nonzero(channel < AIR_BELOW)) >= AIR_FRACTION * channel.size


def any_hounsfield(images: dict[str, sitk.Image]) -> bool:
    """Is any channel of a case's images CT in HU (`is_hounsfield`)?"""
    return any(is_hounsfield(sitk.GetArrayViewFromImage(image), image) for image in images.values())


def window(channel: np.ndarray, ct_window: tuple[float, float]) -> np.ndarray:
    """HU -> 0..LEVELS as the training scans were made: linear over the window, clipped outside, rounded."""
    low, high = ct_window
    return np.rint(np.clip((channel - low) / (high - low), 0.0, 1.0) * LEVELS).astype(np.float32)


def to_bundle_units(volume: np.ndarray, channels: list[str], ct_window: tuple[float, float] | None,
                    images: dict[str, sitk.Image] | None = None) -> tuple[np.ndarray, dict[str, dict]]:
    """``(C, Z, Y, X)`` intensities in the units of the bundle's training scans, and what was done per channel.

    Returns:
        The volume (windowed where a channel is HU and the bundle has a window, else as given) and, per
        channel, ``{"units": "HU", "window": [low, high], "to": [0, 255]}`` or ``{"units": "as given"}``:
        recorded in ``cldf-result.json`` and shown on the Slicer panel.
    """
    applied, out = {}, volume
    for c, name in enumerate(channels):
        image = (images or {}).get(name)
        if ct_window is not None and is_hounsfield(volume[c], image):
            out = out.copy() if out is volume else out
            out[c] = window(volume[c], ct_window)
            applied[name] = {"units": "HU", "window": [float(v) for v in ct_window], "to": [0, LEVELS]}
        else:
            applied[name] = {"units": "as given"}
    return out, applied


def describe(applied: dict[str, dict], windowed_only: bool = False) -> str:
    """One line for people: what was done to each channel's intensities (``windowed_only``: "" when nothing was)."""
    return "; ".join(f"{name}: HU through the window [{m['window'][0]:g}, {m['window'][1]:g}] -> 0..{m['to'][1]}"
                     if m["units"] == "HU" else f"{name}: as given" for name, m in applied.items()
                     if m["units"] == "HU" or not windowed_only)

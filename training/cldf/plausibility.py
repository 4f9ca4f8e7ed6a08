"""Is an input the kind of scan the bundle was trained on? Its intensity range against the training cases'.

A bundle's data card records, per channel, the range of its training cases' robust intensity ranges
(`slices.robust_range`, as stored: Hounsfield units for CT, scanner units for MR). An input far outside
them (a CT given to an MR bundle, an MR to a CT bundle) gets a warning: its masks may be meaningless.
So do two channels holding the same image (one scan given for both channels of an MR bundle).
Label maps are refused earlier (`images.check_values`).
"""

from __future__ import annotations

import numpy as np

LOW_TOLERANCE = 0.25  # of the training cases' typical range width, around their lowest intensities
WIDTH_FACTOR = 10.0  # an input's range width may be this many times narrower or wider than the training cases'


def intensity_card(ranges: np.ndarray, channels: list[str]) -> dict[str, dict[str, list[float]]]:
    """From ``(cases, C, 2)`` robust ranges: per channel, the low ends' span and the widths' span."""
    card = {}
    for c, name in enumerate(channels):
        low, width = ranges[:, c, 0], ranges[:, c, 1] - ranges[:, c, 0]
        card[name] = {"low": [float(low.min()), float(low.max())], "width": [float(width.min()), float(width.max())],
                      "typical_width": float(np.median(width))}
    return card


def intensity_warnings(ranges: np.ndarray, card: dict | None, channels: list[str]) -> list[str]:
    """Warnings for channels whose ``(C, 2)`` robust range is unlike every training case's."""
    warnings = []
    for c, name in enumerate(channels):
        ref = (card or {}).get(name)
        if not ref:
            continue
        lo, hi = (float(v) for v in ranges[c])
        slack = LOW_TOLERANCE * ref["typical_width"]
        low_ok = ref["low"][0] - slack <= lo <= ref["low"][1] + slack
        width_ok = ref["width"][0] / WIDTH_FACTOR <= hi - lo <= ref["width"][1] * WIDTH_FACTOR
        if not (low_ok and width_ok):
            warnings.append(
                f"channel '{name}': its intensities ({lo:.4g} to {hi:.4g}) are unlike those of the bundle's training "
                f"scans ({ref['low'][0]:.4g} to {ref['low'][1] + ref['width'][1]:.4g}); is it the right kind of scan "
                "(modality, units, channel order)? Its maps and mask may be meaningless")
    return warnings


def same_image_warnings(volume: np.ndarray, channels: list[str]) -> list[str]:
    """Warnings for pairs of channels of ``(C, Z, Y, X)`` that hold the same image (correlation above 0.99)."""
    flat = volume.reshape(len(channels), -1)[:, ::7].astype(np.float64)
    warnings = []
    for i in range(len(channels)):
        for j in range(i + 1, len(channels)):
            a, b = flat[i] - flat[i].mean(), flat[j] - flat[j].mean()
            if float(a @ b) > 0.99 * float(np.sqrt((a @ a) * (b @ b))):
                warnings.append(f"channels '{channels[i]}' and '{channels[j]}' hold the same image; the bundle expects "
                                "two different scans, so its maps and mask may be meaningless")
    return warnings

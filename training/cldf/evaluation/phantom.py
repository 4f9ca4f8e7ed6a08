"""A synthetic two-channel brain-like volume, for the demo and tests when the real data is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

MASK_FILE = "mask.nii.gz"


def make_phantom(path_dir: str | Path, seed: int = 0, shape: tuple[int, int, int] = (12, 96, 96)) -> dict[str, Path]:
    """Write FLAIR and T1 volumes (``.nii.gz``) of an elliptic "head" with a "tumour".

    The tumour is a blob that is bright in FLAIR and slightly dark in T1, on the
    middle slices only, so a volume has both positive and negative slices.

    Args:
        path_dir: folder to write into (created if needed).
        seed: seeds the noise, the texture and the tumour's position.
        shape: ``(Z, Y, X)``.

    Returns:
        ``{"FLAIR": path, "T1": path}``, ready for `Segmenter.start`; the tumour's
        mask is written beside them as ``mask.nii.gz`` (`MASK_FILE`).
    """
    rng = np.random.default_rng(seed)
    z, y, x = shape
    zz, yy, xx = np.meshgrid(np.arange(z), np.linspace(-1, 1, y), np.linspace(-1, 1, x), indexing="ij")
    taper = 1.0 - 0.5 * ((zz - (z - 1) / 2) / max(z / 2, 1)) ** 2  # head narrower at the ends
    head = (yy / (0.85 * taper)) ** 2 + (xx / (0.7 * taper)) ** 2 <= 1.0
    brain = (yy / (0.75 * taper)) ** 2 + (xx / (0.6 * taper)) ** 2 <= 1.0

    cy, cx = rng.uniform(-0.3, 0.3, size=2)
    r = rng.uniform(0.15, 0.25)
    z_extent = max(1, z // 3)
    dz = np.abs(zz - (z - 1) / 2) / z_extent  # tumour spans the middle third of the slices
    tumour = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2 + dz**2 <= 1.0

    texture = 0.05 * np.sin(9 * xx + 3 * zz) * np.cos(7 * yy)
    flair = np.where(head, 0.3, 0.0) + np.where(brain, 0.25 + texture, 0.0) + np.where(tumour, 0.45, 0.0)
    t1 = np.where(head, 0.6, 0.0) + np.where(brain, 0.15 - texture, 0.0) - np.where(tumour, 0.2, 0.0)
    noise = lambda: rng.normal(0.0, 0.02, size=shape)  # noqa: E731
    volumes = {"FLAIR": flair + noise(), "T1": t1 + noise(), "mask": tumour.astype(np.uint8)}

    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, array in volumes.items():
        image = sitk.GetImageFromArray(array if name == "mask" else (1000 * array).astype(np.float32))
        image.SetSpacing((2.0, 2.0, 3.0))
        paths[name] = out / f"{name.lower()}.nii.gz"
        sitk.WriteImage(image, str(paths[name]), useCompression=True)
    return {k: v for k, v in paths.items() if k != "mask"}

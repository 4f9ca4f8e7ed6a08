"""Writing results: volumes on the input's exact grid, written atomically, never over existing results silently."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .segment import VolumeResult

FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}
MAP_NAMES = ("cam", "mean_gradient", "seeds", "mask")
EXTRA_FILE_NAMES = {"cdm": "cdm_saliency"}  # optional maps (`cldf segment --maps`)


def output_paths(out_dir: Path, fmt: str, extra: tuple[str, ...] = ()) -> dict[str, Path]:
    if fmt not in FORMATS:
        raise ValueError(f"output format must be one of {sorted(FORMATS)}, not '{fmt}'")
    names = {name: name for name in MAP_NAMES} | {name: EXTRA_FILE_NAMES[name] for name in extra}
    paths = {name: out_dir / f"{file}{FORMATS[fmt]}" for name, file in names.items()}
    paths["slices"] = out_dir / "slices.csv"
    return paths


def check_out_dir(out_dir: Path, fmt: str, overwrite: bool, extra: tuple[str, ...] = ()) -> None:
    """Refuse an output folder that already holds results, unless ``overwrite``."""
    existing = [p.name for p in output_paths(out_dir, fmt, extra).values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds results ({', '.join(existing)}); choose another --out or pass --overwrite"
        )


def write_volume(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    """Write ``(Z, Y, X)`` ``array`` with the reference's spacing, origin and direction, atomically."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix="".join(path.suffixes))
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_result(result: VolumeResult, out_dir: str | Path, fmt: str = "nifti", overwrite: bool = False) -> dict[str, Path]:
    """Write cam, mean_gradient, seeds, mask, any extra map (cdm_saliency) and slices.csv; returns their paths."""
    out_dir = Path(out_dir)
    extra = tuple(result.extra)
    check_out_dir(out_dir, fmt, overwrite, extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, fmt, extra)
    arrays = {
        "cam": result.cam.astype(np.float32),
        "mean_gradient": result.mean_gradient.astype(np.float32),
        "seeds": result.seeds.astype(np.uint8),
        "mask": result.mask.astype(np.uint8),
    } | {name: m.astype(np.float32) for name, m in result.extra.items()}
    for name, array in arrays.items():
        write_volume(array, result.reference, paths[name])
    tmp = paths["slices"].with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice", "presence_probability", "prototype_similarity", "mask_voxels"])
        similarity = result.similarity if result.similarity is not None else np.full(len(result.presence), np.nan)
        for z, (p, sim) in enumerate(zip(result.presence, similarity)):
            w.writerow([z, f"{p:.4f}", "" if np.isnan(sim) else f"{sim:.4f}", int(result.mask[z].sum())])
    os.replace(tmp, paths["slices"])
    return paths

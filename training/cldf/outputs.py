"""Writing results: volumes on the input's exact grid, a whole folder at once, never over results silently.

Results are written into a hidden staging folder beside ``--out`` and moved into place only when
every file is written, with a marker file (`MARKER`) last; a failed, killed or concurrent run
therefore leaves either the complete earlier folder or the complete new one, never a mix.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from . import dicom_seg
from .atomic import current_umask
from .volume_result import VolumeResult

FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}
MAP_NAMES = ("cam", "mean_gradient", "seeds", "mask")
EXTRA_FILE_NAMES = {"cdm": "cdm_saliency"}  # optional maps (`cldf segment --maps`)
MARKER = "cldf-result.json"  # written last: its presence means the folder is complete
MAP_SCALE = 255  # maps in [0, 1] are written as 8-bit integers 0..255


class OutputError(ValueError):
    """Results that cannot be written where asked; the message says why and what to do."""


def output_paths(out_dir: Path, fmt: str, extra: tuple[str, ...] = (), maps: bool = True) -> dict[str, Path]:
    """Every output file of a run; ``maps=False``: the mask alone (no cam, mean_gradient, seeds)."""
    if fmt not in FORMATS:
        raise ValueError(f"output format must be one of {sorted(FORMATS)}, not '{fmt}'")
    names = {name: name for name in (MAP_NAMES if maps else ("mask",))} | {name: EXTRA_FILE_NAMES[name] for name in extra}
    paths = {name: out_dir / f"{file}{FORMATS[fmt]}" for name, file in names.items()}
    paths["slices"] = out_dir / "slices.csv"
    return paths


def _our_names() -> set[str]:
    names = {MARKER, "slices.csv", dicom_seg.FILE_NAME}
    for suffix in FORMATS.values():
        names |= {f"{n}{suffix}" for n in (*MAP_NAMES, *EXTRA_FILE_NAMES.values())}
    return names


def check_out_dir(out_dir: Path, overwrite: bool, also_ours: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an ``--out`` that cannot take results.

    It may be new, empty, or hold earlier results (replaced only with ``overwrite``); a folder holding
    other files is never replaced, nor is a file.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file, not a folder; choose another --out")
    blocker = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"cannot write results into {out_dir}: a part of the path is a file, not a folder "
                          f"({blocker}); choose another --out")
    if not out_dir.is_dir():
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    foreign = [n for n in entries if n not in _our_names() | set(also_ours)]
    if foreign:
        raise OutputError(f"{out_dir} holds files that are not results of `cldf segment` ({', '.join(foreign[:5])}); "
                          "choose a new or empty folder as --out")
    if not overwrite:
        state = "results" if MARKER in entries else "incomplete or older results (no completion marker)"
        raise FileExistsError(f"{out_dir} already holds {state} ({', '.join(entries[:6])}); "
                              "choose another --out or pass --overwrite")


@contextmanager
def staging_folder(out_dir: Path, overwrite: bool, also_ours: tuple[str, ...] = ()) -> Iterator[Path]:
    """A fresh hidden folder beside ``out_dir``, created before any work (so an unwritable ``--out`` fails fast).

    Removed on exit unless `commit` moved it into place.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite, also_ours)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.partial-"))
    except OSError as e:
        raise OutputError(f"cannot write results into {out_dir}: {_reason(e, parent)}") from None
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit(staging: Path, out_dir: Path, overwrite: bool, also_ours: tuple[str, ...] = ()) -> None:
    """Move the complete staging folder to ``out_dir`` (replacing earlier results only with ``overwrite``)."""
    check_out_dir(out_dir, overwrite, also_ours)  # again: another run may have written there meanwhile
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "results")
        else:
            out_dir.rmdir()
    try:
        os.rename(staging, out_dir)
    except OSError as e:
        if old is not None:
            os.replace(old / "results", out_dir)
            old.rmdir()
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"another run wrote results into {out_dir} meanwhile; they were kept and "
                                  "this run's results discarded: run again with --overwrite to replace them") from None
        raise OutputError(f"cannot move the results into {out_dir}: {_reason(e, out_dir.parent)}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_volume(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    """Write ``(Z, Y, X)`` ``array`` with the reference's spacing, origin and direction."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=True)


def map_to_uint8(m: np.ndarray) -> np.ndarray:
    """A map in [0, 1] as 8-bit integers 0..255 (a quarter of float32's size, far better compressed)."""
    return np.round(np.clip(m, 0.0, 1.0) * MAP_SCALE).astype(np.uint8)


def write_result(result: VolumeResult, out_dir: str | Path, fmt: str = "nifti", overwrite: bool = False,
                 provenance: dict[str, Any] | None = None, staging: Path | None = None,
                 also_ours: tuple[str, ...] = (), series: dicom_seg.SeriesSource | None = None) -> dict[str, Path]:
    """Write cam, mean_gradient, seeds, mask, any extra map (cdm_saliency), slices.csv and the marker (the mask
    alone of the four when the run computed no maps, ``result.has_maps``).

    Maps are on the input's own voxel grid (`VolumeResult.on_input_grid`); cam, mean_gradient and
    cdm_saliency as 8-bit 0..255 for 0..1. ``staging``: a folder from `staging_folder` made before the
    run (else one is made here). ``series``: also write the mask as a DICOM Segmentation of that series
    (`dicom_seg.FILE_NAME`). Returns the final paths.
    """
    out_dir = Path(out_dir)
    if staging is None:
        with staging_folder(out_dir, overwrite, also_ours) as folder:
            return write_result(result, out_dir, fmt, overwrite, provenance, folder, also_ours, series)
    result = result.on_input_grid()
    extra = tuple(result.extra)
    paths = output_paths(staging, fmt, extra, result.has_maps)
    arrays = {
        "cam": map_to_uint8(result.cam),
        "mean_gradient": map_to_uint8(result.mean_gradient),
        "seeds": result.seeds.astype(np.uint8),
        "mask": result.mask.astype(np.uint8),
    } | {name: map_to_uint8(m) for name, m in result.extra.items()}
    arrays = {name: a for name, a in arrays.items() if name in paths}
    try:
        for name, array in arrays.items():
            write_volume(array, result.reference, paths[name])
        _write_slices(result, paths["slices"])
        if series is not None:
            paths["dicom_seg"] = staging / dicom_seg.FILE_NAME
            dicom_seg.write(result.mask, result.reference, series, paths["dicom_seg"])
        marker = {"complete": True, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "files": sorted(p.name for p in paths.values()), "map_scale": MAP_SCALE, **(provenance or {})}
        (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    except (OSError, RuntimeError) as e:
        raise OutputError(f"writing the results failed ({_reason(e, staging)}); nothing was written to {out_dir}") from None
    commit(staging, out_dir, overwrite, also_ours)
    final = {name: out_dir / p.name for name, p in paths.items()}
    return final | {"marker": out_dir / MARKER}


def _write_slices(result: VolumeResult, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice", "presence_probability", "prototype_similarity", "mask_voxels"])
        similarity = result.similarity if result.similarity is not None else np.full(len(result.presence), np.nan)
        areas = result.mask_voxels if result.mask_voxels is not None else result.mask.reshape(len(result.mask), -1).sum(1)
        for z, (p, sim, area) in enumerate(zip(result.presence, similarity, areas)):
            w.writerow([z, f"{p:.4f}", "" if np.isnan(sim) else f"{sim:.4f}", int(area)])


def _reason(error: BaseException, folder: Path) -> str:
    """What went wrong, in words: a full disk, a read-only or missing folder, a path below a file."""
    code = getattr(error, "errno", None)
    try:
        full = shutil.disk_usage(folder if folder.exists() else folder.parent).free < (1 << 20)
    except OSError:
        full = False
    if code == errno.ENOSPC or full:
        return "no space left on the disk; free some space or choose another --out"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is read-only or not yours; choose another --out"
    if code == errno.ENOTDIR:
        return "a part of the path is a file, not a folder; choose another --out"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

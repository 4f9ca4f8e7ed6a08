"""The slice cache: a manifest's training slices on disk, memory-mapped, built once.

Training reads slices from one ``images.npy`` (``(N, C, R, R)`` float32), slice by slice as the
batches need them (`DiskSlices`), with their slice labels and case index beside it, so memory does
not grow with the cohort. A cache
belongs to the cases and the settings that shape slices (channels, resolution, normalisation,
orientation, label rule); it is reused while every input file is unchanged (same size and time, or
else the same sha256) and rebuilt when one changed. It holds slice labels, never pixel masks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import atomic
from ..manifest import Case, Manifest
from .slice_set import SliceSet, load_slice_set

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_root() -> Path:
    """``$CLDF_CACHE``, else ``$XDG_CACHE_HOME/cldf/slices`` (``~/.cache/cldf/slices``)."""
    if os.environ.get("CLDF_CACHE"):
        return Path(os.environ["CLDF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cldf" / "slices"


def cached_slice_set(manifest: Manifest, case_ids: list[str], channels: list[str], resolution: int,
                     percentiles: tuple[float, float], target_labels: list[int] | None, positive_fraction: float,
                     orientation: str = "", root: Path | None = None, progress: bool = True,
                     ct_window: tuple[float, float] | None = None) -> SliceSet:
    """`slice_set.load_slice_set`, from the cache when it holds these cases and settings, else built into it first."""
    settings = {"version": CACHE_VERSION, "channels": list(channels), "resolution": resolution,
                "percentiles": list(percentiles), "target_labels": target_labels,
                "positive_fraction": positive_fraction, "orientation": orientation,
                **({"ct_window": list(ct_window)} if ct_window is not None else {})}  # older caches stay valid
    cases = [manifest.case(cid) for cid in case_ids]
    files = {c.id: _input_files(c, channels) for c in cases}
    key = hashlib.sha256(json.dumps({"settings": settings, "files": files}, sort_keys=True).encode()).hexdigest()
    folder = (root or cache_root()) / key[:24]
    index = folder / "index.json"
    if index.is_file() and _unchanged(json.loads(index.read_text(encoding="utf-8")), folder):
        log.info("slice cache %s: reused", folder)
        return _open(folder)
    if folder.exists():
        log.info("slice cache %s: an input changed, rebuilding", folder)
    _build(folder, manifest, cases, settings, files, progress)
    return _open(folder)


def _input_files(case: Case, channels: list[str]) -> list[str]:
    paths = [case.channels[c] for c in channels] + [p for p in (case.mask, case.slice_labels) if p is not None]
    return [str(Path(p).resolve()) for p in paths]


def _stamp(path: Path) -> dict:
    """Size and modification time of a file, or of every file in a (DICOM) folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"size": sum(p.stat().st_size for p in files), "mtime_ns": max(p.stat().st_mtime_ns for p in files)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _unchanged(index: dict, folder: Path) -> bool:
    """Every input as recorded: the same size and time, or else the same content (then the record is renewed)."""
    renewed = False
    for record in index["inputs"]:
        path = Path(record["path"])
        if not path.exists():
            return False
        stamp = _stamp(path)
        if stamp == record["stamp"]:
            continue
        if _sha256(path) != record["sha256"]:
            return False
        record["stamp"], renewed = stamp, True
    if renewed:
        atomic.write_json(folder / "index.json", index)
    return True


def _build(folder: Path, manifest: Manifest, cases: list[Case], settings: dict, files: dict, progress: bool) -> None:
    """One case at a time into per-case files, then appended into ``images.npy``: memory holds one case."""
    work = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    labels, index, ranges, counts = [], [], [], []
    shape = None
    for i, case in enumerate(tqdm(cases, desc="slice cache", unit="case", disable=not progress)):
        one = load_slice_set(manifest, [case.id], settings["channels"], settings["resolution"],
                             tuple(settings["percentiles"]), settings["target_labels"], settings["positive_fraction"],
                             settings["orientation"], settings.get("ct_window"))
        np.save(work / f"case-{i}.npy", one.images.numpy())
        labels.append(one.labels.numpy())
        index.append(np.full(len(one.labels), i, np.int64))
        ranges.append(one.ranges[0])
        counts.append(len(one.labels))
        shape = tuple(one.images.shape[1:])
    with open(work / "images.npy", "wb") as f:  # plain appends: no page of the whole array is held
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                 "fortran_order": False, "shape": (sum(counts), *shape)})
        for i in range(len(cases)):
            part = work / f"case-{i}.npy"
            f.write(np.ascontiguousarray(np.load(part), np.float32).tobytes())
            part.unlink()
    np.save(work / "labels.npy", np.concatenate(labels))
    np.save(work / "case_index.npy", np.concatenate(index))
    np.save(work / "ranges.npy", np.stack(ranges))
    inputs = [{"path": p, "stamp": _stamp(Path(p)), "sha256": _sha256(Path(p))} for c in cases for p in files[c.id]]
    atomic.write_json(work / "index.json", {"settings": settings, "case_ids": [c.id for c in cases], "slices": counts,
                                      "inputs": inputs})
    atomic.replace_folder(work, folder)


class DiskSlices:
    """The ``(N, C, R, R)`` float32 array of an ``.npy`` file, read (not mapped) on indexing.

    Indexing with an int, a slice, or a list / tensor of rows returns a new tensor holding those
    rows only; nothing else of the file stays in the process's memory however many slices are read.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                raise ValueError(f"{self.path}: unexpected .npy format {version}; delete the cache folder to rebuild it")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        if fortran or dtype != np.float32 or len(shape) != 4:
            raise ValueError(f"{self.path} is not a (N, C, R, R) float32 array; delete the cache folder to rebuild it")
        self.shape = torch.Size(shape)
        self.row_bytes = int(np.prod(shape[1:])) * 4
        self._fd, self._pid = None, None
        self._file()  # opened now: a cache rebuilt later (a new file under the same name) does not change these slices

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:  # DataLoader workers open their own file
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _file(self) -> int:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _row(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"slice {i} is outside the {len(self)} cached slices")
        data = os.pread(self._file(), self.row_bytes, self.offset + (i % len(self)) * self.row_bytes)
        if len(data) != self.row_bytes:
            raise OSError(f"{self.path} is shorter than its header says; delete the cache folder to rebuild it")
        return np.frombuffer(data, np.float32).reshape(self.shape[1:])

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.ndim == 0):
            return torch.from_numpy(self._row(int(idx)).copy())
        rows = range(len(self))[idx] if isinstance(idx, slice) else [int(i) for i in idx]
        out = np.empty((len(rows), *self.shape[1:]), np.float32)
        for j, i in enumerate(rows):
            out[j] = self._row(i)
        return torch.from_numpy(out)

    def split(self, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), size):
            yield self[start : start + size]


def _open(folder: Path) -> SliceSet:
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    return SliceSet(DiskSlices(folder / "images.npy"), torch.from_numpy(np.load(folder / "labels.npy")),
                    torch.from_numpy(np.load(folder / "case_index.npy")), list(index["case_ids"]),
                    np.load(folder / "ranges.npy"))




"""Segmenting a cohort: one results folder per case, a summary, resumable, split into parts.

`cldf segment --data MANIFEST --out DIR` writes ``DIR/<case id>/`` for every case (as `cldf segment`
writes one folder, complete or not at all) and ``DIR/summary.csv``. A case whose folder holds its
completion marker is skipped, so a killed run resumes where it stopped. ``--part K/N`` (or torchrun's
``RANK``/``WORLD_SIZE``) takes every N-th case from the K-th: the parts together are one run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import atomic, dicom_seg
from .bundle import Bundle
from .images import InputError
from .manifest import Case, Manifest
from .outputs import MARKER, write_result
from .slice_job import VolumeSegmenter, provenance

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("case", "slices", "positive_slices", "mask_ml", "seconds")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (1-based) of ``count``."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Part":
        """``"K/N"``; without it, torchrun's rank and world size, else the whole cohort."""
        if text is None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            return cls(int(os.environ.get("RANK", "0")) + 1, world) if world > 1 else cls()
        k, sep, n = text.partition("/")
        try:
            part = cls(int(k), int(n))
        except ValueError:
            part = None
        if not sep or part is None or not 1 <= part.index <= part.count:
            raise ValueError(f"--part takes K/N with 1 <= K <= N, e.g. 1/2, not '{text}'")
        return part

    def of(self, cases: list[Case]) -> list[Case]:
        return cases[self.index - 1 :: self.count]


def segment_cohort(segmenter: VolumeSegmenter, manifest: Manifest, out: Path, fmt: str = "nifti",
                   overwrite: bool = False, part: Part = Part(), progress: bool = True, command: str = "",
                   write_maps: bool = True) -> dict[str, list[str]]:
    """Segment this part's cases into ``out/<case id>/``, skipping complete ones; returns case ids by outcome.

    ``write_maps=False``: each case's mask and slices.csv only (no cam, mean_gradient, seeds).

    A case that cannot be segmented (bad input) is logged and left out; the others go on.
    """
    bundle = segmenter.bundle
    cases = part.of(manifest.cases)
    missing = [c.id for c in cases if not set(bundle.channels) <= set(c.channels)]
    if missing:
        raise InputError(f"case(s) {', '.join(missing[:5])} in {manifest.path} lack channel(s) of the bundle "
                         f"{bundle.channels}")
    if fmt == dicom_seg.FORMAT:
        dicom_seg.check(bundle.card, {c.id: Path(c.channels[bundle.channels[0]]) for c in cases})
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, list[str]] = {"written": [], "skipped": [], "failed": []}
    bar = tqdm(cases, desc=f"cases (part {part.index}/{part.count})", unit="case", disable=not progress)
    for case in bar:
        folder = out / case.id
        if (folder / MARKER).is_file() and not overwrite:
            counts["skipped"].append(case.id)
            continue
        bar.set_postfix_str(case.id)
        try:
            _segment_case(segmenter, bundle, case, folder, fmt, overwrite, command, write_maps)
        except (InputError, FileNotFoundError, FileExistsError) as e:  # one bad case does not stop the cohort
            log.error("case '%s': %s", case.id, e)
            counts["failed"].append(case.id)
            continue
        counts["written"].append(case.id)
        write_summary(out)
    write_summary(out)
    return counts


def _segment_case(segmenter: VolumeSegmenter, bundle: Bundle, case: Case, folder: Path, fmt: str, overwrite: bool,
                  command: str, write_maps: bool) -> None:
    t0 = time.time()
    inputs = {c: case.channels[c] for c in bundle.channels}
    series = dicom_seg.source(inputs[bundle.channels[0]], bundle.card, bundle.channels[0]) \
        if fmt == dicom_seg.FORMAT else None
    job = segmenter.start(inputs)
    result = job.run(progress=False)
    result.has_maps = result.has_maps and write_maps
    spacing = result.reference.GetSpacing()
    summary = {"case": case.id, "slices": len(result.presence),
               "positive_slices": int(result.mask.reshape(len(result.mask), -1).any(axis=1).sum()),
               "mask_ml": round(float(result.mask.sum()) * spacing[0] * spacing[1] * spacing[2] / 1000.0, 3),
               "seconds": round(time.time() - t0, 1)}
    write_result(result, folder, "nifti" if series else fmt, overwrite, provenance(job, inputs, command, summary=summary),
                 series=series)


def write_summary(out: Path) -> Path:
    """``summary.csv`` from every complete case folder in ``out`` (all parts' cases, sorted by id), atomically."""
    rows = []
    for marker in sorted(out.glob(f"*/{MARKER}")):
        summary = json.loads(marker.read_text(encoding="utf-8")).get("summary")
        if summary:
            rows.append(summary)
    path = out / "summary.csv"
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: r["case"]))
    return path

"""A volume segmented one batch of slices per `step()`: what every segmenter's job shares.

The CLI drives a job with a progress bar (`run`), the Slicer module from a worker thread, so neither
waits for the whole volume before showing progress. Subclasses say what one batch does (`_run`) and
what the whole volume does once every slice is done (`_finish`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from . import cases
from .bundle import Bundle
from .card import validation_score
from .config import CLDFConfig
from .images import read_images
from .plausibility import intensity_warnings, same_image_warnings
from .volume_result import VolumeResult

if TYPE_CHECKING:
    from .refine import SamRefiner

log = logging.getLogger(__name__)


class SliceJob:
    """Steps over ``total`` slices in batches of ``segmenter.batch_size``; ``result`` fills in as it goes."""

    kind: str  # which segmenter makes the mask: "cldf" (the pipeline) or "student"
    segmenter: object  # has ``batch_size`` and ``to(device)``
    result: VolumeResult

    def __init__(self, case: cases.CaseVolume, bundle: Bundle):
        self.total = case.volume.shape[1]
        self.done = 0
        self.cancelled = False
        self.warnings = input_warnings(case, bundle)  # what is unusual about the input for this bundle
        self.intensities = case.intensities  # per channel, what was done to its intensities (HU windowed or not)

    @property
    def progress(self) -> tuple[int, int]:
        return self.done, self.total

    def cancel(self) -> None:
        self.cancelled = True

    def step(self) -> bool:
        """Process the next batch; True while slices remain."""
        if self.cancelled or self.done >= self.total:
            return False
        seg = self.segmenter
        stop = min(self.done + seg.batch_size, self.total)
        try:
            self._run(self.done, stop)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if seg.batch_size > 1:
                seg.batch_size //= 2
                log.warning("CUDA out of memory: batch size halved to %d", seg.batch_size)
            else:
                log.warning("CUDA out of memory with one slice per batch: continuing on the CPU")
                seg.to(torch.device("cpu"))
            return True
        self.done = stop
        if self.done == self.total:
            self._finish()
        return self.done < self.total

    def run(self, progress: bool = True) -> VolumeResult:
        """Step to the end (with a progress bar) and return the result."""
        with tqdm(total=self.total, desc="segment", unit="slice", disable=not progress) as bar:
            while self.step():
                bar.update(self.done - bar.n)
            bar.update(self.done - bar.n)
        return self.result

    def _run(self, start: int, stop: int) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Whole-volume work once every slice is done (none by default)."""


class VolumeSegmenter:
    """What every segmenter offers: `start` a job on files, or `start_images` on images in memory."""

    bundle: Bundle
    cfg: CLDFConfig

    def start(self, inputs: dict[str, str | Path], decoder_seed: int = 0, keep_cache: bool = False) -> SliceJob:
        """Validate and read the inputs (refusing bad ones before any work), return a stepwise job.

        Slices are cut along the bundle's axes (`start_images` with ``reorient``); `VolumeResult.on_input_grid`
        maps the outputs back onto the input's own grid.
        ``keep_cache``: also keep every slice's pixel embeddings (`SliceCache`), so the masks can be
        re-decided for another gate threshold or clustering in a fraction of a second (`Redecider`).
        """
        return self.start_images(read_images(inputs, self.bundle.channels), decoder_seed, keep_cache, reorient=True)

    def start_images(self, images: dict[str, sitk.Image], decoder_seed: int = 0, keep_cache: bool = False,
                     reorient: bool = False) -> SliceJob:
        """As `start`, for images already in memory (the Slicer module's volume nodes).

        ``reorient``: cut the slices along the bundle's axes (``data.orientation``): the job's arrays and
        ``result.reference`` are then on the reoriented grid and ``result.input_reference`` is the input's.
        Without it, slices are cut along the images' third voxel axis.
        """
        job = self._job(cases.case_from_images(images, self.cfg.data, reorient), decoder_seed, keep_cache)
        if reorient:
            job.result.input_reference = images[self.bundle.channels[0]]
        return job

    def _job(self, case: cases.CaseVolume, decoder_seed: int, keep_cache: bool) -> SliceJob:
        raise NotImplementedError


def provenance(job: SliceJob, inputs: dict[str, str | Path], command: str, **more) -> dict:
    """What ``cldf-result.json`` records about a run: the bundle, its target and the target's standard codes, the
    segmenter and its validation score, what was done to the input's intensities, the inputs and the command (the
    CLI's and cohort runs' one record)."""
    bundle = job.segmenter.bundle
    score = validation_score(bundle.card, job.kind)
    task = bundle.card.get("task") or {}
    target = {"name": task.get("target"), "code": task.get("code")}  # the code: `terminology.SegmentCode.to_card`
    return {"bundle": bundle.id, "target": target, "segmenter": job.kind,
            "validation": dataclasses.asdict(score) if score else None,
            "intensities": job.intensities, "inputs": {k: str(v) for k, v in inputs.items()}, "command": command,
            **more}


def input_warnings(case: cases.CaseVolume, bundle: Bundle) -> list[str]:
    """What is unusual about a case for this bundle (logged; the Slicer module shows them too)."""
    card = bundle.card.get("training", {}).get("data_card", {}).get("intensity")
    warnings = intensity_warnings(case.ranges, card, bundle.channels) + same_image_warnings(case.volume, bundle.channels)
    for warning in warnings:
        log.warning("warning: %s", warning)
    return warnings


def bundle_refiner(bundle: Bundle, method: str | None, batch_size: int) -> tuple[SamRefiner | None, int]:
    """The SAM refiner when refinement is on (None when off) and the index of the channel it sees.

    ``method``: ``"sam"``, ``"none"`` or None (the bundle's ``refine.method``). `refine` loads timm and the
    network only when refining.
    """
    if method not in (None, "none", "sam"):
        raise ValueError(f"refine must be 'none', 'sam' or None (the bundle's refine.method), not '{method}'")
    from .refine import SamRefiner, check_refine_config

    cfg = replace(bundle.config.refine, method=method or bundle.config.refine.method)
    check_refine_config(cfg, bundle.channels)
    channel = bundle.channels.index(cfg.channel or bundle.channels[0])
    return (SamRefiner(cfg, "cpu", batch_size=batch_size) if cfg.method == "sam" else None), channel

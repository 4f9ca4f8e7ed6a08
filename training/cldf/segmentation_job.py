"""One volume through a `Segmenter`, one batch of slices per `step()`: the CLI drives it with a progress bar,
the Slicer module from a worker thread, so neither waits for the whole volume."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cases
from .plausibility import intensity_warnings, same_image_warnings
from .postprocess import keep_main_components
from .slices import from_slices
from .volume_result import SliceCache, VolumeResult

if TYPE_CHECKING:
    from .segment import Segmenter

log = logging.getLogger(__name__)


class SegmentationJob:
    """One volume, segmented one batch of slices per `step()`."""

    def __init__(self, segmenter: Segmenter, case: cases.CaseVolume, decoder_seed: int = 0, keep_cache: bool = False):
        if decoder_seed not in segmenter.bundle.decoders[segmenter.variant]:
            raise ValueError(f"the bundle has no decoder with seed {decoder_seed}")
        self.segmenter = segmenter
        self.decoder_seed = decoder_seed
        cfg = segmenter.cfg.data
        volume, reference, normalised = case.volume, case.reference, case.normalised
        card = segmenter.bundle.card.get("training", {}).get("data_card", {}).get("intensity")
        self.warnings = (intensity_warnings(case.ranges, card, segmenter.bundle.channels)  # also shown by the Slicer module
                         + same_image_warnings(volume, segmenter.bundle.channels))
        for warning in self.warnings:
            log.warning("warning: %s", warning)
        self.slices = case.slices(cfg.resolution)
        r = segmenter.cam_resolution
        self.cam_slices = case.slices(r) if r else None  # the CAM source's own slices
        # refinement works on the scan's own grid: one normalised channel and the in-plane (row, column) spacing
        self.refine_image = normalised[segmenter.refine_channel] if segmenter.refiner is not None else None
        self.spacing = (reference.GetSpacing()[1], reference.GetSpacing()[0])
        self.shape = volume.shape[1:]
        z, y, x = self.shape
        self.result = VolumeResult(
            reference,
            cam=np.zeros(self.shape, np.float32),
            mean_gradient=np.zeros(self.shape, np.float32),
            seeds=np.zeros(self.shape, np.uint8),
            mask=np.zeros(self.shape, np.uint8),
            presence=np.zeros(z, np.float32),
            similarity=np.full(z, np.nan, np.float32),
            extra={name: np.zeros(self.shape, np.float32) for name in segmenter.extra_maps},
            coarse_mask=np.zeros(self.shape, np.uint8) if segmenter.refiner is not None else None,
        )
        if keep_cache:
            r, e = cfg.resolution, segmenter.bundle.decoders[segmenter.variant][decoder_seed].cfg.hidden[-1]
            self.result.cache = SliceCache(np.zeros((z, e, r, r), np.float32), np.zeros((z, r, r), np.uint8),
                                           np.zeros((z, r, r), bool), self.result.presence)
        self.done = 0
        self.cancelled = False

    @property
    def total(self) -> int:
        return self.shape[0]

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

    def _finish(self) -> None:
        """Whole-volume rule once every slice is done: keep the main 3D object(s) (`postprocess`)."""
        r = self.result
        r.mask = keep_main_components(r.mask, self.segmenter.cfg.postprocess.min_component_fraction)
        if r.coarse_mask is not None:
            r.coarse_mask = keep_main_components(r.coarse_mask, self.segmenter.cfg.postprocess.min_component_fraction)

    def _run(self, start: int, stop: int) -> None:
        seg = self.segmenter
        x = self.slices[start:stop].to(seg.device)
        x_cam = self.cam_slices[start:stop].to(seg.device) if self.cam_slices is not None else None
        ids = torch.arange(start, stop)
        maps = seg.slice_maps(x, ids, x_cam=x_cam)
        cache = self.result.cache
        masks, evidence = seg.masks_with_evidence(x, maps, (self.decoder_seed,), embed_all=cache is not None,
                                                  kmeans_cache=cache.kmeans if cache is not None else None, slice_ids=ids)
        if cache is not None:
            cache.embeddings[start:stop] = evidence[self.decoder_seed].embeddings.numpy()
            cache.seeds[start:stop] = seg.seeds(maps, ids, gate=False).cpu().numpy()
            cache.body[start:stop] = maps.body.cpu().numpy()
        mask = masks[self.decoder_seed]
        self.result.similarity[start:stop] = evidence[self.decoder_seed].similarity.numpy()
        hw = self.shape[1:]
        r = self.result
        r.cam[start:stop] = from_slices(maps.cam, hw)
        r.mean_gradient[start:stop] = from_slices(maps.mean_gradient, hw)
        r.seeds[start:stop] = from_slices(maps.seeds, hw, mode="nearest")
        r.mask[start:stop] = from_slices(mask, hw, mode="mask")
        if seg.refiner is not None:  # sharpened on the scan's grid; slices with an empty mask stay empty
            r.coarse_mask[start:stop] = r.mask[start:stop]
            r.mask[start:stop] = seg.refiner.refine(self.refine_image[start:stop], r.mask[start:stop], self.spacing)
        r.presence[start:stop] = maps.presence.cpu().numpy()
        for name, m in maps.extra.items():
            r.extra[name][start:stop] = from_slices(m, hw)

    def run(self, progress: bool = True) -> VolumeResult:
        """Step to the end (with a progress bar) and return the result."""
        with tqdm(total=self.total, desc="segment", unit="slice", disable=not progress) as bar:
            while self.step():
                bar.update(self.done - bar.n)
            bar.update(self.done - bar.n)
        return self.result

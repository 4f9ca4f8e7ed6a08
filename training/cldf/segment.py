"""Inference (CLDF, Sec. 2.5): maps, seeds, gating, diffusion features, clustering, back to the input grid.

`Segmenter.start` returns a `SegmentationJob` that processes one batch of slices
per `step()`; the CLI drives it with a progress bar, the Slicer module from a worker
thread, so neither waits for the whole volume before showing progress.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import cases, cluster
from .bundle import Bundle
from .defaults import BATCH_SIZE, DEVICE
from .device import autocast, resolve_device
from .features import DiffusionFeatures, EncoderFeatures
from .maps import CDMSaliency, MeanGradient, build_cam, normalise_per_slice
from .postprocess import SliceEvidence, keep_main_components, keep_slices
from .seeds import FOREGROUND, body_mask, fuse_seeds
from .slice_job import SliceJob, VolumeSegmenter, bundle_refiner
from .slice_maps import SliceMaps, slice_presence
from .slices import from_slices
from .variants import OWN_NETWORKS, VARIANTS
from .volume_result import SliceCache, VolumeResult

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

EXTRA_MAPS = ("cdm",)


class Segmenter(VolumeSegmenter):
    """A bundle's networks on a device, ready to segment slices.

    Args:
        bundle: a loaded bundle.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: slices per step.
        variant: a key of `VARIANTS`: ``"cdm"`` (CLDF), ``"untrained"`` (a random CDM, for comparison),
            ``"cam-seeds"`` or ``"mg-seeds"`` (decoders trained on seeds from one map, the ablations),
            ``"encoder"`` (features of the noisy classifier's encoder instead of the CDM's),
            ``"ame-cam-seeds"`` / ``"ame-cam-fused"`` (seeds from AME-CAM alone / with the mean gradient),
            ``"cpf-cte-seeds"`` (seeds from the CPF-CTE map alone).
        maps: extra per-slice maps to compute besides CAM and mean gradient (``"cdm"``: CDM saliency).
        refine: ``"sam"`` sharpens the final mask on the scan's own grid with LiteMedSAM (`refine`),
            ``"none"`` does not; None: the bundle's ``refine.method``.
    """

    def __init__(self, bundle: Bundle, device: str = DEVICE, batch_size: int = BATCH_SIZE, variant: str = "cdm",
                 maps: tuple[str, ...] = (), refine: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown decoder variant '{variant}'; choose one of {sorted(VARIANTS)}")
        if variant not in bundle.decoders:
            raise ValueError(f"the bundle has no decoders of variant '{variant}'; it has {sorted(bundle.decoders)}. "
                             "Bundles made before the ablations get them with `cldf ablate`")
        unknown = set(maps) - set(EXTRA_MAPS)
        if unknown:
            raise ValueError(f"unknown extra map(s) {sorted(unknown)}; choose from {EXTRA_MAPS}")
        self.bundle = bundle
        self.cfg = bundle.config
        self.batch_size = batch_size
        self.variant = variant
        self.extra_maps = tuple(maps)
        spec = VARIANTS[variant]
        cdm, self.seed_source = spec.features, spec.seeds
        self.cam_source = spec.cam or self.cfg.maps.cam_method
        self._cdm = {"cdm": bundle.cdm, "encoder": bundle.noisy_classifier}[cdm] if cdm != "untrained" else bundle.untrained_cdm()
        self.refiner, self.refine_channel = bundle_refiner(bundle, refine, batch_size)
        self.to(resolve_device(device))

    def to(self, device: torch.device) -> "Segmenter":
        self.device = device
        b, cfg, sched = self.bundle, self.cfg, self.bundle.schedule
        self.cam = self._build_cam(cfg.maps.cam_method)
        self._other_cams: dict[str, object] = {}  # built when first asked for (`slice_maps`)
        self.mg = MeanGradient(b.noisy_classifier.to(device), sched, cfg.maps.mg_timesteps, cfg.maps.noise_seed,
                               cfg.maps.mg_shift_period)
        features = EncoderFeatures if VARIANTS[self.variant].features == "encoder" else DiffusionFeatures
        self.features = features(self._cdm.to(device), sched, cfg.features)
        self.saliency = (CDMSaliency(b.cdm.to(device), b.noisy_classifier, sched, cfg.saliency, cfg.maps.noise_seed)
                         if "cdm" in self.extra_maps else None)
        for d in b.decoders[self.variant].values():
            d.mlp_.to(device)
        if self.refiner is not None:
            self.refiner.to(device)
        return self

    def _build_cam(self, method: str):
        b, cfg = self.bundle, self.cfg
        own = {name: net.to(self.device) for name in OWN_NETWORKS.values() if (net := getattr(b, name)) is not None}
        cam = build_cam(method, b.cam_classifier.to(self.device), cfg.maps.cam_layers, cfg.maps.gradcam_layer, **own)
        return cam if method in OWN_NETWORKS else b.on_sides(cam)  # AME-CAM and CPF-CTE: own classifiers, whole slices

    @property
    def cam_resolution(self) -> int | None:
        """Slice size the CAM source needs when it differs from the bundle's (AME-CAM's own), else None.

        Callers then cut a second slice tensor at this size from the normalised volume
        (`slices.to_slices`) and pass it to `slice_maps` as ``x_cam``.
        """
        return self._resolution_of(self.cfg.maps.cam_method)

    def _resolution_of(self, method: str) -> int | None:
        r = self.cfg.ame_cam.resolution
        return None if method != "ame-cam" or r in (0, self.cfg.data.resolution) else r

    # ------------------------------------------------------------------ per batch
    def slice_maps(self, x: torch.Tensor, slice_ids: torch.Tensor, gate: bool = True,
                   x_cam: torch.Tensor | None = None, cam_sources: tuple[str, ...] = ()) -> SliceMaps:
        """CAM, mean gradient, presence, body and seeds of ``(B, C, R, R)`` slices.

        With ``gate`` (inference) slices judged negative get no seeds; training
        passes ``gate=False`` because it knows which slices are positive.
        ``x_cam``: the same slices at `cam_resolution` ``(B, C, R', R')`` when that is set.
        ``cam_sources``: further CAM methods to compute into ``other_cams`` (this variant's own always is);
        the presence (the slice gate) stays the bundle's CAM source's.
        """
        with autocast(self.device):
            cam, presence = self.cam_map(x, x_cam)
            mg = self.mg(x)
            extra = {"cdm": self.saliency(x).float()} if "cdm" in self.extra_maps else {}
            others = {m: self.cam_map(x, x_cam, m)[0].float()
                      for m in dict.fromkeys((*cam_sources, self.cam_source)) if m != self.cfg.maps.cam_method}
        body = body_mask(x, self.cfg.data.body_threshold)
        maps = SliceMaps(cam.float(), mg.float(), presence.float(), body, torch.zeros(0), extra, others)
        maps.seeds = self.seeds(maps, slice_ids, gate)
        return maps

    def presence(self, x: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """``(N,)`` probabilities that ``(N, C, R, R)`` clean slices hold the target, by a CAM source's classifier."""
        method = method or self.cfg.maps.cam_method
        if method not in OWN_NETWORKS:
            return slice_presence(self.bundle.slice_classifier, x, self.device)
        if len(x) == 0:
            return torch.zeros(0)
        return torch.cat([self.cam_map(b.to(self.device), None, method)[1].float().cpu() for b in x.split(16)])

    def cam_map(self, x: torch.Tensor, x_cam: torch.Tensor | None = None,
                method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A CAM source (default: the bundle's) on its own slices, its ``(B, R, R)`` map back at the bundle's resolution."""
        if method is None or method == self.cfg.maps.cam_method:
            method, cam_fn = self.cfg.maps.cam_method, self.cam
        else:
            if method not in self._other_cams:
                self._other_cams[method] = self._build_cam(method)
            cam_fn = self._other_cams[method]
        r = self._resolution_of(method)
        if r is None:
            return cam_fn(x)
        if x_cam is None or x_cam.shape[-1] != r:
            if not getattr(self, "_warned_resize", False):
                log.warning("CAM source runs at %d x %d but got no slices of that size: resizing the bundle's slices", r, r)
                self._warned_resize = True
            x_cam = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        cam, presence = cam_fn(x_cam)
        cam = F.interpolate(cam[:, None].float(), size=tuple(x.shape[-2:]), mode="bilinear", antialias=True,
                            align_corners=False)[:, 0]
        return normalise_per_slice(cam), presence

    def seeds(self, maps: SliceMaps, slice_ids: torch.Tensor, gate: bool = True) -> torch.Tensor:
        """This variant's seeds from a batch's maps; with ``gate``, none on slices judged negative."""
        cam = maps.cam if self.cam_source == self.cfg.maps.cam_method else maps.other_cams[self.cam_source]
        seeds = fuse_seeds(cam, maps.mean_gradient, maps.body, self.cfg.seeds, slice_ids,
                           self.cfg.maps.noise_seed, self.seed_source)
        if gate:
            seeds[maps.presence < self.cfg.cluster.presence_threshold] = 0
        return seeds

    def masks(self, x: torch.Tensor, maps: SliceMaps, decoder_seeds: tuple[int, ...] = (0,),
              per_slice_rule: bool = True) -> dict[int, torch.Tensor]:
        """Final masks per decoder seed; slices judged negative stay empty (no features, no K-means).

        With ``per_slice_rule`` a mask that fails the bundle's `PostprocessConfig` slice rule is emptied too.
        """
        return self.masks_with_evidence(x, maps, decoder_seeds, per_slice_rule)[0]

    def masks_with_evidence(self, x: torch.Tensor, maps: SliceMaps, decoder_seeds: tuple[int, ...] = (0,),
                            per_slice_rule: bool = True, embed_all: bool = False, kmeans_cache: dict | None = None,
                            slice_ids: torch.Tensor | None = None,
                            ) -> tuple[dict[int, torch.Tensor], dict[int, SliceEvidence]]:
        """As `masks`, plus per decoder seed the evidence each slice's mask rests on (`postprocess.SliceEvidence`).

        With ``embed_all`` the pixel embeddings of every slice, judged positive or not, are computed and
        returned in ``evidence[seed].embeddings`` (``(B, E, R, R)``), so the masks can be re-decided later
        for another gate threshold or clustering without the networks (`Redecider`); ``kmeans_cache`` then
        keeps the K-means results (keyed by ``slice_ids``), so re-deciding does not repeat them.
        """
        shape = maps.cam.shape
        out = {s: torch.zeros(shape, dtype=torch.bool) for s in decoder_seeds}
        n_seeds = (maps.seeds == FOREGROUND).flatten(1).sum(dim=1).cpu()
        evidence = {s: SliceEvidence(torch.full((shape[0],), float("nan")), n_seeds, maps.presence.float().cpu())
                    for s in decoder_seeds}
        gated = (maps.presence >= self.cfg.cluster.presence_threshold).cpu()
        todo = torch.arange(shape[0]) if embed_all else gated.nonzero()[:, 0]
        if len(todo) == 0:
            return out, evidence
        decoders = [self.bundle.decoders[self.variant][s] for s in decoder_seeds]
        # every decoder's first layer in one projection: the UNet runs once for all seeds
        weights = [torch.cat(ws) for ws in zip(*[d.block_weights(self.features.block_channels) for d in decoders])]
        with autocast(self.device):
            projected = self.features(x[todo.to(x.device)], project=weights)
        size = tuple(x.shape[-2:])
        for n, (s, decoder) in enumerate(zip(decoder_seeds, decoders)):
            k = decoder.cfg.hidden[0]
            with torch.inference_mode():
                emb = decoder.embed_projected([p[:, n * k : (n + 1) * k] for p in projected], size).float().cpu()
            if embed_all:
                evidence[s].embeddings = emb
            for j, i in enumerate(todo.tolist()):
                if gated[i]:
                    out[s][i], evidence[s].similarity[i] = cluster.cluster_slice(
                        emb[j], maps.seeds[i].cpu(), maps.body[i].cpu(), decoder.foreground_prototype_, self.cfg.cluster,
                        kmeans_cache, int(slice_ids[i]) if slice_ids is not None else i)
            if per_slice_rule:
                out[s][~keep_slices(evidence[s], self.cfg.postprocess)] = False
        return out, evidence

    def _job(self, case: cases.CaseVolume, decoder_seed: int, keep_cache: bool) -> "SegmentationJob":
        return SegmentationJob(self, case, decoder_seed, keep_cache)


class SegmentationJob(SliceJob):
    """One volume through CLDF, one batch of slices per `step()`."""

    kind = "cldf"

    def __init__(self, segmenter: Segmenter, case: cases.CaseVolume, decoder_seed: int = 0, keep_cache: bool = False):
        if decoder_seed not in segmenter.bundle.decoders[segmenter.variant]:
            raise ValueError(f"the bundle has no decoder with seed {decoder_seed}")
        super().__init__(case, segmenter.bundle)
        self.segmenter = segmenter
        self.decoder_seed = decoder_seed
        cfg = segmenter.cfg.data
        volume, reference, normalised = case.volume, case.reference, case.normalised
        self.slices = case.slices(cfg.resolution)
        r = segmenter.cam_resolution
        self.cam_slices = case.slices(r) if r else None  # the CAM source's own slices
        # refinement works on the scan's own grid: one normalised channel and the in-plane (row, column) spacing
        self.refine_image = normalised[segmenter.refine_channel] if segmenter.refiner is not None else None
        self.spacing = case.in_plane_spacing
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

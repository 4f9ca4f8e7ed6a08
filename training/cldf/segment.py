"""Inference (CLDF, Sec. 2.5): maps, seeds, gating, diffusion features, clustering, back to the input grid.

`Segmenter.start` returns a `SegmentationJob` that processes one batch of slices
per `step()`; the CLI drives it with a progress bar, the Slicer module from a
timer so the interface never freezes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import cases, cluster
from .bundle import Bundle
from .defaults import BATCH_SIZE, DEVICE
from .device import autocast, resolve_device
from .features import DiffusionFeatures, EncoderFeatures
from .images import read_images
from .maps import CDMSaliency, MeanGradient, build_cam, normalise_per_slice
from .postprocess import SliceEvidence, keep_slices
from .seeds import FOREGROUND, body_mask, fuse_seeds
from .segmentation_job import SegmentationJob
from .variants import VARIANTS

if TYPE_CHECKING:
    from .refine import SamRefiner

log = logging.getLogger(__name__)

EXTRA_MAPS = ("cdm",)


def slice_presence(classifier: torch.nn.Module, x: torch.Tensor, device: torch.device, batch: int = 16) -> torch.Tensor:
    """Probability that each of ``(N, C, H, W)`` clean slices holds the target (the slice gate)."""
    if len(x) == 0:
        return torch.zeros(0)
    with torch.inference_mode():
        return torch.cat([classifier(b.to(device), torch.zeros(len(b), dtype=torch.long, device=device))
                          .float().softmax(1)[:, 1].cpu() for b in x.split(batch)])


@dataclass
class SliceMaps:
    """Per-slice results at bundle resolution, ``(B, R, R)`` unless noted."""

    cam: torch.Tensor
    mean_gradient: torch.Tensor
    presence: torch.Tensor  # (B,) probability that the target is in the slice
    body: torch.Tensor
    seeds: torch.Tensor  # 1 foreground, 2 background, 0 none; empty on slices judged negative
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # optional maps, e.g. "cdm"
    other_cams: dict[str, torch.Tensor] = field(default_factory=dict)  # CAM sources besides the bundle's


class Segmenter:
    """A bundle's networks on a device, ready to segment slices.

    Args:
        bundle: a loaded bundle.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: slices per step.
        variant: a key of `VARIANTS`: ``"cdm"`` (CLDF), ``"untrained"`` (a random CDM, for comparison),
            ``"cam-seeds"`` or ``"mg-seeds"`` (decoders trained on seeds from one map, the ablations),
            ``"encoder"`` (features of the noisy classifier's encoder instead of the CDM's),
            ``"ame-cam-seeds"`` / ``"ame-cam-fused"`` (seeds from AME-CAM alone / with the mean gradient).
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
        self.refiner = self._refiner(refine)
        self.to(resolve_device(device))

    def _refiner(self, method: str | None) -> SamRefiner | None:
        """The SAM refiner when refinement is on, else None (`refine` loads timm and the network only then)."""
        if method not in (None, "none", "sam"):
            raise ValueError(f"refine must be 'none', 'sam' or None (the bundle's refine.method), not '{method}'")
        from .refine import SamRefiner, check_refine_config

        cfg = replace(self.cfg.refine, method=method or self.cfg.refine.method)
        check_refine_config(cfg, self.bundle.channels)
        self.refine_channel = self.bundle.channels.index(cfg.channel or self.bundle.channels[0])
        return SamRefiner(cfg, "cpu", batch_size=self.batch_size) if cfg.method == "sam" else None

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
        cam = build_cam(method, b.cam_classifier.to(self.device), cfg.maps.cam_layers, cfg.maps.gradcam_layer,
                        b.ame_cam.to(self.device) if b.ame_cam is not None else None)
        return cam if method == "ame-cam" else b.on_sides(cam)  # AME-CAM has its own classifier, on whole slices

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
        if (method or self.cfg.maps.cam_method) != "ame-cam":
            return slice_presence(self.bundle.slice_classifier, x, self.device)
        if len(x) == 0:
            return torch.zeros(0)
        return torch.cat([self.cam_map(b.to(self.device), None, "ame-cam")[1].float().cpu() for b in x.split(16)])

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

    # ------------------------------------------------------------------ volumes
    def start(self, inputs: dict[str, str | Path], decoder_seed: int = 0, keep_cache: bool = False) -> "SegmentationJob":
        """Validate and read the inputs (refusing bad ones before any work), return a stepwise job.

        Slices are cut along the bundle's axes (`start_images` with ``reorient``); `VolumeResult.on_input_grid`
        maps the outputs back onto the input's own grid.
        ``keep_cache``: also keep every slice's pixel embeddings (`SliceCache`), so the masks can be
        re-decided for another gate threshold or clustering in a fraction of a second (`Redecider`).
        """
        return self.start_images(read_images(inputs, self.bundle.channels), decoder_seed, keep_cache, reorient=True)

    def start_images(self, images: dict[str, sitk.Image], decoder_seed: int = 0, keep_cache: bool = False,
                     reorient: bool = False) -> "SegmentationJob":
        """As `start`, for images already in memory (the Slicer module's volume nodes).

        ``reorient``: cut the slices along the bundle's axes (``data.orientation``): the job's arrays and
        ``result.reference`` are then on the reoriented grid and ``result.input_reference`` is the input's.
        Without it, slices are cut along the images' third voxel axis.
        """
        job = SegmentationJob(self, cases.case_from_images(images, self.cfg.data, reorient), decoder_seed, keep_cache)
        if reorient:
            job.result.input_reference = images[self.bundle.channels[0]]
        return job

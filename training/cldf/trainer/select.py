"""Choosing the departures from the paper on the validation split (never on the test split).

The grid below lists every setting the bundle may change from the paper's
values, the CAM source among them (LayerCAM, and AME-CAM and CPF-CTE when the bundle
has their networks; the slice gate is the chosen source's classifier). Decoders are trained on training-split seeds for each seed rule and
optimiser (three decoder seeds each); every clustering variant is then scored
by positive-slice Dice on the validation patients, as a mean over decoder
seeds. The winner goes into the bundle; the whole table goes into bundle.json.
Validation masks are read for scoring only: decoders still see seeds only.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import atomic, cases, cluster, metrics
from ..bundle import Bundle
from ..config import CLDFConfig, SeedConfig, apply_settings
from ..config.grids import CLUSTER_GRID, DECODER_GRID, GATE_THRESHOLDS, SELECT_TRAIN_SLICES
from ..decoder import PixelDecoder
from ..device import autocast, batch_for
from ..features import gather_at_pixels
from ..manifest import Manifest
from ..seeds import FOREGROUND, body_mask, fuse_seeds
from ..segment import Segmenter
from ..slices import from_slices
from ..variants import OWN_NETWORKS
from .slice_set import SliceSet
from .tensorstore import TensorStore

log = logging.getLogger(__name__)

# Under a time budget: the validation maps and the first grid point cost about this many batches of training maps
# (measured on 2 CPU cores: 31 s for the first batch, 33 s for the validation maps, 97 s for a grid point).
FIRST_POINT_BATCHES = 4


class ShareTooShort(RuntimeError):
    """A stage's share of the time budget cannot hold its first unit of work; the stage is left out."""

def cam_sources(bundle: Bundle) -> list[str]:
    """CAM sources to choose among: the bundle's own first (ties keep it), then AME-CAM and CPF-CTE where it has
    their networks."""
    own = bundle.config.maps.cam_method
    return list(dict.fromkeys([own, *(m for m, name in OWN_NETWORKS.items() if getattr(bundle, name) is not None)]))


@dataclass
class _Slices:
    """Per-slice maps (per CAM source) and native-resolution features of a set of slices, on the CPU."""

    x_ids: torch.Tensor
    cams: dict[str, torch.Tensor]
    presences: dict[str, torch.Tensor]
    mg: torch.Tensor
    body: torch.Tensor
    features: "_Features"  # per slice, per block (1, C_i, h_i, w_i), on disk


@dataclass
class _Rows:
    """Some rows of a (possibly disk-backed) slice array, read a batch at a time."""

    images: object  # torch.Tensor or `slicecache.DiskSlices`
    rows: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, s: slice) -> torch.Tensor:
        return self.images[self.rows[s]]


class _Features:
    """Per slice, the list of its feature blocks, kept in a `TensorStore`."""

    def __init__(self, store: TensorStore, blocks: int):
        self.store, self.blocks = store, blocks

    def append(self, block: list[torch.Tensor]) -> None:
        for f in block:
            self.store.append(f)

    def __len__(self) -> int:
        return len(self.store) // self.blocks

    def __getitem__(self, j: int) -> list[torch.Tensor]:
        return [self.store[j * self.blocks + b] for b in range(self.blocks)]


def _collect(seg: Segmenter, images, ids: torch.Tensor, desc: str, progress: bool, sources: list[str],
             store: TensorStore, seconds: float = float("inf")) -> _Slices:
    """Every source's CAM and presence; the mean gradient and the features once (these into ``store``).

    ``seconds``: no batch is started once they are used (the first always runs); ``ids`` then keeps the slices done.
    """
    cams: dict[str, list] = {m: [] for m in sources}
    presences: dict[str, list] = {m: [] for m in sources}
    mgs, bodies = [], []
    feats = _Features(store, len(seg.features.block_channels))
    t0 = time.time()
    for start in tqdm(range(0, len(images), seg.batch_size), desc=desc, disable=not progress, leave=False):
        if start and time.time() - t0 >= seconds:
            log.info("%s: %d of %d slices, the share of the time budget used", desc, start, len(images))
            ids = ids[:start]
            break
        x = images[start : start + seg.batch_size].to(seg.device)
        with autocast(seg.device):
            for m in sources:
                cam, presence = seg.cam_map(x, method=m)
                cams[m].append(cam.float().cpu())
                presences[m].append(presence.float().cpu())
            mgs.append(seg.mg(x).float().cpu())
        bodies.append(body_mask(x, seg.cfg.data.body_threshold).cpu())
        block = seg.features(x)
        for j in range(len(x)):
            feats.append([f[j : j + 1] for f in block])
    return _Slices(ids, {m: torch.cat(v) for m, v in cams.items()}, {m: torch.cat(v) for m, v in presences.items()},
                   torch.cat(mgs), torch.cat(bodies), feats)


def _val_slices(seg: Segmenter, manifest: Manifest, case_ids: list[str], target_labels, progress: bool,
                sources: list[str], store: TensorStore, seconds: float = float("inf")):
    """Validation slices with target > positive_fraction, their maps, features and ground truth."""
    cfg = seg.cfg.data
    images, ids, truths, shapes = [], [], [], []
    negatives: dict[str, list[torch.Tensor]] = {m: [] for m in sources}  # their presence only
    for cid in case_ids:
        case = manifest.case(cid)
        gt = cases.read_truth(case.mask, target_labels, cfg, cid)  # scoring only
        positive = np.nonzero(gt.mean(axis=(1, 2)) > cfg.positive_fraction)[0]
        slices = cases.read_case(case.channels, cfg).slices(cfg.resolution)
        images.append(slices[positive])
        ids.append(torch.from_numpy(positive))
        for m in sources:
            negatives[m].append(seg.presence(slices[gt.sum(axis=(1, 2)) == 0], m))
        truths += [gt[z].copy() for z in positive]  # copies: a view would keep the whole volume in memory
        shapes += [gt.shape[1:]] * len(positive)
    data = _collect(seg, torch.cat(images), torch.cat(ids), "validation maps", progress, sources, store, seconds)
    n = len(data.x_ids)
    return data, truths[:n], shapes[:n], {m: torch.cat(v) for m, v in negatives.items()}


def choose_gate(positive: torch.Tensor, negative: torch.Tensor) -> tuple[float, list[dict]]:
    """The presence threshold with the best balanced accuracy on validation slices (ties: the higher one)."""
    rows = []
    for th in GATE_THRESHOLDS:
        tpr = float((positive >= th).float().mean()) if len(positive) else 0.0
        tnr = float((negative < th).float().mean()) if len(negative) else 0.0
        rows.append({"presence_threshold": th, "sensitivity": tpr, "specificity": tnr, "balanced_accuracy": (tpr + tnr) / 2})
    best = max(rows, key=lambda r: r["balanced_accuracy"])  # first maximum: the higher threshold
    return best["presence_threshold"], rows


def select_settings(bundle: Bundle, train_set: SliceSet, manifest: Manifest, val_ids: list[str], target_labels,
                    decoder_seeds: tuple[int, ...], device: str, progress: bool = True,
                    partial: Path | None = None, seconds: float = float("inf"),
                    ) -> tuple[CLDFConfig, list[dict], list[dict]]:
    """Score the grid on the validation split; returns the best config, every row (best first) and the gate table.

    ``partial``: a JSON file keeping the rows of each finished grid point, so an interrupted selection
    resumes after the last one (the maps and features of the slices are computed again).
    Decoders are trained on at most `SELECT_TRAIN_SLICES` positive training slices (a seeded sample).
    ``seconds``: no further grid point is started once they are used (the first always runs).
    The slices' features wait on disk (`TensorStore`), so memory does not grow with them.
    """
    with tempfile.TemporaryDirectory(prefix="selection-", dir=partial.parent if partial is not None else None) as tmp, \
            TensorStore(Path(tmp) / "train.bin") as train_store, TensorStore(Path(tmp) / "val.bin") as val_store:
        return _select_settings(bundle, train_set, manifest, val_ids, target_labels, decoder_seeds, device, progress,
                                partial, seconds, train_store, val_store)


def _select_settings(bundle: Bundle, train_set: SliceSet, manifest: Manifest, val_ids: list[str], target_labels,
                     decoder_seeds: tuple[int, ...], device: str, progress: bool, partial: Path | None, seconds: float,
                     train_store: TensorStore, val_store: TensorStore) -> tuple[CLDFConfig, list[dict], list[dict]]:
    t0 = time.time()
    done = json.loads(partial.read_text()) if partial is not None and partial.is_file() else {}
    seg = Segmenter(bundle, device, batch_for(bundle.config.data.resolution))
    sources = cam_sources(bundle)
    pos = (train_set.labels == 1).nonzero()[:, 0]
    if len(pos) > SELECT_TRAIN_SLICES:
        pos = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))[:SELECT_TRAIN_SLICES]].sort().values
    # under a time budget, each set of maps takes at most a third of it and the grid points the rest
    train = _collect(seg, _Rows(train_set.images, pos), pos, "training maps", progress, sources, train_store,
                     seconds / 3)
    batch_seconds = (time.time() - t0) / max(1, -(-len(train.x_ids) // seg.batch_size))
    needed = time.time() - t0 + FIRST_POINT_BATCHES * batch_seconds
    if not done and needed > seconds:
        raise ShareTooShort(f"its share of the time budget ({seconds:.0f} s) holds no grid point: one needs about "
                            f"{needed:.0f} s")
    val, truths, shapes, negative_presence = _val_slices(seg, manifest, val_ids, target_labels, progress, sources,
                                                         val_store, seconds / 3)
    size = tuple(train_set.images.shape[-2:])
    rows, gate_rows = [], []
    combos = list(itertools.product(sources, *DECODER_GRID.values()))
    for n_done, (method, cam_threshold, (lr, momentum)) in enumerate(tqdm(combos, desc="selection", disable=not progress)):
        threshold, gates = choose_gate(val.presences[method], negative_presence[method])
        if (cam_threshold, (lr, momentum)) == (DECODER_GRID["seeds.cam_threshold"][0], DECODER_GRID["decoder.lr_momentum"][0]):
            gate_rows += [{"cam_method": method, **g} for g in gates]
        point = json.dumps([method, cam_threshold, lr, momentum])
        if rows and time.time() - t0 >= seconds:
            log.info("selection: stopped after %d of %d grid points, its share of the time budget used",
                     n_done, len(combos))
            break
        if point in done:
            rows += done[point]
            continue
        first = len(rows)
        gate = val.presences[method] >= threshold
        seed_cfg = SeedConfig(**{**bundle.config.seeds.__dict__, "cam_threshold": cam_threshold})
        noise_seed = bundle.config.maps.noise_seed
        train_seeds = fuse_seeds(train.cams[method], train.mg, train.body, seed_cfg, train.x_ids, noise_seed)
        val_seeds = fuse_seeds(val.cams[method], val.mg, val.body, seed_cfg, val.x_ids, noise_seed)
        scores: dict[tuple, list[float]] = {}
        with TensorStore(train_store.path.with_name("seeds.bin")) as store:
            feats, labels = _seed_pixels(train, train_seeds, size, store)
            for s in decoder_seeds:
                dcfg = CLDFConfig.from_dict(bundle.config.to_dict()).decoder
                dcfg.lr, dcfg.momentum, dcfg.seed = lr, momentum, s
                decoder = PixelDecoder(dcfg).fit(feats, labels, progress=False)
                for key, score in _cluster_scores(decoder, val, val_seeds, gate, truths, shapes, size, seg).items():
                    scores.setdefault(key, []).append(score)
        for key, per_seed in scores.items():
            settings = {"maps.cam_method": method, "cluster.presence_threshold": threshold,
                        "seeds.cam_threshold": cam_threshold, "decoder.lr": lr, "decoder.momentum": momentum,
                        **dict(zip(CLUSTER_GRID, key))}
            rows.append({"settings": settings, "val_dice": float(np.mean(per_seed)),
                         "val_dice_seed_std": float(np.std(per_seed))})
        if partial is not None:
            done[point] = rows[first:]
            atomic.write_json(partial, done, indent=None)
    rows.sort(key=lambda r: -r["val_dice"])  # stable: among equals the paper-first order stays
    return apply_settings(bundle.config, rows[0]["settings"]), rows, gate_rows


def _seed_pixels(data: _Slices, seeds: torch.Tensor, size, feats: TensorStore) -> tuple[TensorStore, list[torch.Tensor]]:
    """Features (into ``feats``) and labels of the seed pixels of every slice that has foreground seeds."""
    labels = []
    for j in range(len(seeds)):
        s = seeds[j].flatten()
        if not (s == FOREGROUND).any():
            continue
        pixels = s.nonzero()[:, 0]
        feats.append(gather_at_pixels(data.features[j], pixels, size))
        labels.append(s[pixels].to(torch.uint8))
    return feats, labels


def _cluster_scores(decoder: PixelDecoder, val: _Slices, seeds: torch.Tensor, gate: torch.Tensor, truths, shapes, size,
                    seg: Segmenter) -> dict[tuple, float]:
    """Mean positive-slice Dice of every clustering variant for one decoder, each made by the rule that ships.

    K-means runs once per slice and ``(k, within_body)``: `cluster.cluster_slice` keeps it in a per-slice cache.
    """
    per_slice: dict[tuple, list[float]] = {}
    variants = [dict(zip((key.split(".")[1] for key in CLUSTER_GRID), values))
                for values in itertools.product(*CLUSTER_GRID.values())]
    chans = seg.features.block_channels
    for j in range(len(truths)):
        if gate[j]:
            with torch.inference_mode():
                emb = decoder.embed(val.features[j], size, chans)[0]
        kmeans_cache: dict = {}
        for values in variants:
            score = 0.0
            if gate[j]:
                mask, _ = cluster.cluster_slice(emb, seeds[j], val.body[j], decoder.foreground_prototype_,
                                                replace(seg.cfg.cluster, **values), kmeans_cache, j)
                score = metrics.dice(from_slices(mask[None].float(), shapes[j], mode="mask")[0], truths[j])
            per_slice.setdefault(tuple(values.values()), []).append(score)
    return {key: float(np.mean(v)) for key, v in per_slice.items()}

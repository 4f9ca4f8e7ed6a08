"""Choosing the departures from the paper on the validation split (never on the test split).

The grid below lists every setting the bundle may change from the paper's
values, the CAM source among them (LayerCAM, and AME-CAM when the bundle has
its networks; the slice gate is the chosen source's classifier). Decoders are trained on training-split seeds for each seed rule and
optimiser (three decoder seeds each); every clustering variant is then scored
by positive-slice Dice on the validation patients, as a mean over decoder
seeds. The winner goes into the bundle; the whole table goes into bundle.json.
Validation masks are read for scoring only: decoders still see seeds only.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..bundle import Bundle
from ..cluster import choose_clusters, kmeans
from ..config import CLDFConfig, PostprocessConfig, SeedConfig
from ..data import Manifest, SliceSet, from_slices, normalise, read_channels, target_mask, to_slices
from ..decoder import PixelDecoder
from ..features import gather_at_pixels
from ..metrics import dice, target_slice_dice
from ..postprocess import SliceEvidence, component_sizes, components_at_least, keep_main_components, keep_slices
from ..seeds import FOREGROUND, body_mask, fuse_seeds, keep_seeded_components
from ..segment import Segmenter, autocast, batch_for, resolve_device, seed_references
from .tensorstore import TensorStore

log = logging.getLogger(__name__)

# The paper's value first in every list: ties keep the paper's setting.
DECODER_GRID = {
    "seeds.cam_threshold": ["otsu", 0.5],
    "decoder.lr_momentum": [(1.0, 0.0), (0.1, 0.9)],
}
# Slice gate: chosen first, by balanced accuracy of present / absent on validation slices
# (positive-slice Dice alone would always prefer no gate at all).
GATE_THRESHOLDS = [0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]
SELECT_TRAIN_SLICES = 512  # positive training slices the selection's decoders train on, at most
CLUSTER_GRID = {
    "cluster.k": [2, 3, 5],
    "cluster.within_body": [False, True],
    "cluster.rule": ["nearest", "closer_than_background"],
    "cluster.seeded_components": [False, True],
}


def cam_sources(bundle: Bundle) -> list[str]:
    """CAM sources to choose among: the bundle's own first (ties keep it), AME-CAM when it has the networks."""
    own = bundle.config.maps.cam_method
    return list(dict.fromkeys([own, *(["ame-cam"] if bundle.ame_cam is not None else [])]))


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
             store: TensorStore) -> _Slices:
    """Every source's CAM and presence; the mean gradient and the features once (these into ``store``)."""
    cams: dict[str, list] = {m: [] for m in sources}
    presences: dict[str, list] = {m: [] for m in sources}
    mgs, bodies = [], []
    feats = _Features(store, len(seg.features.block_channels))
    for start in tqdm(range(0, len(images), seg.batch_size), desc=desc, disable=not progress, leave=False):
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
                sources: list[str], store: TensorStore):
    """Validation slices with target > positive_fraction, their maps, features and ground truth."""
    cfg = seg.cfg.data
    images, ids, truths, shapes = [], [], [], []
    negatives: dict[str, list[torch.Tensor]] = {m: [] for m in sources}  # their presence only
    for cid in case_ids:
        case = manifest.case(cid)
        volume, _ = read_channels({k: v for k, v in case.channels.items() if k in cfg.channels}, list(cfg.channels),
                                  cfg.orientation)
        gt = target_mask(case.mask, target_labels, cfg.orientation)
        positive = np.nonzero(gt.mean(axis=(1, 2)) > cfg.positive_fraction)[0]
        slices = to_slices(normalise(volume, tuple(cfg.percentiles)), cfg.resolution)
        images.append(slices[positive])
        ids.append(torch.from_numpy(positive))
        for m in sources:
            negatives[m].append(seg.presence(slices[gt.sum(axis=(1, 2)) == 0], m))
        truths += [gt[z].copy() for z in positive]  # copies: a view would keep the whole volume in memory
        shapes += [gt.shape[1:]] * len(positive)
    data = _collect(seg, torch.cat(images), torch.cat(ids), "validation maps", progress, sources, store)
    return data, truths, shapes, {m: torch.cat(v) for m, v in negatives.items()}


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
    train = _collect(seg, _Rows(train_set.images, pos), pos, "training maps", progress, sources, train_store)
    val, truths, shapes, negative_presence = _val_slices(seg, manifest, val_ids, target_labels, progress, sources,
                                                         val_store)
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
            tmp = partial.with_name(partial.name + ".tmp")
            tmp.write_text(json.dumps(done))
            os.replace(tmp, partial)
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
    """Mean positive-slice Dice of every clustering variant for one decoder."""
    per_slice: dict[tuple, list[float]] = {}
    chans = seg.features.block_channels
    for j in range(len(truths)):
        if not gate[j]:
            for key in itertools.product(*CLUSTER_GRID.values()):
                per_slice.setdefault(key, []).append(0.0)
            continue
        with torch.inference_mode():
            emb = decoder.embed(val.features[j], size, chans)[0]
        e = emb.flatten(1).T
        ref_fg, ref_bg, fg = seed_references(e, seeds[j].flatten(), decoder.foreground_prototype_)
        for k, within_body in itertools.product(*list(CLUSTER_GRID.values())[:2]):
            pixels = val.body[j].flatten() if within_body else torch.ones(len(e), dtype=torch.bool)
            labels, centers = kmeans(e[pixels].numpy(), k, seg.cfg.cluster.seed)
            for rule, components in itertools.product(*list(CLUSTER_GRID.values())[2:]):
                mask = torch.zeros(len(e), dtype=torch.bool)
                if centers is not None:
                    chosen = np.isin(labels, choose_clusters(centers, ref_fg, ref_bg, rule))
                    mask[pixels.nonzero()[:, 0][torch.from_numpy(chosen)]] = True
                mask = mask.view(size)
                if components and fg.any():
                    mask = keep_seeded_components(mask, fg.view(size))
                pred = from_slices(mask[None].float(), shapes[j], mode="mask")[0]
                g = truths[j]
                per_slice.setdefault((k, within_body, rule, components), []).append(dice(pred, g))
    return {key: float(np.mean(v)) for key, v in per_slice.items()}


def apply_settings(config: CLDFConfig, settings: dict) -> CLDFConfig:
    out = CLDFConfig.from_dict(config.to_dict())
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    return out


# --------------------------------------------------------------------------- post-processing
# Chosen after everything else, on whole validation volumes: a mask that may be empty and one 3D object
# are judged by the per-case 3D Dice (false positives on slices without target count), the product's
# measure of a volume. "Off" first in every list: ties keep the plain pipeline.
POSTPROCESS_GRID = {
    "postprocess.min_similarity": [-1.0, 0.0, 0.25, 0.5, 0.75],
    "postprocess.require_seeds": [False, True],
    "postprocess.min_presence": [0.0, 0.1, 0.3, 0.5],
    "postprocess.min_component_fraction": [0.0, 0.1, 0.25, 0.5, 1.0],
}


@dataclass
class _ValVolume:
    """One validation case: ground truth and, per decoder seed, raw masks on its grid and their evidence."""

    truth: np.ndarray  # (Z, Y, X) bool
    masks: dict[int, np.ndarray]  # (Z, Y, X) bool, before the post-processing rules
    evidence: dict[int, SliceEvidence]
    image: np.ndarray  # (Z, Y, X) the refinement channel, normalised, as `SegmentationJob` gives the refiner
    spacing: tuple[float, float]  # (row, column) mm


def _val_volume(seg: Segmenter, manifest: Manifest, cid: str, target_labels, seeds: tuple[int, ...],
                cache: Path | None = None) -> _ValVolume:
    """One validation volume through the networks (or from ``cache``, where an interrupted run left it)."""
    cfg = seg.cfg.data
    case = manifest.case(cid)
    volume, ref = read_channels({k: v for k, v in case.channels.items() if k in cfg.channels}, list(cfg.channels),
                                cfg.orientation)
    truth = target_mask(case.mask, target_labels, cfg.orientation)
    normalised = normalise(volume, tuple(cfg.percentiles))
    channel = seg.cfg.refine.channel or cfg.channels[0]
    image, spacing = normalised[list(cfg.channels).index(channel)], (ref.GetSpacing()[1], ref.GetSpacing()[0])
    stored = cache / f"{cid}.safetensors" if cache is not None else None
    if stored is not None and stored.is_file():  # the networks' part, saved when this volume was done before
        t = load_file(str(stored))
        return _ValVolume(truth, {s: t[f"mask.{s}"].numpy().astype(bool) for s in seeds},
                          {s: SliceEvidence(*(t[f"{f}.{s}"] for f in EVIDENCE)) for s in seeds}, image, spacing)
    slices = to_slices(normalised, cfg.resolution)
    masks = {s: np.zeros(truth.shape, bool) for s in seeds}
    parts: dict[int, list[SliceEvidence]] = {s: [] for s in seeds}
    for start in range(0, len(slices), seg.batch_size):
        stop = min(start + seg.batch_size, len(slices))
        x = slices[start:stop].to(seg.device)
        maps = seg.slice_maps(x, torch.arange(start, stop))
        batch_masks, evidence = seg.masks_with_evidence(x, maps, seeds, per_slice_rule=False)
        for s in seeds:
            masks[s][start:stop] = from_slices(batch_masks[s], truth.shape[1:], mode="mask")
            parts[s].append(evidence[s])
    joined = {s: SliceEvidence(*(torch.cat([getattr(e, f) for e in parts[s]]) for f in EVIDENCE)) for s in seeds}
    if stored is not None:
        _save({**{f"mask.{s}": torch.from_numpy(masks[s].astype(np.uint8)) for s in seeds},
               **{f"{f}.{s}": getattr(joined[s], f).cpu() for s in seeds for f in EVIDENCE}}, stored)
    return _ValVolume(truth, masks, joined, image, spacing)


EVIDENCE = ("similarity", "foreground_seeds", "presence")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _slice_rule(volume: _ValVolume, seed: int, cfg: PostprocessConfig) -> np.ndarray:
    mask = volume.masks[seed].copy()
    mask[~keep_slices(volume.evidence[seed], cfg).numpy()] = False
    return mask


def select_postprocess(bundle: Bundle, manifest: Manifest, val_ids: list[str], target_labels,
                       decoder_seeds: tuple[int, ...], device: str, progress: bool = True,
                       refine: bool = False, cache: Path | None = None, seconds: float = float("inf"),
                       ) -> tuple[dict, list[dict], list[dict]]:
    """Score `POSTPROCESS_GRID` on whole validation volumes, then (with ``refine``) SAM refinement on or off.

    Returns the chosen settings (``postprocess.*`` and, with ``refine``, ``refine.method``), the
    post-processing rows and the refinement rows (best first). Ground truth is read here for scoring only.
    ``cache``: a folder keeping each finished volume's masks (and refined masks), so an interrupted
    selection resumes after the last finished volume. ``seconds``: no further volume is started once
    they are used (the first always runs), and refinement is then not weighed.
    """
    t0 = time.time()
    seg = Segmenter(bundle, device, batch_for(bundle.config.data.resolution), refine="none")
    *slice_keys, fraction_key = POSTPROCESS_GRID
    rules = list(itertools.product(*(POSTPROCESS_GRID[k] for k in slice_keys)))
    dice_3d: dict[tuple, list[float]] = {}  # per (rule, fraction): one entry per volume and decoder seed
    dice_slices: dict[tuple, list[float]] = {}
    done: list[str] = []
    with tempfile.TemporaryDirectory(prefix="postprocess-") as tmp:
        cache = cache or Path(tmp)  # volumes are visited one at a time, and again from here for the refinement
        for cid in tqdm(val_ids, desc="validation volumes", disable=not progress, leave=False):
            if done and time.time() - t0 >= seconds:
                log.info("post-processing chosen on %d of %d validation volumes, the time budget's share used",
                         len(done), len(val_ids))
                break
            volume = _val_volume(seg, manifest, cid, target_labels, decoder_seeds, cache)
            _score_rules(volume, rules, slice_keys, POSTPROCESS_GRID[fraction_key], decoder_seeds, dice_3d, dice_slices)
            done.append(cid)
        rows = [{"settings": {**dict(zip(slice_keys, values)), fraction_key: fraction},
                 **_scores({"3d": dice_3d[values, fraction], "slices": dice_slices[values, fraction]})}
                for values in rules for fraction in POSTPROCESS_GRID[fraction_key]]
        rows.sort(key=lambda r: -r["val_dice_3d"])  # stable: among equals "off" stays first
        chosen = dict(rows[0]["settings"])
        rule = PostprocessConfig(**{k.split(".")[1]: v for k, v in chosen.items()})
        refine_rows = []
        if refine and time.time() - t0 < seconds:
            volumes = (_val_volume(seg, manifest, cid, target_labels, decoder_seeds, cache) for cid in done)
            refine_rows = select_refine(bundle, volumes, rule, decoder_seeds, device, progress,
                                        [cache / f"{cid}.refined.safetensors" for cid in done], len(done))
    if refine_rows:
        chosen |= refine_rows[0]["settings"]
    return chosen, rows, refine_rows


def _score_rules(volume: _ValVolume, rules: list[tuple], slice_keys: list[str], fractions: list[float],
                 decoder_seeds: tuple[int, ...], dice_3d: dict, dice_slices: dict) -> None:
    """Add one volume's per-case 3D Dice and any-target slice Dice under every rule (and decoder seed)."""
    for values in rules:
        cfg = PostprocessConfig(**{k.split(".")[1]: v for k, v in zip(slice_keys, values)})
        for s in decoder_seeds:  # the 3D components once per slice rule; every fraction then only picks among them
            labels, sizes = component_sizes(_slice_rule(volume, s, cfg))
            for fraction in fractions:
                pred = components_at_least(labels, sizes, fraction) if fraction > 0 else labels > 0
                dice_3d.setdefault((values, fraction), []).append(dice(pred, volume.truth))
                dice_slices.setdefault((values, fraction), []).extend(target_slice_dice(pred, volume.truth))


def _scores(scores: dict[str, list[float]]) -> dict[str, float]:
    """Mean per-case 3D Dice and any-target slice Dice of the collected per-volume and per-slice values."""
    return {"val_dice_3d": float(np.mean(scores["3d"])),
            "val_any_target_slice_dice": float(np.mean(scores["slices"])) if scores["slices"] else float("nan")}


def select_refine(bundle: Bundle, volumes: Iterable[_ValVolume], rule: PostprocessConfig, decoder_seeds: tuple[int, ...],
                  device: str, progress: bool = True, cache: list[Path] | None = None, total: int | None = None,
                  ) -> list[dict]:
    """Masks under the chosen rule without and with LiteMedSAM refinement, as `cldf segment` makes them; best first.

    Ties keep "none" (refinement costs seconds per slice).
    """
    from ..refine import SamRefiner  # loads timm: only when refinement is weighed

    refiner = SamRefiner(replace(bundle.config.refine, method="sam"), resolve_device(device))
    plain: dict[str, list[float]] = {"3d": [], "slices": []}
    sharp: dict[str, list[float]] = {"3d": [], "slices": []}
    for i, v in enumerate(tqdm(volumes, desc="refinement", total=total, disable=not progress, leave=False)):
        coarse = [_slice_rule(v, s, rule) for s in decoder_seeds]
        stored = cache[i] if cache is not None else None
        if stored is not None and stored.is_file():
            refined = [m.numpy().astype(bool) for _, m in sorted(load_file(str(stored)).items())]
        else:
            refined = refiner.refine_many(v.image, coarse, v.spacing)
            if stored is not None:
                _save({f"{j:03d}": torch.from_numpy(np.asarray(m, np.uint8)) for j, m in enumerate(refined)}, stored)
        for masks, scores in ((coarse, plain), (refined, sharp)):
            for m in masks:
                pred = keep_main_components(m, rule.min_component_fraction)
                scores["3d"].append(dice(pred, v.truth))
                scores["slices"] += target_slice_dice(pred, v.truth)
    rows = [{"settings": {"refine.method": "none"}, **_scores(plain)},
            {"settings": {"refine.method": "sam"}, **_scores(sharp)}]
    return sorted(rows, key=lambda r: -r["val_dice_3d"])

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
import os
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
from ..postprocess import SliceEvidence, component_sizes, components_at_least, keep_main_components, keep_slices
from ..seeds import FOREGROUND, body_mask, fuse_seeds, keep_seeded_components
from ..segment import Segmenter, autocast, resolve_device, seed_references

# The paper's value first in every list: ties keep the paper's setting.
DECODER_GRID = {
    "seeds.cam_threshold": ["otsu", 0.5],
    "decoder.lr_momentum": [(1.0, 0.0), (0.1, 0.9)],
}
# Slice gate: chosen first, by balanced accuracy of present / absent on validation slices
# (positive-slice Dice alone would always prefer no gate at all).
GATE_THRESHOLDS = [0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]
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
    features: list[list[torch.Tensor]]  # per slice, per block (1, C_i, h_i, w_i)


def _collect(seg: Segmenter, images: torch.Tensor, ids: torch.Tensor, batch: int, desc: str, progress: bool,
             sources: list[str]) -> _Slices:
    """Every source's CAM and presence; the mean gradient and the features once."""
    cams: dict[str, list] = {m: [] for m in sources}
    presences: dict[str, list] = {m: [] for m in sources}
    mgs, bodies, feats = [], [], []
    for start in tqdm(range(0, len(images), batch), desc=desc, disable=not progress, leave=False):
        x = images[start : start + batch].to(seg.device)
        with autocast(seg.device):
            for m in sources:
                cam, presence = seg.cam_map(x, method=m)
                cams[m].append(cam.float().cpu())
                presences[m].append(presence.float().cpu())
            mgs.append(seg.mg(x).float().cpu())
        bodies.append(body_mask(x, seg.cfg.data.body_threshold).cpu())
        block = [f.cpu() for f in seg.features(x)]
        feats += [[f[j : j + 1] for f in block] for j in range(len(x))]
    return _Slices(ids, {m: torch.cat(v) for m, v in cams.items()}, {m: torch.cat(v) for m, v in presences.items()},
                   torch.cat(mgs), torch.cat(bodies), feats)


def _val_slices(seg: Segmenter, manifest: Manifest, case_ids: list[str], target_labels, progress: bool,
                sources: list[str]):
    """Validation slices with target > positive_fraction, their maps, features and ground truth."""
    cfg = seg.cfg.data
    images, ids, truths, shapes, negatives = [], [], [], [], []
    for cid in case_ids:
        case = manifest.case(cid)
        volume, _ = read_channels({k: v for k, v in case.channels.items() if k in cfg.channels}, list(cfg.channels),
                                  cfg.orientation)
        gt = target_mask(case.mask, target_labels, cfg.orientation)
        positive = np.nonzero(gt.mean(axis=(1, 2)) > cfg.positive_fraction)[0]
        slices = to_slices(normalise(volume, tuple(cfg.percentiles)), cfg.resolution)
        images.append(slices[positive])
        ids.append(torch.from_numpy(positive))
        negatives.append(slices[gt.sum(axis=(1, 2)) == 0])
        truths += [gt[z] for z in positive]
        shapes += [gt.shape[1:]] * len(positive)
    data = _collect(seg, torch.cat(images), torch.cat(ids), 8, "validation maps", progress, sources)
    negative = torch.cat(negatives)
    return data, truths, shapes, {m: seg.presence(negative, m) for m in sources}


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
                    partial: Path | None = None) -> tuple[CLDFConfig, list[dict], list[dict]]:
    """Score the grid on the validation split; returns the best config, every row (best first) and the gate table.

    ``partial``: a JSON file keeping the rows of each finished grid point, so an interrupted selection
    resumes after the last one (the maps and features of the slices are computed again).
    """
    done = json.loads(partial.read_text()) if partial is not None and partial.is_file() else {}
    seg = Segmenter(bundle, device, 8)
    sources = cam_sources(bundle)
    pos = (train_set.labels == 1).nonzero()[:, 0]
    train = _collect(seg, train_set.images[pos], pos, 8, "training maps", progress, sources)
    val, truths, shapes, negative_presence = _val_slices(seg, manifest, val_ids, target_labels, progress, sources)
    size = tuple(train_set.images.shape[-2:])
    rows, gate_rows = [], []
    combos = list(itertools.product(sources, *DECODER_GRID.values()))
    for method, cam_threshold, (lr, momentum) in tqdm(combos, desc="selection", disable=not progress):
        threshold, gates = choose_gate(val.presences[method], negative_presence[method])
        if (cam_threshold, (lr, momentum)) == (DECODER_GRID["seeds.cam_threshold"][0], DECODER_GRID["decoder.lr_momentum"][0]):
            gate_rows += [{"cam_method": method, **g} for g in gates]
        point = json.dumps([method, cam_threshold, lr, momentum])
        if point in done:
            rows += done[point]
            continue
        first = len(rows)
        gate = val.presences[method] >= threshold
        seed_cfg = SeedConfig(**{**bundle.config.seeds.__dict__, "cam_threshold": cam_threshold})
        noise_seed = bundle.config.maps.noise_seed
        train_seeds = fuse_seeds(train.cams[method], train.mg, train.body, seed_cfg, train.x_ids, noise_seed)
        feats, labels = _seed_pixels(train, train_seeds, size)
        val_seeds = fuse_seeds(val.cams[method], val.mg, val.body, seed_cfg, val.x_ids, noise_seed)
        scores: dict[tuple, list[float]] = {}
        for s in decoder_seeds:
            dcfg = CLDFConfig.from_dict(bundle.config.to_dict()).decoder
            dcfg.lr, dcfg.momentum, dcfg.seed = lr, momentum, s
            decoder = PixelDecoder(dcfg).fit(feats, labels, progress=False)
            for key, dice in _cluster_scores(decoder, val, val_seeds, gate, truths, shapes, size, seg).items():
                scores.setdefault(key, []).append(dice)
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


def _seed_pixels(data: _Slices, seeds: torch.Tensor, size) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    feats, labels = [], []
    for j in range(len(seeds)):
        s = seeds[j].flatten()
        if not (s == FOREGROUND).any():
            continue
        pixels = s.nonzero()[:, 0]
        feats.append(gather_at_pixels(data.features[j], pixels, size))
        labels.append(s[pixels].long())
    return feats, labels


def _cluster_scores(decoder: PixelDecoder, val: _Slices, seeds: torch.Tensor, gate: torch.Tensor, truths, shapes, size,
                    seg: Segmenter) -> dict[tuple, float]:
    """Mean positive-slice Dice of every clustering variant for one decoder."""
    dice: dict[tuple, list[float]] = {}
    chans = seg.features.block_channels
    for j in range(len(truths)):
        if not gate[j]:
            for key in itertools.product(*CLUSTER_GRID.values()):
                dice.setdefault(key, []).append(0.0)
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
                dice.setdefault((k, within_body, rule, components), []).append(2 * float((pred & g).sum()) / float(pred.sum() + g.sum()))
    return {key: float(np.mean(v)) for key, v in dice.items()}


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


def _any_target_dice(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    """Dice on every slice that holds any target (the independent scorer's protocol)."""
    out = []
    for z in np.nonzero(truth.any(axis=(1, 2)))[0]:
        out.append(2 * float((pred[z] & truth[z]).sum()) / float(pred[z].sum() + truth[z].sum()))
    return out


def _volume_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else 2 * float((pred & truth).sum()) / float(total)


def select_postprocess(bundle: Bundle, manifest: Manifest, val_ids: list[str], target_labels,
                       decoder_seeds: tuple[int, ...], device: str, progress: bool = True,
                       refine: bool = False, cache: Path | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Score `POSTPROCESS_GRID` on whole validation volumes, then (with ``refine``) SAM refinement on or off.

    Returns the chosen settings (``postprocess.*`` and, with ``refine``, ``refine.method``), the
    post-processing rows and the refinement rows (best first). Ground truth is read here for scoring only.
    ``cache``: a folder keeping each finished volume's masks (and refined masks), so an interrupted
    selection resumes after the last finished volume.
    """
    seg = Segmenter(bundle, device, 8, refine="none")
    volumes = [_val_volume(seg, manifest, cid, target_labels, decoder_seeds, cache)
               for cid in tqdm(val_ids, desc="validation volumes", disable=not progress, leave=False)]
    *slice_keys, fraction_key = POSTPROCESS_GRID
    rows = []
    for values in tqdm(list(itertools.product(*(POSTPROCESS_GRID[k] for k in slice_keys))), desc="post-processing",
                       disable=not progress, leave=False):
        cfg = PostprocessConfig(**{k.split(".")[1]: v for k, v in zip(slice_keys, values)})
        # the 3D components of each volume once per slice rule; every fraction then only picks among them
        components = [(v.truth, component_sizes(_slice_rule(v, s, cfg))) for v in volumes for s in decoder_seeds]
        for fraction in POSTPROCESS_GRID[fraction_key]:
            preds = [(components_at_least(labels, sizes, fraction) if fraction > 0 else labels > 0, truth)
                     for truth, (labels, sizes) in components]
            rows.append({"settings": {**dict(zip(slice_keys, values)), fraction_key: fraction}, **_scores(preds)})
    rows.sort(key=lambda r: -r["val_dice_3d"])  # stable: among equals "off" stays first
    chosen = dict(rows[0]["settings"])
    rule = PostprocessConfig(**{k.split(".")[1]: v for k, v in chosen.items()})
    refine_rows = select_refine(bundle, volumes, rule, decoder_seeds, device, progress,
                                [cache / f"{cid}.refined.safetensors" for cid in val_ids] if cache else None) \
        if refine else []
    if refine_rows:
        chosen |= refine_rows[0]["settings"]
    return chosen, rows, refine_rows


def _scores(preds: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean per-case 3D Dice and any-target slice Dice of (prediction, truth) volume pairs."""
    slice_dice = [d for pred, truth in preds for d in _any_target_dice(pred, truth)]
    return {"val_dice_3d": float(np.mean([_volume_dice(pred, truth) for pred, truth in preds])),
            "val_any_target_slice_dice": float(np.mean(slice_dice)) if slice_dice else float("nan")}


def select_refine(bundle: Bundle, volumes: list[_ValVolume], rule: PostprocessConfig, decoder_seeds: tuple[int, ...],
                  device: str, progress: bool = True, cache: list[Path] | None = None) -> list[dict]:
    """Masks under the chosen rule without and with LiteMedSAM refinement, as `cldf segment` makes them; best first.

    Ties keep "none" (refinement costs seconds per slice).
    """
    from ..refine import SamRefiner  # loads timm: only when refinement is weighed

    refiner = SamRefiner(replace(bundle.config.refine, method="sam"), resolve_device(device))
    plain, sharp = [], []
    for i, v in enumerate(tqdm(volumes, desc="refinement", disable=not progress, leave=False)):
        coarse = [_slice_rule(v, s, rule) for s in decoder_seeds]
        stored = cache[i] if cache is not None else None
        if stored is not None and stored.is_file():
            refined = [m.numpy().astype(bool) for _, m in sorted(load_file(str(stored)).items())]
        else:
            refined = refiner.refine_many(v.image, coarse, v.spacing)
            if stored is not None:
                _save({f"{j:03d}": torch.from_numpy(np.asarray(m, np.uint8)) for j, m in enumerate(refined)}, stored)
        plain += [(keep_main_components(m, rule.min_component_fraction), v.truth) for m in coarse]
        sharp += [(keep_main_components(m, rule.min_component_fraction), v.truth) for m in refined]
    rows = [{"settings": {"refine.method": "none"}, **_scores(plain)},
            {"settings": {"refine.method": "sam"}, **_scores(sharp)}]
    return sorted(rows, key=lambda r: -r["val_dice_3d"])

"""Choices made on whole validation volumes: the post-processing rule and LiteMedSAM refinement.

Run after `select` has chosen the slice-level settings. Validation masks are read for scoring only.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .. import cases, metrics
from ..bundle import Bundle, write_safetensors
from ..config import PostprocessConfig
from ..config.grids import POSTPROCESS_GRID
from ..device import batch_for, resolve_device
from ..manifest import Manifest
from ..postprocess import SliceEvidence, component_sizes, components_at_least, keep_main_components, keep_slices
from ..segment import Segmenter
from ..slices import from_slices

log = logging.getLogger(__name__)

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
    read = cases.read_case(case.channels, cfg)
    truth = cases.read_truth(case.mask, target_labels, cfg, cid)  # scoring only
    channel = seg.cfg.refine.channel or cfg.channels[0]
    image, spacing = read.normalised[list(cfg.channels).index(channel)], read.in_plane_spacing
    stored = cache / f"{cid}.safetensors" if cache is not None else None
    if stored is not None and stored.is_file():  # the networks' part, saved when this volume was done before
        t = load_file(str(stored))
        return _ValVolume(truth, {s: t[f"mask.{s}"].numpy().astype(bool) for s in seeds},
                          {s: SliceEvidence(*(t[f"{f}.{s}"] for f in EVIDENCE)) for s in seeds}, image, spacing)
    slices = read.slices(cfg.resolution)
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
    write_safetensors({k: v.contiguous() for k, v in tensors.items()}, path)


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
                dice_3d.setdefault((values, fraction), []).append(metrics.dice(pred, volume.truth))
                dice_slices.setdefault((values, fraction), []).extend(metrics.target_slice_dice(pred, volume.truth))


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
                scores["3d"].append(metrics.dice(pred, v.truth))
                scores["slices"] += metrics.target_slice_dice(pred, v.truth)
    rows = [{"settings": {"refine.method": "none"}, **_scores(plain)},
            {"settings": {"refine.method": "sam"}, **_scores(sharp)}]
    return sorted(rows, key=lambda r: -r["val_dice_3d"])

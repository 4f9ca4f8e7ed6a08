"""Pixel decoders (CLDF Sec. 2.4): seeds from the maps, diffusion features at the seeds, contrastive training.

One decoder per variant (`variants.VARIANTS`) and seed. `cldf train` trains them after the networks;
`add_decoders` (`cldf ablate`) adds the variants an older bundle lacks. Only slice labels reach this
module; masks never do.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..bundle import Bundle, load_bundle, replace_decoders
from ..config import CLDFConfig
from ..decoder import PixelDecoder
from ..defaults import DEVICE
from ..device import batch_for, device_name, resolve_device
from ..features import gather_at_pixels
from ..manifest import load_manifest
from ..segment import Segmenter
from ..variants import VARIANTS, bundle_variants
from .slice_set import SliceSet
from .slicecache import cached_slice_set
from .tensorstore import TensorStore

log = logging.getLogger(__name__)

# Under a time budget the seeds and their features take this share of the decoders' seconds; the decoders'
# training shares the rest.
SEED_FEATURE_SHARE = 0.5


def seed_features(bundle: Bundle, data: SliceSet, device: torch.device, variants: list[str], store_dir: Path,
                  batch: int | None = None, progress: bool = True, cam_images=None, seconds: float = float("inf"),
                  ) -> tuple[dict[str, TensorStore], dict[str, TensorStore], int]:
    """Diffusion features at the seed pixels of every positive slice, for each decoder variant.

    The maps are computed once; each variant takes its seeds from them (`variants.VARIANTS`)
    and its features from its CDM. ``cam_images``: ``data``'s slices at the CAM source's own
    resolution (`Segmenter.cam_resolution`), same order, when it has one. Features go to a
    `TensorStore` per variant in ``store_dir``, their labels too (the caller closes them), so memory
    holds one batch.
    With a time limit (``seconds``), the positive slices are visited in a seeded random order and
    collection stops once it is used and every variant has seeds.

    Returns:
        per variant the stores of ``(P_i, D)`` features and of ``(P_i,)`` seed labels, and the
        number of positive slices visited.
    """
    batch = batch or batch_for(bundle.config.data.resolution)
    segs = {v: Segmenter(bundle, str(device), batch, variant=v) for v in variants}
    by_cdm: dict[str, Segmenter] = {}
    for v in variants:
        by_cdm.setdefault(VARIANTS[v].features, segs[v])
    first = segs[variants[0]]
    pos = (data.labels == 1).nonzero()[:, 0]
    if seconds < float("inf"):
        pos = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(bundle.config.decoder.seed))]
    feats = {v: TensorStore(store_dir / f"seed-features.{v}.bin") for v in variants}
    labels = {v: TensorStore(store_dir / f"seed-labels.{v}.bin") for v in variants}
    size = (data.images.shape[-2], data.images.shape[-1])
    t0, visited = time.time(), 0
    for start in tqdm(range(0, len(pos), batch), desc="seeds + features", disable=not progress, leave=False):
        if time.time() - t0 >= seconds and all(len(labels[v]) for v in variants):  # every variant has seeds
            log.info("decoders: seeds of %d of %d positive slices, the stage's share of the time budget used",
                     start, len(pos))
            break
        idx = pos[start : start + batch]
        visited += len(idx)
        x = data.images[idx].to(device)
        maps = first.slice_maps(x, idx, gate=False, x_cam=None if cam_images is None else cam_images[idx].to(device),
                                cam_sources=tuple(seg.cam_source for seg in segs.values()))
        block = {c: seg.features(x) for c, seg in by_cdm.items()}
        for v in variants:
            seeds = segs[v].seeds(maps, idx, gate=False)
            for j in range(len(idx)):
                s = seeds[j].flatten().cpu()
                if not (s == 1).any():
                    continue
                pixels = s.nonzero()[:, 0]
                labels[v].append(s[pixels])
                f = [b[j : j + 1] for b in block[VARIANTS[v].features]]
                feats[v].append(gather_at_pixels(f, pixels.to(x.device), size))
    return feats, labels, visited


def fit_decoders(bundle: Bundle, data: SliceSet, device, variants: list[str], decoder_seeds: tuple[int, ...],
                 done: dict[str, torch.Tensor], save: Callable[[dict[str, torch.Tensor]], None], store_dir: Path,
                 progress: bool = True, cam_images=None, seconds: float = float("inf")):
    """One decoder per (variant, seed), reusing those already in ``done`` and calling ``save`` after each new one.

    ``seconds``: the whole stage's time (seeds, features and every decoder's training), after which each decoder
    still to train stops at a batch boundary (the card's ``epochs`` says where).

    Returns:
        the decoders by variant and seed, and a card of seed counts and final losses.
    """
    cfg = bundle.config
    deadline = time.monotonic() + seconds
    feats, labels, visited = seed_features(bundle, data, device, variants, store_dir, progress=progress,
                                           cam_images=cam_images, seconds=seconds * SEED_FEATURE_SHARE)
    try:
        empty = [v for v in variants if not len(labels[v])]
        if empty:
            raise ValueError(f"no positive training slice produced foreground seeds for {empty}: "
                             "check the slice labels and maps")
        decoders: dict[str, dict[int, PixelDecoder]] = {v: {} for v in variants}
        card = {"seed_slices": {v: len(labels[v]) for v in variants},
                "foreground_seeds": {v: int(sum((lab == 1).sum() for lab in labels[v])) for v in variants},
                "background_seeds": {v: int(sum((lab == 2).sum() for lab in labels[v])) for v in variants},
                "final_loss": {}, "epochs": {},
                **({"positive_slices_visited": visited} if visited < int((data.labels == 1).sum()) else {})}
        to_train = sum(not any(k.startswith(f"{v}.{s}.") for k in done) for v in variants for s in decoder_seeds)
        for v in variants:
            for s in decoder_seeds:
                prefix = f"{v}.{s}."
                dcfg = CLDFConfig.from_dict(cfg.to_dict()).decoder
                dcfg.seed = s
                if any(k.startswith(prefix) for k in done):
                    d = PixelDecoder(dcfg).load_state_dict({k[len(prefix):]: t for k, t in done.items()
                                                            if k.startswith(prefix)})
                else:
                    share = max(0.0, deadline - time.monotonic()) / to_train
                    d = PixelDecoder(dcfg).fit(feats[v], labels[v], progress=progress, seconds=share)
                    to_train -= 1
                    card["final_loss"][f"{v}.{s}"] = round(d.loss_history_[-1], 4) if d.loss_history_ else None
                    card["epochs"][f"{v}.{s}"] = round(d.epochs_, 2)
                    done.update({f"{prefix}{k}": t for k, t in d.state_dict().items()})
                    save(done)
                decoders[v][s] = d
    finally:
        for store in [*feats.values(), *labels.values()]:
            store.close()
    return decoders, card


def add_decoders(bundle_dir: Path, manifest_path: Path, device: str = DEVICE, command: str = "",
                 progress: bool = True) -> list[str]:
    """Train the decoder variants a bundle lacks (bundles made before the ablations) into it.

    Uses the bundle's recorded training split, target labels and settings, so the
    decoders are the ones `cldf train` makes today. Returns the variants added.
    """
    bundle = load_bundle(bundle_dir)
    missing = [v for v in bundle_variants(bundle) if v not in bundle.decoders]
    if not missing:
        return []
    cfg, card = bundle.config, bundle.card
    manifest = load_manifest(manifest_path)
    train_ids = card.get("training", {}).get("split", {}).get("train")
    if not train_ids:
        raise ValueError(f"{bundle_dir}/bundle.json records no training split; retrain the bundle with `cldf train`")
    data = cached_slice_set(manifest, train_ids, cfg.data.channels, cfg.data.resolution, tuple(cfg.data.percentiles),
                          card.get("task", {}).get("mask_labels"), cfg.data.positive_fraction, cfg.data.orientation,
                          ct_window=cfg.data.ct_window)
    dev = resolve_device(device)
    t0 = time.time()
    seeds = tuple(sorted(bundle.decoders["cdm"]))
    bundle.decoders |= {v: {} for v in missing}  # filled below
    with tempfile.TemporaryDirectory(prefix="cldf-seeds-") as store:
        new, new_card = fit_decoders(bundle, data, dev, missing, seeds, {}, lambda state: None, Path(store), progress)
    entry = {"variants": missing, "command": command, "device": device_name(dev),
             "wall_clock_s": round(time.time() - t0, 1), **new_card}
    replace_decoders(bundle_dir, {**bundle.decoders, **new}, added_decoders=entry)
    return missing


def safe_open_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}

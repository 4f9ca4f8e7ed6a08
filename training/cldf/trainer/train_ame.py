"""AME-CAM stages of `cldf train`: the multi-exit classifier, then its attention aggregator.

Both are resumable exactly like the other network stages (`stages.fit`: checkpoints
in the run's checkpoint folder at least every ``checkpoint_every_s`` and at the end of
each chunk, per-step seeded randomness):

a. ``ame_classifier``: ``sum_k w_k BCE(logit_k, y)`` on balanced batches with the
   CAM classifier's augmentation. Every ``eval_every`` steps the last exit's AUC on
   the validation patients' slice labels is computed; the weights with the best AUC
   are kept (without validation patients, the last ones).
b. ``ame_aggregator``: the classifier frozen, the aggregation net trained with the
   region-contrastive loss on positive training slices.

Only slice labels reach this module (`slice_set.SliceSet`), as in `train`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from .. import atomic
from ..ame_cam import AmeCam, multi_exit_loss, region_contrastive_loss, upsample
from ..bundle import write_safetensors
from ..config import CLDFConfig
from ..device import autocast
from ..manifest import Manifest
from .batches import StepDraws, augment
from .slice_set import SliceSet
from .slicecache import cached_slice_set
from .stages import Stage, TrainRequest, fit


def ame_enabled(cfg: CLDFConfig) -> bool:
    """Whether `cldf train` trains AME-CAM: asked for, or the bundle's CAM method."""
    return cfg.ame_cam.enabled or cfg.maps.cam_method == "ame-cam"


def ame_resolution(cfg: CLDFConfig) -> int:
    """The slice size AME-CAM sees (``ame_cam.resolution``, 0 meaning the bundle's)."""
    return cfg.ame_cam.resolution or cfg.data.resolution


def train_ame_stage(cfg: CLDFConfig, manifest: Manifest, splits: dict[str, list[str]], train_set: SliceSet,
                    req: TrainRequest, device: torch.device, ckdir: Path
                    ) -> tuple[AmeCam | None, dict | None, torch.Tensor | None]:
    """The AME-CAM stages of `train.train`, when `ame_enabled`.

    Slices are cut at `ame_resolution` from the volumes (a second `SliceSet`: same cases,
    labels and order as ``train_set``) when it differs from the bundle's.

    Returns:
        the networks, their card, and the ``(N, C, R', R')`` training slices at AME-CAM's
        resolution when it differs from the bundle's (else None); all None when not enabled.
    """
    if not ame_enabled(cfg):
        return None, None, None
    r = ame_resolution(cfg)

    def slice_set(ids: list[str]) -> SliceSet:
        return cached_slice_set(manifest, ids, cfg.data.channels, r, tuple(cfg.data.percentiles), req.target_labels,
                                cfg.data.positive_fraction, cfg.data.orientation, progress=req.progress,
                                ct_window=cfg.data.ct_window)

    data = train_set if r == cfg.data.resolution else slice_set(train_set.case_ids)
    val_set = slice_set(splits["val"]) if splits.get("val") else None
    if not torch.equal(data.labels, train_set.labels):
        raise ValueError(f"slices cut at {r} x {r} do not line up with the training slices")
    net, card = fit_ame_cam(cfg, data, val_set, req.seed + 3, device, ckdir, req)
    return net, card, None if data is train_set else data.images


def fit_ame_cam(cfg: CLDFConfig, train_set: SliceSet, val_set: SliceSet | None, seed: int, device: torch.device,
                ckdir: Path, req: TrainRequest) -> tuple[AmeCam, dict]:
    """Train (or resume) both AME-CAM stages.

    Args:
        cfg: the bundle's settings (``ame_cam`` section).
        train_set: training slices at `ame_resolution` with their slice labels.
        val_set: validation patients' slices and slice labels at the same resolution (for the AUC), or None.
        seed: base seed; the classifier uses ``seed``, the aggregator ``seed + 1``.

    Returns:
        the networks (eval mode, frozen) and a card: resolution, seconds per stage, AUC history, chosen step.
    """
    acfg = cfg.ame_cam
    if acfg.eval_every < 1:
        raise ValueError(f"ame_cam.eval_every must be at least 1, not {acfg.eval_every}")
    if acfg.aggregator_batch_size < 2:
        raise ValueError(f"ame_cam.aggregator_batch_size must be at least 2 (the loss compares slices), "
                         f"not {acfg.aggregator_batch_size}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = AmeCam(acfg, train_set.images.shape[1])
    net.to(device)
    seconds, record = fit_multi_exit(net, train_set, val_set, cfg, seed, device, ckdir, req)
    net.classifier.eval().requires_grad_(False)
    seconds_agg = fit("ame_aggregator", net.aggregator, _aggregator_stage(net, train_set, cfg, seed + 1, device),
                       acfg.aggregator_steps, acfg.aggregator_lr, ckdir, device, req).seconds
    net.eval().requires_grad_(False)
    card = {
        "resolution": int(train_set.images.shape[-1]),
        "checkpoint": ("best AUC of the last exit on the validation patients' slice labels"
                       if record.get("best") else "last step (no validation patients)"),
        "auc_history": record.get("history", []),
        "chosen_step": record["best"]["step"] if record.get("best") else record["steps_done"],
        "wall_clock_s": {"classifier": round(seconds, 1), "aggregator": round(seconds_agg, 1)},
    }
    return net, card


def fit_multi_exit(net: AmeCam, data: SliceSet, val_set: SliceSet | None, cfg: CLDFConfig, seed: int,
                   device: torch.device, ckdir: Path, req: TrainRequest) -> tuple[float, dict]:
    """Stage a: train in chunks of ``eval_every`` steps, scoring each chunk's end and keeping the best.

    Returns the training seconds and the AUC record (``history`` of ``[step, auc]``, ``best``);
    ``net.classifier`` holds the chosen weights.
    """
    acfg = cfg.ame_cam
    best_path, record_path = ckdir / "ame_classifier.best.safetensors", ckdir / "ame_classifier.auc.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"history": [], "best": None}
    stage = _classifier_stage(net, data, cfg, seed, device)
    seconds = 0.0
    stops = sorted({*range(acfg.eval_every, acfg.steps, acfg.eval_every), acfg.steps})
    deadline = time.monotonic() + req.stage_seconds("ame_classifier")  # one share for all the chunks
    for stop in stops:
        fitted = fit("ame_classifier", net.classifier, stage, stop, acfg.lr, ckdir, device, req,
                     max(0.0, deadline - time.monotonic()))
        seconds = fitted.seconds
        if fitted.steps < stop:  # its share of the time budget is used
            break
        if val_set is None or stop in [s for s, _ in record["history"]]:
            continue
        auc = validation_auc(net, val_set, device)
        if auc is None:
            continue
        if record["best"] is None or auc > record["best"]["auc"]:
            _save_atomic(net.classifier.state_dict(), best_path)
            record["best"] = {"step": stop, "auc": auc}
        record["history"].append([stop, auc])
        atomic.write_json(record_path, record, indent=None)
    if record["best"] is not None:
        net.classifier.load_state_dict(load_file(str(best_path)))
    return seconds, {**record, "steps_done": fitted.steps}


def validation_auc(net: AmeCam, val_set: SliceSet, device: torch.device, batch: int = 32) -> float | None:
    """AUC of the last exit's presence on held-out slice labels; None when they hold one class only."""
    labels = val_set.labels.numpy()
    if len(set(labels.tolist())) < 2:
        return None
    net.classifier.eval()
    with torch.inference_mode(), autocast(device):
        scores = torch.cat([net.classifier(b.to(device))[0][:, -1].float().cpu() for b in val_set.images.split(batch)])
    return round(float(roc_auc_score(labels, scores.numpy())), 5)


def near_positive_weights(data: SliceSet, scale: float = 5.0) -> torch.Tensor:
    """``(N,)`` weights ``exp(-d / scale)`` of each slice, ``d`` its distance (in slices of the set, which
    keeps each patient's slice order) to the nearest positive slice of the same patient; 0 without one."""
    weights = torch.zeros(len(data))
    for c in data.case_index.unique():
        rows = (data.case_index == c).nonzero()[:, 0]
        positive = (data.labels[rows] == 1).nonzero()[:, 0]
        if len(positive):
            d = (torch.arange(len(rows))[:, None] - positive[None]).abs().min(dim=1).values
            weights[rows] = torch.exp(-d.float() / scale)
    return weights


def _classifier_stage(net: AmeCam, data: SliceSet, cfg: CLDFConfig, seed: int, device) -> Stage:
    acfg = cfg.ame_cam
    if not 0 <= acfg.hard_negatives <= 1:
        raise ValueError(f"ame_cam.hard_negatives must be in [0, 1], not {acfg.hard_negatives}")
    pos = (data.labels == 1).nonzero()[:, 0]
    neg = (data.labels == 0).nonzero()[:, 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("the AME-CAM classifier needs both positive and negative training slices")
    near = near_positive_weights(data)[neg]

    def draw(g: torch.Generator) -> torch.Tensor:
        half = acfg.batch_size // 2
        n_neg = acfg.batch_size - half
        n_hard = round(acfg.hard_negatives * n_neg) if near.sum() > 0 else 0
        return torch.cat([pos[torch.randint(len(pos), (half,), generator=g)],
                          neg[torch.randint(len(neg), (n_neg - n_hard,), generator=g)]]
                         + ([neg[torch.multinomial(near, n_hard, replacement=True, generator=g)]] if n_hard else []))

    def loss(classifier, x: torch.Tensor, y: torch.Tensor, d: StepDraws) -> torch.Tensor:
        with autocast(device):
            logits, _ = classifier(augment(x, d, cfg.cam_classifier.intensity, cfg.cam_classifier.flips).to(device))
        return multi_exit_loss(logits.float(), y.to(device), acfg.exit_weights)

    return Stage(data, draw, seed, loss, parallel=False)  # its ResNet's shortcuts hold BatchNorm: batch-coupled


def _aggregator_stage(net: AmeCam, data: SliceSet, cfg: CLDFConfig, seed: int, device) -> Stage:
    """The aggregator's loss compares the slices of a batch: one process trains on each batch whole."""
    acfg = cfg.ame_cam
    pos = (data.labels == 1).nonzero()[:, 0]
    if len(pos) < 2:
        raise ValueError(f"the AME-CAM aggregator needs at least 2 positive training slices, not {len(pos)}")

    def draw(g: torch.Generator) -> torch.Tensor:
        return pos[torch.randperm(len(pos), generator=g)[: acfg.aggregator_batch_size]]

    def loss(aggregator, x: torch.Tensor, y: torch.Tensor, d: StepDraws) -> torch.Tensor:
        x = augment(x, d, cfg.cam_classifier.intensity, cfg.cam_classifier.flips).to(device)
        with torch.no_grad(), autocast(device):
            _, exit_maps = net.classifier(x)
        a = upsample([m.float() for m in exit_maps], tuple(x.shape[-2:]))
        with autocast(device):
            fused, _ = aggregator(x, a)
        return region_contrastive_loss(x, fused.float(), acfg.rank_alpha)

    return Stage(data, draw, seed, loss, parallel=False)


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    write_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)

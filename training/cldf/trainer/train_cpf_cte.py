"""CPF-CTE's stage: its ViT classifier (`cldf.cpf_cte`) trained on slice labels, in `cldf train` or for a
finished bundle (`add_cpf_cte`, the `cldf cpf-cte` command).

The classifier is one resumable network stage (`stages.fit`: checkpoints at least every
``checkpoint_every_s`` and at the end, per-step seeded batches and augmentation): balanced batches,
the multi-label BCE of its top-k pooled class scores. The last step's weights are kept; the
validation patients' slice labels give the AUC of its presence score, recorded in the card.
`add_cpf_cte` then trains the ``cpf-cte-seeds`` pixel decoders (seeds from the CPF-CTE map alone) for
the bundle's decoder seeds, exactly as `cldf train` and `cldf ablate` train a variant.

Only slice labels reach this module (`slice_set.SliceSet`); masks never do.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

from .. import atomic
from ..bundle import add_network, load_bundle, replace_decoders
from ..config import CLDFConfig, apply_settings
from ..cpf_cte import TARGET, CpfCte, check_config, cpf_cte_loss
from ..device import device_name, resolve_device
from ..manifest import Manifest, load_manifest
from .batches import StepDraws, augment, flip
from .decoders import fit_decoders
from .run_folder import beside
from .slice_set import SliceSet
from .slicecache import cached_slice_set
from .stages import Stage, TrainRequest, fit

VARIANT = "cpf-cte-seeds"
SEED_OFFSET = 4  # the network's seed: the run's seed plus this (the other networks take 0..3)


def cpf_cte_enabled(cfg: CLDFConfig) -> bool:
    """Whether `cldf train` trains CPF-CTE: asked for, or the bundle's CAM method."""
    return cfg.cpf_cte.enabled or cfg.maps.cam_method == "cpf-cte"


def train_cpf_cte_stage(cfg: CLDFConfig, manifest: Manifest, splits: dict[str, list[str]], train_set: SliceSet,
                        req: TrainRequest, device: torch.device, ckdir: Path) -> tuple[CpfCte | None, dict | None]:
    """The CPF-CTE stage of `train.train`, when `cpf_cte_enabled`: the network and its card, else None, None."""
    if not cpf_cte_enabled(cfg):
        return None, None
    val_set = _slices(manifest, splits["val"], cfg, req.target_labels, req.progress) if splits.get("val") else None
    return fit_cpf_cte(cfg, train_set, val_set, req.seed + SEED_OFFSET, device, ckdir, req)


def fit_cpf_cte(cfg: CLDFConfig, train_set: SliceSet, val_set: SliceSet | None, seed: int, device: torch.device,
                ckdir: Path, req: TrainRequest) -> tuple[CpfCte, dict]:
    """Train (or resume) the CPF-CTE classifier in ``ckdir``.

    Args:
        cfg: the bundle's settings (``cpf_cte`` section; ``cam_classifier``'s intensity range and flips).
        train_set: ``(N, C, R, R)`` training slices with their slice labels.
        val_set: the validation patients' slices and labels, for the AUC in the card, or None.
        seed: initialisation and batches.

    Returns:
        the network (eval mode, frozen) and its card: steps, seconds, parameters, validation AUC.
    """
    ccfg = cfg.cpf_cte
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = CpfCte(ccfg, train_set.images.shape[1], train_set.images.shape[-1])
    fitted = fit("cpf_cte", net, cpf_cte_stage(train_set, cfg, seed, device), ccfg.steps, ccfg.lr, ckdir, device, req)
    net.eval().requires_grad_(False)
    auc = validation_auc(net, val_set, device) if val_set is not None else None
    return net, {"steps": fitted.steps, "wall_clock_s": {"classifier": round(fitted.seconds, 1)},
                 "parameters": sum(p.numel() for p in net.parameters()), "checkpoint": "last step",
                 **({"validation_auc": auc} if auc is not None else {})}


def cpf_cte_stage(data: SliceSet, cfg: CLDFConfig, seed: int, device: torch.device) -> Stage:
    """Half positive, half negative slices per step; the multi-label BCE of the pooled scores (`cpf_cte_loss`)."""
    ccfg, clf = cfg.cpf_cte, cfg.cam_classifier
    pos = (data.labels == 1).nonzero()[:, 0]
    neg = (data.labels == 0).nonzero()[:, 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("the CPF-CTE classifier needs both positive and negative training slices")
    if ccfg.batch_size < 2:
        raise ValueError(f"cpf_cte.batch_size must be at least 2 (half positive, half negative), not {ccfg.batch_size}")

    def draw(g: torch.Generator) -> torch.Tensor:
        half = ccfg.batch_size // 2
        return torch.cat([pos[torch.randint(len(pos), (half,), generator=g)],
                          neg[torch.randint(len(neg), (ccfg.batch_size - half,), generator=g)]])

    def loss(net, x: torch.Tensor, y: torch.Tensor, d: StepDraws) -> torch.Tensor:
        x = augment(x, d, clf.intensity, clf.flips) if ccfg.augment else flip(x, d, clf.flips)
        return cpf_cte_loss(net(x.to(device)).scores, y.to(device))  # float32: a small network, LSTMs inside

    return Stage(data, draw, seed, loss, parallel=False)  # trained by process 0 alone, after the parallel stages


def validation_auc(net: CpfCte, val_set: SliceSet, device: torch.device, batch: int = 64) -> float | None:
    """AUC of the pooled target score on held-out slice labels; None when they hold one class only."""
    labels = val_set.labels.numpy()
    if len(set(labels.tolist())) < 2:
        return None
    with torch.inference_mode():
        scores = torch.cat([net(b.to(device)).scores[:, TARGET].cpu() for b in val_set.images.split(batch)])
    return round(float(roc_auc_score(labels, scores.numpy())), 5)


def _slices(manifest: Manifest, ids: list[str], cfg: CLDFConfig, target_labels, progress: bool) -> SliceSet:
    d = cfg.data
    return cached_slice_set(manifest, ids, d.channels, d.resolution, tuple(d.percentiles), target_labels,
                            d.positive_fraction, d.orientation, progress=progress, ct_window=d.ct_window)


def add_cpf_cte(bundle_dir: Path, manifest_path: Path, device: str, settings: dict[str, Any] | None = None,
                command: str = "", progress: bool = True, keep_checkpoints: bool = False, replace: bool = False) -> dict:
    """`cldf cpf-cte`: train CPF-CTE and its ``cpf-cte-seeds`` decoders into a finished bundle, the rest untouched.

    Uses the bundle's recorded training split, target labels, settings and decoder seeds. Checkpoints wait
    in ``<bundle>.cpf-cte-checkpoints`` (a re-run resumes from them) and are removed once the bundle holds
    both, resealed, with the card entry ``cpf_cte`` (command, device, seconds).

    Args:
        settings: ``cpf_cte.*`` values used instead of the bundle's (others are refused before any work).
        replace: train again and replace a CPF-CTE network the bundle already has.

    Returns:
        the card entry.
    """
    bad = [k for k in settings or {} if not k.startswith("cpf_cte.")]
    if bad:
        raise ValueError(f"cldf cpf-cte changes cpf_cte settings only (--set cpf_cte.KEY=VALUE), not {', '.join(bad)}")
    bundle = load_bundle(bundle_dir)  # a tampered or incomplete bundle is refused before any work
    if bundle.cpf_cte is not None and not replace:
        lacking = "" if VARIANT in bundle.decoders else f" (its '{VARIANT}' decoders are missing: `cldf ablate` adds them)"
        raise ValueError(f"{bundle_dir} already has a CPF-CTE network{lacking}; pass --replace to train it again")
    config = apply_settings(bundle.config, {**(settings or {}), "cpf_cte.enabled": True})
    check_config(config.cpf_cte, config.data.resolution)
    card, t0 = bundle.card, time.time()
    split = card.get("training", {}).get("split", {})
    if not split.get("train"):
        raise ValueError(f"{bundle_dir}/bundle.json records no training split; retrain the bundle with `cldf train`")
    ckdir = beside(Path(bundle_dir).resolve(), "cpf-cte-checkpoints")
    _check_run(ckdir, {"split": split, "config": config.to_dict(), "seed": card["training"].get("seed", 0)})
    manifest, labels = load_manifest(manifest_path), card.get("task", {}).get("mask_labels")
    data = _slices(manifest, split["train"], config, labels, progress)
    val_set = _slices(manifest, split["val"], config, labels, progress) if split.get("val") else None
    req = TrainRequest(manifest=Path(manifest_path), out=Path(bundle_dir), config=config, target_labels=labels,
                       device=device, progress=progress, command=command)
    dev = resolve_device(device)
    net, entry = fit_cpf_cte(config, data, val_set, card["training"].get("seed", 0) + SEED_OFFSET, dev, ckdir, req)
    t1 = time.time()
    bundle.config, bundle.cpf_cte = config, net
    bundle.decoders[VARIANT] = {}  # filled below
    with tempfile.TemporaryDirectory(prefix="cldf-seeds-") as store:
        new, decoder_card = fit_decoders(bundle, data, dev, [VARIANT], tuple(sorted(bundle.decoders["cdm"])), {},
                                         lambda state: None, Path(store), progress)
    entry |= {"command": command, "device": device_name(dev), "decoders": decoder_card,
              "wall_clock_s": {**entry["wall_clock_s"], "decoders": round(time.time() - t1, 1),
                               "total": round(time.time() - t0, 1)}}
    add_network(bundle_dir, "cpf_cte", net.state_dict(), config=config.to_dict(), cpf_cte=entry)
    replace_decoders(bundle_dir, {**bundle.decoders, **new})
    if not keep_checkpoints:
        shutil.rmtree(ckdir, ignore_errors=True)
    return entry


def _check_run(ckdir: Path, run: dict) -> None:
    """Record what the checkpoints belong to, and refuse to resume those of other settings or another split."""
    run = json.loads(json.dumps(run))
    path = ckdir / "run.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != run:
        raise ValueError(f"{ckdir} holds the checkpoints of a CPF-CTE run with other settings or another split: "
                         f"run the same command as before, or delete {ckdir} to start over")
    ckdir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, run)

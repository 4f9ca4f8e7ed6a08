"""The student stage: a U-Net trained on the pipeline's masks of the training patients (`pseudo_masks`), then
weighed against the pipeline on the validation patients, which decide whether the bundle segments with it.

Weak supervision holds: the student's targets are the pipeline's masks, made from volumes and slice labels;
ground truth is read for the validation scores only (`_validation_case`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from tqdm.auto import tqdm

from .. import atomic, cases, metrics
from ..bundle import Bundle, add_network, load_bundle, update_card
from ..config import StudentConfig
from ..config.grids import STUDENT_RULES, STUDENT_THRESHOLDS
from ..device import batch_for, resolve_device
from ..manifest import Manifest
from ..models import build_student
from ..postprocess import keep_main_components
from ..segment import SegmentationJob, Segmenter
from ..slices import to_slices
from ..student import probability_volume, student_slices
from .batches import StepDraws, flip, intensity_change
from .pseudo_masks import PseudoMask, pipeline_id, pseudo_masks
from .slice_set import SliceSet
from .stages import Stage, TrainRequest, fit

log = logging.getLogger(__name__)

# LiteMedSAM multiplies a student run's time several times over on a CPU (0.67 s per slice with a mask against
# hundredths of a second): the student keeps it only when it gains more than this on the validation score.
SAM_MARGIN = 0.02
CHOSEN_ON_VALIDATION = ("segmenter", "refine", "threshold", "min_component_fraction")
# The student's share of --time-budget: half makes the pseudo-masks, then training takes 60 % of what is left
# (validation, which cannot stop part-way, the rest).
PSEUDO_MASK_SHARE, TRAINING_SHARE = 0.5, 0.6


class NothingToLearn(ValueError):
    """The pipeline left every training slice empty: no student can be trained on its masks."""


def train_student(bundle: Bundle, manifest: Manifest, req: TrainRequest, ckdir: Path) -> dict:
    """Make the pseudo-masks, train (or resume) the student, choose on validation; written into the bundle's folder
    once all of it is done (``bundle.config.student`` may differ from the card's: the card then takes it).

    Returns the card entry ``student`` (also written into bundle.json, with the chosen settings in its config).
    """
    cfg = bundle.config.student
    split = bundle.card.get("training", {}).get("split", {})
    device = resolve_device(req.device)
    t0 = time.time()
    targets = pseudo_masks(bundle, manifest, split["train"], req.target_labels, req.device,
                           ckdir / "student-pseudo-masks", req.progress, req.stage_seconds("student") * PSEUDO_MASK_SHARE)
    seconds = {"pseudo_masks": time.time() - t0}
    data = student_set(bundle, manifest, targets)
    if not (data.labels.flatten(1).any(dim=1)).any():
        raise NothingToLearn("the pipeline found the target on no training slice: there is nothing to train a student "
                             "on (check the bundle's validation scores; more training patients or steps may help)")
    with torch.random.fork_rng():  # the same initialisation however the run got here
        torch.manual_seed(cfg.seed)
        net = build_student(cfg, len(bundle.channels))
    flips = bundle.config.cam_classifier.flips  # no flips where the anatomy has sides
    fitted = fit("student", net, student_stage(data, cfg, flips, device), cfg.steps, cfg.lr, ckdir / _training_id(cfg),
                 device, req, req.stage_seconds("student") * TRAINING_SHARE)
    seconds["training"] = fitted.seconds
    net.eval().requires_grad_(False)
    bundle.student = net
    t1 = time.time()
    val_ids = split.get("val", []) if req.select else []  # without selection the pipeline stays the segmenter
    chosen, rows, val_ids = choose_student(bundle, manifest, val_ids, req.target_labels, req.device,
                                  ckdir / "student-validation", req.progress, req.select_refine,
                                  req.stage_seconds("student"))
    seconds["validation"] = time.time() - t1
    card = {**_data_card(data), "training_cases": len(split["train"]),
            "cases_with_pseudo_masks": len(targets), "steps": fitted.steps, "wall_clock_s": {k: round(v, 1) for k, v in seconds.items()},
            "validation_cases": val_ids, "chosen": chosen, "table": rows,
            "metric": "mean of the per-case 3D Dice and the Dice over every slice holding any target, "
                      "validation patients"}
    config = bundle.config
    for key, value in chosen.items():
        config.set(key, value)
    if req.command:
        card["command"] = req.command
    settings = {**bundle.card["config"], "student": config.to_dict()["student"]}  # the card's other settings stay
    add_network(bundle.path, "student", net.state_dict(), config=settings, student=card)
    return card


def _training_id(cfg: StudentConfig) -> str:
    """A checkpoint folder per set of training settings: a run with other settings starts afresh."""
    trained = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in CHOSEN_ON_VALIDATION}
    return "student-" + hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()[:12]


def student_set(bundle: Bundle, manifest: Manifest, targets: dict[str, PseudoMask]) -> SliceSet:
    """The student's slices and targets: slices labelled negative (empty targets) and slices labelled positive
    whose pseudo-mask is not empty; ambiguous slices, and positive ones the pipeline left empty, are left out."""
    cfg, data = bundle.config.student, bundle.config.data
    images, masks, index = [], [], []
    for i, (cid, target) in enumerate(targets.items()):
        read = cases.read_case(manifest.case(cid).channels, data)
        found = target.mask.reshape(len(target.mask), -1).any(axis=1)
        keep = torch.from_numpy((target.labels == 0) | ((target.labels == 1) & found))
        images.append(student_slices(read.normalised, cfg)[keep])
        soft = torch.from_numpy(target.mask[None].astype(np.float32))
        masks.append((_resize(soft, cfg.resolution)[keep] > 0.5).float())
        index.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
    return SliceSet(torch.cat(images), torch.cat(masks), torch.cat(index), list(targets))


def _resize(volume: torch.Tensor, resolution: int) -> torch.Tensor:
    """``(1, Z, Y, X)`` mask -> ``(Z, R, R)`` on the student's slices (padded square as `to_slices` pads)."""
    return to_slices(volume.numpy() * 2 - 1, resolution)[:, 0] * 0.5 + 0.5


def student_stage(data: SliceSet, cfg: StudentConfig, flips: bool, device: torch.device) -> Stage:
    """Half of each batch slices with target, half without; Dice + cross-entropy; flips, small affine
    changes and wide intensity changes."""
    holding = data.labels.flatten(1).any(dim=1)
    pos, neg = holding.nonzero()[:, 0], (~holding).nonzero()[:, 0]
    loss_fn = DiceCELoss(sigmoid=True, batch=True)

    def draw(g: torch.Generator) -> torch.Tensor:
        half = cfg.batch_size // 2 if len(neg) else cfg.batch_size
        picks = [pos[torch.randint(len(pos), (half,), generator=g)]]
        if cfg.batch_size > half:
            picks.append(neg[torch.randint(len(neg), (cfg.batch_size - half,), generator=g)])
        return torch.cat(picks)

    def loss(net, x: torch.Tensor, y: torch.Tensor, d: StepDraws) -> torch.Tensor:
        x, y = augment_pair(x, y, d, flips)
        return loss_fn(net(x.to(device)), y[:, None].to(device))

    return Stage(data, draw, cfg.seed, loss, parallel=False)  # trained by process 0 alone, after the parallel stages


def augment_pair(x: torch.Tensor, y: torch.Tensor, d: StepDraws, flips: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same flip and affine change (rotation up to 10 degrees, scale 0.9-1.1, shift up to 5 %) of slices
    ``(B, C, R, R)`` and targets ``(B, R, R)``, then wide intensity changes of the slices."""
    both = flip(torch.cat([x, y[:, None]], dim=1), d, flips)
    angle, scale, shift = (d.rand() * 2 - 1) * math.pi / 18, 1 + (d.rand() * 2 - 1) * 0.1, (d.rand(2) * 2 - 1) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    both = F.grid_sample(both + torch.tensor([1.0] * x.shape[1] + [0.0])[None, :, None, None], grid,
                         align_corners=False)  # outside the slice: background (-1) and no target
    x = intensity_change(both[:, :-1] - 1, d, "wide").clamp(-1.0, 1.0)
    return x, (both[:, -1] > 0.5).float()


def choose_student(bundle: Bundle, manifest: Manifest, val_ids: list[str], target_labels, device: str,
                   folder: Path, progress: bool = True, refine: bool = True,
                   seconds: float = math.inf) -> tuple[dict, list[dict], list[str]]:
    """The bundle's segmenter on the validation patients: the pipeline as shipped, or the student at each threshold
    of `STUDENT_THRESHOLDS` (with LiteMedSAM when ``refine``: at the first), under each whole-volume rule of
    `STUDENT_RULES`; returns the chosen settings, the table (best first) and the patients scored. Without
    validation patients the pipeline stays the segmenter.

    ``seconds``: no further patient is started once they are used (the first always runs).
    """
    if not val_ids:
        return {"student.segmenter": "cldf"}, [], []
    from ..slice_job import bundle_refiner

    refiner = bundle_refiner(bundle, "sam", 8) if refine else None
    scores: dict[tuple[str, float | None, float], list[tuple[float, list[float]]]] = {}
    start = time.monotonic()
    scored: list[str] = []
    for cid in tqdm(val_ids, desc="student validation", unit="case", disable=not progress):
        if scored and time.monotonic() - start >= seconds:
            log.warning("student validation: the time budget is spent; the segmenter is chosen on %d of %d "
                        "validation patients", len(scored), len(val_ids))
            break
        scored.append(cid)
        for key, value in _validation_case(bundle, manifest, cid, target_labels, device, folder, refiner).items():
            scores.setdefault(key, []).append(value)
    rows = []
    for (name, threshold, rule), per_case in scores.items():
        dice_3d = float(np.mean([d for d, _ in per_case]))
        slices = [s for _, ss in per_case for s in ss]
        slice_dice = float(np.mean(slices)) if slices else float("nan")
        rows.append({"segmenter": name, "threshold": threshold, "min_component_fraction": rule,
                     "dice_3d": round(dice_3d, 4),
                     "target_slice_dice": round(slice_dice, 4), "score": round((dice_3d + slice_dice) / 2, 4)})
    rows.sort(key=lambda r: -r["score"] + (SAM_MARGIN if r["segmenter"] == "student+sam" else 0.0))
    best = rows[0]
    if best["segmenter"] == "cldf":
        return {"student.segmenter": "cldf"}, rows, scored
    return {"student.segmenter": "student", "student.refine": "sam" if best["segmenter"] == "student+sam" else "none",
            "student.threshold": best["threshold"], "student.min_component_fraction": best["min_component_fraction"]}, \
        rows, scored


def _validation_case(bundle: Bundle, manifest: Manifest, cid: str, target_labels, device: str,
                     folder: Path, refiner) -> dict[tuple[str, float | None, float], tuple[float, list[float]]]:
    """One validation patient's (3D Dice, Dice per slice holding target) per segmenter, threshold and rule; the
    pipeline's mask is saved in ``folder`` (it does not depend on the student), so a resumed run does not make it
    again."""
    data = bundle.config.data
    case = manifest.case(cid)
    read = cases.read_case(case.channels, data)
    truth = cases.read_truth(case.mask, target_labels, data, cid)  # scoring only
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cid}-{pipeline_id(bundle)}.npy"
    if not path.is_file():
        job = SegmentationJob(Segmenter(bundle, device, batch_for(data.resolution)), read)
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, job.run(progress=False).mask.astype(np.uint8))
    masks = {("cldf", None, bundle.config.postprocess.min_component_fraction): np.load(path).astype(bool)}
    probability = probability_volume(bundle, read, resolve_device(device))
    sam_threshold = STUDENT_THRESHOLDS[0]
    refined = _sam(refiner, read, probability > sam_threshold) if refiner is not None else None
    for rule in STUDENT_RULES:
        for threshold in STUDENT_THRESHOLDS:
            masks[("student", threshold, rule)] = keep_main_components(probability > threshold, rule)
        if refined is not None:
            masks[("student+sam", sam_threshold, rule)] = keep_main_components(refined, rule)
    return {k: (metrics.dice(m, truth), metrics.target_slice_dice(m, truth)) for k, m in masks.items()}


def rechoose_student(bundle: Bundle, manifest: Manifest, req: TrainRequest, ckdir: Path) -> dict:
    """`choose_student` for a bundle that has its student; the card's ``student`` entry and settings take the
    choice (the weights stay as they are). Returns the card entry."""
    if bundle.student is None:
        raise ValueError(f"the bundle {bundle.path} has no student to weigh: train one with `cldf student` "
                         "(without --choose)")
    val_ids = bundle.card.get("training", {}).get("split", {}).get("val", [])
    if not val_ids:
        raise ValueError(f"the bundle {bundle.path} records no validation patients to weigh its student on")
    t0 = time.time()
    chosen, rows, scored = choose_student(bundle, manifest, val_ids, req.target_labels, req.device,
                                          ckdir / "student-validation", req.progress, req.select_refine)
    card = {**bundle.card.get("student", {}), "validation_cases": scored, "chosen": chosen, "table": rows,
            "rechosen": {"command": req.command, "wall_clock_s": round(time.time() - t0, 1)}}
    for key, value in chosen.items():
        bundle.config.set(key, value)
    update_card(bundle.path, config={**bundle.card["config"], "student": bundle.config.to_dict()["student"]},
                student=card)
    return card


def _sam(refiner, read: cases.CaseVolume, mask: np.ndarray) -> np.ndarray:
    """LiteMedSAM on a mask, as a student run with ``student.refine = "sam"`` applies it."""
    refiner, channel = refiner
    return refiner.refine(read.normalised[channel], mask.astype(np.uint8), read.in_plane_spacing).astype(bool)


def _data_card(data: SliceSet) -> dict:
    holding = data.labels.flatten(1).any(dim=1)
    return {"training_slices": len(data), "slices_with_pseudo_mask": int(holding.sum()),
            "slices_without": int((~holding).sum()),
            "rule": "slices labelled negative train as empty; slices labelled positive train on the pipeline's "
                    "mask (left out where it is empty); ambiguous slices are left out"}


def add_student(bundle_dir: Path, manifest_path: Path, device: str, settings: dict | None = None, command: str = "",
                progress: bool = True, keep_checkpoints: bool = False, time_budget_min: float | None = None,
                choose_only: bool = False) -> dict:
    """`cldf student`: the student stage for a bundle made without it, on its recorded split; `cldf train` runs
    the same stage itself. Checkpoints wait in ``<bundle>.student-checkpoints`` until the bundle has its student.

    ``settings``: ``student.*`` values (e.g. ``{"student.steps": 500}``) used instead of the bundle's.
    ``choose_only``: train nothing; weigh the bundle's student again on its validation patients (`choose_student`,
    e.g. after its grids grew) and record the choice.
    """
    import shutil

    from ..config import apply_settings
    from ..manifest import load_manifest
    from .run_folder import beside

    bundle = load_bundle(bundle_dir)  # a tampered or incomplete bundle is refused before any work
    bad = [k for k in settings or {} if not k.startswith("student.")]
    if bad:
        raise ValueError(f"cldf student changes student settings only, not {', '.join(bad)}")
    bundle.config = apply_settings(bundle.config, settings or {})
    ckdir = beside(Path(bundle_dir).resolve(), "student-checkpoints")
    req = TrainRequest(manifest=Path(manifest_path), out=Path(bundle_dir), config=bundle.config, device=device,
                       target_labels=bundle.card.get("task", {}).get("mask_labels"), progress=progress,
                       time_budget_min=time_budget_min, budget_stages=("student",), command=command)
    manifest = load_manifest(manifest_path)
    card = rechoose_student(bundle, manifest, req, ckdir) if choose_only else train_student(bundle, manifest, req, ckdir)
    if not keep_checkpoints:
        shutil.rmtree(ckdir, ignore_errors=True)
    return card

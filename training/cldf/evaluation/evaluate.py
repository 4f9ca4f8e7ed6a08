"""`cldf evaluate`: every method of the paper's tables on one split, scored against ground truth.

Protocol (the papers'): Dice, IoU and HD95 over positive slices, i.e. slices
where the target covers more than the bundle's ``positive_fraction``; plus a
3D Dice per case over all slices. To show where the seeds come from, also the
precision on positive slices (share of predicted pixels on the target; the
`fusion` row is CLDF's foreground seeds) and, for the maps, the pointing game
(share of positive slices whose map maximum lies on the target).
Maps are thresholded per slice with Otsu (`gradcam`, `layercam`, `scorecam`, `ame-cam`, `cpf-cte`, the
target patch map of the CPF-CTE ViT classifier, `mg`, and `cdm`, the CDM saliency map of Hu et al. 2023,
with the bundle's saliency threshold); `fusion` is CAM AND MG with the
bundle's seed thresholds; `cldf`, `cldf-untrained` (a randomly initialised
CDM), `encoder-features` and the ablations `layercam+cl`, `mg+cl`, `ame-cam+cl`,
`ame-cam+mg+cl` and `cpf-cte+cl` (decoders trained on those seeds) are masks made as the product makes
them (slices judged negative stay empty, the bundle's slice gate for all) for every
shipped decoder seed, reported as means over seeds; `cldf+sam` is `cldf` refined
with LiteMedSAM on the scan's grid, as `cldf segment --refine sam` makes it;
`student` and `student+sam` are the bundle's student network (trained on the
pipeline's masks of the training patients), unrefined and refined the same way.
HD95 is in millimetres; an empty prediction on a positive slice scores the
slice's diagonal. Ground truth is read here for scoring only.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from tqdm.auto import tqdm

from .. import atomic, cases, metrics, student
from ..bundle import Bundle
from ..defaults import DEVICE
from ..device import resolve_device
from ..images import InputError
from ..manifest import Manifest
from ..maps import GradCAM, LayerCAM
from ..maps.scorecam import ScoreCAM
from ..postprocess import keep_main_components
from ..seeds import FOREGROUND, threshold_maps
from ..segment import Segmenter
from ..slices import from_slices

MAP_METHODS = ("gradcam", "layercam", "scorecam", "ame-cam", "cpf-cte", "mg", "cdm")  # one map, thresholded per slice
BASELINES = ("gradcam", "layercam", "scorecam", "ame-cam", "cpf-cte", "mg", "fusion", "cdm")
# methods that cluster a decoder's embeddings, and the decoder variant each uses
DECODER_METHODS = {"layercam+cl": "cam-seeds", "mg+cl": "mg-seeds", "ame-cam+cl": "ame-cam-seeds",
                   "ame-cam+mg+cl": "ame-cam-fused", "cpf-cte+cl": "cpf-cte-seeds", "cldf-untrained": "untrained",
                   "encoder-features": "encoder", "cldf": "cdm"}
REFINED = "cldf+sam"  # CLDF's masks refined with LiteMedSAM (`refine`)
STUDENT_METHODS = ("student", "student+sam")  # the bundle's student network, unrefined and refined
METHODS = BASELINES + tuple(DECODER_METHODS) + (REFINED,) + STUDENT_METHODS


def available_methods(bundle: Bundle) -> tuple[str, ...]:
    """Every method, less those whose networks or decoders the bundle lacks."""
    return tuple(m for m in METHODS if _missing(bundle, m) is None)


def _missing(bundle: Bundle, method: str) -> str | None:
    """What ``method`` needs and the bundle lacks, or None."""
    if method == "ame-cam" and bundle.ame_cam is None:
        return "AME-CAM networks (train with --set ame_cam.enabled=true)"
    if method in ("cpf-cte", "cpf-cte+cl") and bundle.cpf_cte is None:
        return f"a CPF-CTE network and its decoders (add both with `cldf cpf-cte --bundle {bundle.path} --data MANIFEST`)"
    if method in STUDENT_METHODS and bundle.student is None:
        return f"a student network (add one with `cldf student --bundle {bundle.path} --data MANIFEST`)"
    variant = DECODER_METHODS.get(method)
    if variant is not None and variant not in bundle.decoders:
        return f"decoders '{variant}' (add them with `cldf ablate --bundle {bundle.path}`)"
    return None


@dataclass
class SliceScores:
    dice: list[float]
    iou: list[float]
    hd95: list[float]
    dice_3d: list[float]  # one per case
    fp_ml: list[float]  # one per case: predicted volume (ml) on slices without any target
    hits: list[int]  # per positive slice: predicted pixels on the target
    predicted: list[int]  # per positive slice: predicted pixels

    @property
    def precision(self) -> float:
        total = sum(self.predicted)
        return sum(self.hits) / total if total else float("nan")


def case_ids_for_split(bundle: Bundle, manifest: Manifest, split: str) -> list[str]:
    if split == "all":
        return [c.id for c in manifest.cases]
    splits = bundle.card.get("training", {}).get("split", {})
    if split not in splits:
        raise ValueError(f"split '{split}' is not recorded in the bundle; choose one of {sorted(splits)} or 'all'")
    known = {c.id for c in manifest.cases}
    missing = [i for i in splits[split] if i not in known]
    if missing:
        raise InputError(f"the bundle's {split} split names cases missing from {manifest.path}: {missing[:5]}")
    return list(splits[split])


def evaluate(bundle: Bundle, manifest: Manifest, case_ids: list[str], target_labels: list[int] | None,
             device: str = DEVICE, batch_size: int = 8, methods: tuple[str, ...] = METHODS,
             progress: bool = True) -> dict:
    """Score ``methods`` on the cases; returns the report (overall and per case)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    missing = {m: _missing(bundle, m) for m in methods if _missing(bundle, m) is not None}
    if missing:
        raise ValueError("the bundle cannot give " + "; ".join(f"'{m}': it lacks {why}" for m, why in missing.items())
                         + ". Leave those methods out (--methods)")
    seeds = tuple(sorted(bundle.decoders["cdm"]))
    maps = ("cdm",) if "cdm" in methods else ()
    # unrefined masks for every row ("cldf+sam" refines them below), whatever the bundle's refine.method
    segs = {"cldf": Segmenter(bundle, device, batch_size, maps=maps, refine="none")}
    segs |= {m: Segmenter(bundle, device, batch_size, variant=v, refine="none") for m, v in DECODER_METHODS.items()
             if m in methods and m != "cldf"}
    refiner = _refiner(bundle, device, batch_size) if {REFINED, "student+sam"} & set(methods) else None
    per_case = {}
    pooled: dict[str, dict[int, SliceScores]] = defaultdict(lambda: defaultdict(lambda: SliceScores([], [], [], [], [], [], [])))
    hits: dict[str, list[bool]] = defaultdict(list)
    for cid in tqdm(case_ids, desc="evaluate", unit="case", disable=not progress):
        masks, maps, gt, spacing_3d = _case_masks(segs, manifest, cid, bundle, target_labels, methods, seeds, refiner)
        spacing = spacing_3d[:2]
        empty = ~gt.any(axis=(1, 2))
        voxel_ml = float(np.prod(spacing_3d)) / 1000.0
        per_case[cid] = {}
        frac = gt.mean(axis=(1, 2))
        positive = np.nonzero(frac > bundle.config.data.positive_fraction)[0]
        for method, m in maps.items():
            hits[method] += pointing(m, gt, positive)
        for method, by_seed in masks.items():
            entry = {}
            for s, m in by_seed.items():
                sc = _slice_scores(m, gt, positive, spacing)
                pooled[method][s].dice += sc.dice
                pooled[method][s].iou += sc.iou
                pooled[method][s].hd95 += sc.hd95
                pooled[method][s].hits += sc.hits
                pooled[method][s].predicted += sc.predicted
                fp_ml = float(m[empty].sum()) * voxel_ml
                pooled[method][s].dice_3d.append(metrics.dice(m, gt))
                pooled[method][s].fp_ml.append(fp_ml)
                entry[s] = {"dice": _mean(sc.dice), "iou": _mean(sc.iou), "hd95_mm": _mean(sc.hd95), "dice_3d": metrics.dice(m, gt),
                            "fp_ml_empty_slices": fp_ml}
            per_case[cid][method] = _over_seeds(entry)
    overall = _overall(pooled, hits)
    return {
        "bundle": bundle.id,
        "cases": list(case_ids),
        "protocol": __doc__.split("Protocol (the papers'): ")[1].split("\n\n")[0].replace("\n", " "),
        "decoder_seeds": list(seeds),
        "methods": overall,
        "per_case": per_case,
    }


def _overall(pooled: dict[str, dict[int, SliceScores]], hits: dict[str, list[bool]]) -> dict:
    """Every method's scores over all cases' slices (mean and spread over decoder seeds)."""
    overall = {}
    for method, by_seed in pooled.items():
        stats = {s: {"dice": _mean(v.dice), "dice_std": _std(v.dice), "iou": _mean(v.iou), "iou_std": _std(v.iou),
                     "hd95_mm": _mean(v.hd95), "hd95_std": _std(v.hd95),
                     "dice_3d": _mean(v.dice_3d), "dice_3d_std": _std(v.dice_3d),
                     "fp_ml_empty_slices": _mean(v.fp_ml), "precision": v.precision,
                     "n_slices": len(v.dice)} for s, v in by_seed.items()}
        overall[method] = _over_seeds(stats)
        if method in hits:
            overall[method]["pointing"] = _mean(hits[method])
    return overall


def _refiner(bundle: Bundle, device: str, batch_size: int):
    """The bundle's refinement settings with SAM switched on (the ``cldf+sam`` row)."""
    from ..refine import SamRefiner  # loads timm: only when the row is asked for

    return SamRefiner(replace(bundle.config.refine, method="sam"), resolve_device(device), batch_size=batch_size)


def _case_masks(segs: dict[str, Segmenter], manifest: Manifest, cid: str, bundle: Bundle, target_labels, methods, seeds,
                refiner=None):
    case = manifest.case(cid)
    read = cases.read_case(case.channels, bundle.config.data)
    gt = cases.read_truth(case.mask, target_labels, bundle.config.data, cid)
    masks, maps = {}, {}
    if any(m not in STUDENT_METHODS for m in methods):  # the student's rows alone need no maps
        masks, maps = _pipeline_masks(segs, read, gt.shape, bundle, methods, seeds, refiner)
    masks.update(_student_masks(bundle, read, segs["cldf"].device, methods, refiner))
    return {m: masks[m] for m in methods}, maps, gt, read.reference.GetSpacing()


def _pipeline_masks(segs: dict[str, Segmenter], read: cases.CaseVolume, shape: tuple[int, ...], bundle: Bundle,
                    methods, seeds, refiner) -> tuple[dict, dict]:
    """Every row but the student's: the maps (thresholded per slice) and the masks of the decoder methods."""
    cfg = bundle.config
    normalised, slices = read.normalised, read.slices(cfg.data.resolution)
    seg = segs["cldf"]
    cams = {"gradcam": bundle.on_sides(GradCAM(bundle.cam_classifier, [cfg.maps.gradcam_layer])),
            "layercam": bundle.on_sides(LayerCAM(bundle.cam_classifier, cfg.maps.cam_layers)),
            "scorecam": bundle.on_sides(ScoreCAM(bundle.cam_classifier, cfg.maps.gradcam_layer))}
    hw = shape[1:]
    maps = {m: np.zeros(shape, np.float32) for m in MAP_METHODS if m in methods}
    decoded = {m: {s: np.zeros(shape, bool) for s in seeds} for m in DECODER_METHODS
               if m in methods or (m == "cldf" and REFINED in methods)}
    sources = tuple({segs[m].cam_source for m in decoded} | ({"ame-cam", "cpf-cte"} & set(methods)))
    fusion = np.zeros(shape, bool)
    for start in range(0, len(slices), seg.batch_size):
        stop = min(start + seg.batch_size, len(slices))
        x, ids = slices[start:stop].to(seg.device), torch.arange(start, stop)
        sm = seg.slice_maps(x, ids, gate=False, cam_sources=sources)
        batch_maps = {"mg": sm.mean_gradient, **sm.extra, **sm.other_cams, cfg.maps.cam_method: sm.cam}
        for name, cam in cams.items():  # CAMs computed already are in sm
            if name in maps and name not in batch_maps:
                batch_maps[name] = cam(x)[0]
        for name in maps:
            maps[name][start:stop] = from_slices(batch_maps[name], hw)
        fusion[start:stop] = from_slices((sm.seeds == FOREGROUND).float(), hw, mode="mask")
        for method, by_seed in decoded.items():
            sm.seeds = segs[method].seeds(sm, ids)
            for s, m in segs[method].masks(x, sm, seeds).items():
                by_seed[s][start:stop] = from_slices(m, hw, mode="mask")
    thresholds = {"cdm": cfg.saliency.threshold}
    masks = {m: {0: _threshold(a, thresholds.get(m, "otsu"))} for m, a in maps.items()}
    if "fusion" in methods:
        masks["fusion"] = {0: fusion}
    if REFINED in methods:  # before the whole-volume rule, as `cldf segment --refine sam` does
        channel = normalised[bundle.channels.index(cfg.refine.channel or bundle.channels[0])]
        spacing = read.in_plane_spacing
        coarse = decoded["cldf"]
        decoded[REFINED] = dict(zip(coarse, refiner.refine_many(channel, list(coarse.values()), spacing)))
    for by_seed in decoded.values():  # the product's whole-volume rule, as `cldf segment` applies it
        for s, m in by_seed.items():
            by_seed[s] = keep_main_components(m, cfg.postprocess.min_component_fraction)
    masks.update(decoded)
    return masks, maps


def _student_masks(bundle: Bundle, read: cases.CaseVolume, device, methods, refiner) -> dict[str, dict[int, np.ndarray]]:
    """The ``student`` and ``student+sam`` rows (one network: one "seed"), with the student's whole-volume rule."""
    wanted = [m for m in STUDENT_METHODS if m in methods]
    if not wanted:
        return {}
    raw = {"student": student.raw_mask(bundle, read, device)}
    if "student+sam" in wanted:
        channel = read.normalised[bundle.channels.index(bundle.config.refine.channel or bundle.channels[0])]
        raw["student+sam"] = refiner.refine(channel, raw["student"], read.in_plane_spacing)
    rule = bundle.config.student.min_component_fraction
    return {m: {0: keep_main_components(raw[m].astype(bool), rule)} for m in wanted}


def _threshold(maps: np.ndarray, threshold: str | float) -> np.ndarray:
    """``(Z, H, W)`` maps -> masks, per slice (Otsu or a fixed value)."""
    return threshold_maps(torch.from_numpy(maps), threshold).numpy()


def _slice_scores(pred: np.ndarray, gt: np.ndarray, positive: np.ndarray, spacing) -> SliceScores:
    sc = SliceScores([], [], [], [], [], [], [])
    diag = math.hypot(gt.shape[1] * spacing[1], gt.shape[2] * spacing[0])
    for z in positive:
        p, g = pred[z], gt[z]
        sc.dice.append(metrics.dice(p, g))
        sc.iou.append(metrics.iou(p, g))
        sc.hd95.append(_hd95(p, g, spacing, diag))
        sc.hits.append(int((p & g).sum()))
        sc.predicted.append(int(p.sum()))
    return sc


def pointing(maps: np.ndarray, gt: np.ndarray, positive: np.ndarray) -> list[bool]:
    """Per positive slice: does the map's maximum lie on the target? (A case may have none.)"""
    if len(positive) == 0:
        return []
    flat = maps[positive].reshape(len(positive), -1)
    return gt[positive].reshape(len(positive), -1)[np.arange(len(positive)), flat.argmax(axis=1)].tolist()


def _hd95(p: np.ndarray, g: np.ndarray, spacing, diag: float) -> float:
    if not p.any():
        return diag
    with warnings.catch_warnings():  # MONAI 1.6 warns of its own deprecated argument on every call
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        d = compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None],
                                       percentile=95, spacing=(spacing[1], spacing[0]))
    v = float(d)
    return v if math.isfinite(v) else diag


def _mean(v: list[float]) -> float:
    return float(np.mean(v)) if v else float("nan")


def _std(v: list[float]) -> float:
    return float(np.std(v)) if v else float("nan")


def _over_seeds(by_seed: dict[int, dict]) -> dict:
    """One seed: its numbers. Several: means over seeds, the spread of seed means, and each seed."""
    if len(by_seed) == 1:
        return next(iter(by_seed.values()))
    keys = next(iter(by_seed.values())).keys()
    out = {k: float(np.mean([d[k] for d in by_seed.values()])) for k in keys}
    out["dice_seed_std"] = float(np.std([d["dice"] for d in by_seed.values()]))
    out["by_seed"] = by_seed
    return out


def markdown_table(report: dict) -> str:
    rows = ["| method | Dice | IoU | HD95 (mm) | 3D Dice | FP on empty slices (ml) | precision | pointing | slices |",
            "|---|---|---|---|---|---|---|---|---|"]
    for method, r in report["methods"].items():
        seed_note = f" (±{r['dice_seed_std']:.3f} over {len(r['by_seed'])} seeds)" if "by_seed" in r else ""
        point = f"{r['pointing']:.3f}" if "pointing" in r else "—"
        rows.append(
            f"| {method} | {r['dice']:.3f} ± {r['dice_std']:.3f}{seed_note} | {r['iou']:.3f} ± {r['iou_std']:.3f} "
            f"| {r['hd95_mm']:.1f} ± {r['hd95_std']:.1f} | {r['dice_3d']:.3f} | {r.get('fp_ml_empty_slices', float('nan')):.1f} "
            f"| {r['precision']:.3f} | {point} "
            f"| {r['n_slices']:.0f} |"
        )
    return "\n".join(rows)


def write_report(report: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(report, indent=1, default=float) + "\n")

"""Does the clean-slice classifier's CAM point at the target: at a finer grid, on the patient's halves?

Retrains only a bundle's CAM classifier (stage 3 of `cldf train`, same settings
unless a ``--variant`` changes some, same training split, slice labels only) at
each requested resolution, then scores its LayerCAM on the bundle's validation
patients: classifier accuracy on positive and negative slices, the pointing
game (share of positive slices whose CAM maximum lies on the target) and the
precision and Dice of the CAM's per-slice Otsu mask inside the body. Validation
masks are read here for scoring only. Checkpoints go under ``--work`` so an
interrupted run resumes.

    .venv/bin/python benchmarks/cam_localisation.py \\
        --bundle CLDFSegmentation/Resources/Models/abdomen-ct-kidney --resolution 64 128 \\
        --out benchmarks/cam_localisation-kidney.md

``--variant "cam_classifier.flips=false cam_classifier.sides=left"`` adds a row per
resolution with those settings (``--set`` syntax, space-separated; ``""``: the bundle's own).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from cldf import atomic, cases, metrics
from cldf.bundle import read_card
from cldf.config import CLDFConfig, apply_overrides
from cldf.evaluation.evaluate import pointing
from cldf.manifest import load_manifest
from cldf.maps import LayerCAM
from cldf.models import NoiseSchedule
from cldf.seeds import body_mask, threshold_maps
from cldf.sides import on_sides, side_labels, sided
from cldf.slice_maps import slice_presence
from cldf.trainer.slice_set import load_slice_set
from cldf.trainer.stages import TrainRequest, fit_classifier


def validation_slices(card: dict, cfg: CLDFConfig, resolution: int):
    """Positive slices (with their target masks at ``resolution``) and negative slices of the validation patients."""
    split = card["training"]["split"]["val"]
    labels = card["task"]["mask_labels"]
    return cases.scored_slices(load_manifest(card["training"]["manifest"]), split, labels, cfg.data, resolution)


def measure(bundle_dir: Path, resolution: int, work: Path, seed: int, variant: str = "") -> dict:
    card = read_card(bundle_dir)
    cfg = CLDFConfig.from_dict(card["config"])
    cfg.data.resolution = resolution
    cfg = apply_overrides(cfg, variant.split())
    cc, orientation = cfg.cam_classifier, cfg.data.orientation
    manifest = load_manifest(card["training"]["manifest"])
    split, labels = card["training"]["split"], card["task"]["mask_labels"]
    train_set = load_slice_set(manifest, split["train"], cfg.data.channels, resolution,
                               tuple(cfg.data.percentiles), labels, cfg.data.positive_fraction, orientation)
    train_set.side_labels = side_labels(cfg, manifest, split["train"], labels)
    ckdir = work / f"{card['name']}-{resolution}" / (variant.replace(" ", "_").replace("/", "-") or "bundle")
    ckdir.mkdir(parents=True, exist_ok=True)
    req = TrainRequest(manifest=Path(card["training"]["manifest"]), out=ckdir, config=cfg, seed=seed)
    torch.manual_seed(seed)
    net, seconds = fit_classifier("cam_classifier", cc, train_set, NoiseSchedule(cfg.diffusion),
                                  seed + 2, torch.device("cpu"), ckdir, req, orientation)
    net.eval().requires_grad_(False)
    x, truth, negatives = validation_slices(card, cfg, resolution)
    layercam = on_sides(LayerCAM(net, cfg.maps.cam_layers), cc.sides, orientation)
    cam = torch.cat([layercam(b)[0] for b in x.split(16)])
    on = threshold_maps(cam, "otsu") & body_mask(x, cfg.data.body_threshold)
    hits = (on & truth).flatten(1).sum(1).float()
    cpu, judge = torch.device("cpu"), sided(net, cc.sides, orientation)
    return {
        "resolution": resolution,
        "variant": variant,
        "training_s": round(seconds, 1),
        "positive_slices": len(x),
        "accuracy_positive": float((slice_presence(judge, x, cpu) >= 0.5).float().mean()),
        "accuracy_negative": float((slice_presence(judge, negatives, cpu) < 0.5).float().mean()),
        "pointing": float(np.mean(pointing(cam.numpy(), truth.numpy(), np.arange(len(x))))),
        "target_share_of_slice": float(truth.float().mean()),
        "otsu_precision": float(hits.sum() / on.sum().clamp_min(1)),
        "otsu_dice": float(metrics.slice_dice(on, truth).mean()),
    }


def markdown(name: str, rows: list[dict]) -> str:
    lines = [f"# CAM localisation: {name}", "",
             f"CAM classifier retrained per resolution on the bundle's training split (slice labels only), scored on its "
             f"validation patients; CPU ({platform.processor() or platform.machine()}), "
             f"{torch.get_num_threads()} threads. Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`", "",
             "| resolution | settings changed | training s | positive slices | accuracy pos / neg | pointing "
             "| target share of slice | Otsu precision | Otsu Dice |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changed = f"`{r['variant']}`" if r.get("variant") else "(the bundle's)"
        lines.append(f"| {r['resolution']} | {changed} | {r['training_s']:.0f} | {r['positive_slices']} "
                     f"| {r['accuracy_positive']:.3f} / {r['accuracy_negative']:.3f} | {r['pointing']:.3f} "
                     f"| {r['target_share_of_slice']:.4f} | {r['otsu_precision']:.3f} | {r['otsu_dice']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--resolution", type=int, nargs="+", default=[64, 128])
    p.add_argument("--work", type=Path, default=Path(".cam_localisation"), help="checkpoints (resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", action="append", default=None,
                   help='settings for one more row per resolution, e.g. "cam_classifier.flips=false" (repeatable; "": the bundle\'s)')
    p.add_argument("--out", type=Path, required=True, help="markdown report; a .json beside it")
    args = p.parse_args()
    rows = [measure(args.bundle, r, args.work, args.seed, v) for r in args.resolution for v in (args.variant or [""])]
    name = read_card(args.bundle)["name"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out, markdown(name, rows))
    atomic.write_json(args.out.with_suffix(".json"), rows)
    print(markdown(name, rows))


if __name__ == "__main__":
    main()

"""Does AME-CAM point at the target where LayerCAM does not? Validation patients only.

Trains, on a task's training split (slice labels only), at each requested resolution:
the clean-slice classifier of `cldf train` (stage 3, explained by LayerCAM) and the
AME-CAM networks (`train_ame`: multi-exit classifier, checkpoint with the best AUC
on the validation patients' slice labels, then the aggregator). Scores both on the
validation patients: the pointing game (share of positive slices whose map maximum
lies on the target), precision and Dice of the map's per-slice Otsu mask inside the
body, the mean map value on the target over that in the rest of the body (the sign
check: above 1 means high on the target), and the balanced accuracy of the slice
classifier (present / absent at 0.5). For AME-CAM it also scores each exit map and
the fused map alone. Validation masks are read here for scoring only. Checkpoints
and finished rows go under ``--work``, so an interrupted run resumes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ame_cam_localisation.py \\
        --data ../shared/data/btcv/manifest.json --target 2,3 --channels CT --task kidney \\
        --resolution 64 --set ame_cam.hard_negatives=0.5 --set ame_cam.top_fraction=0.05 \\
        --out benchmarks/ame_cam_localisation-kidney.md

The patient split is the one `cldf train --seed SEED` makes of ``--data`` (or ``--split-json``);
``--bundle DIR`` takes data, target, channels, split and settings from a bundle's card instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cldf import atomic, cases, metrics
from cldf.ame_cam import AmeCam, minmax, upsample
from cldf.bundle import read_card
from cldf.config import AmeCamConfig, CLDFConfig, preset
from cldf.evaluation.evaluate import pointing
from cldf.manifest import load_manifest, split_cases
from cldf.maps import AmeCamMap, LayerCAM
from cldf.models import NoiseSchedule
from cldf.seeds import body_mask, threshold_maps
from cldf.slice_maps import slice_presence
from cldf.trainer.slice_set import load_slice_set
from cldf.trainer.stages import TrainRequest, fit_classifier
from cldf.trainer.train_ame import fit_ame_cam

CPU = torch.device("cpu")
INFERENCE_ONLY = ("map_exits",)  # AME-CAM settings that need no retraining


def task_from_args(args: argparse.Namespace) -> dict:
    """Manifest, target labels, split and settings from ``--bundle`` or from the explicit options."""
    if args.bundle:
        card = read_card(args.bundle)
        return {"name": args.task or card["name"], "manifest": Path(card["training"]["manifest"]),
                "labels": card["task"]["mask_labels"], "split": card["training"]["split"],
                "config": CLDFConfig.from_dict(card["config"])}
    if not (args.data and args.channels and args.task):
        raise SystemExit("give --bundle, or all of --data, --channels and --task")
    cfg = preset("cpu")
    cfg.data.channels = args.channels.split(",")
    labels = [int(v) for v in args.target.split(",")] if args.target else None
    split = (json.loads(args.split_json.read_text()) if args.split_json
             else split_cases(load_manifest(args.data), cfg.data.split_fractions, args.seed))
    return {"name": args.task, "manifest": args.data, "labels": labels, "split": split, "config": cfg}


def validation_slices(task: dict, cfg: CLDFConfig, resolution: int):
    """Validation patients' positive slices with their target masks, and their negative slices."""
    return cases.scored_slices(load_manifest(task["manifest"]), task["split"]["val"], task["labels"], cfg.data, resolution)


def map_scores(cam: torch.Tensor, x: torch.Tensor, truth: torch.Tensor, cfg: CLDFConfig) -> dict:
    """Pointing, Otsu precision / Dice inside the body, and the on-target / off-target mean ratio."""
    body = body_mask(x, cfg.data.body_threshold)
    on = threshold_maps(cam, "otsu") & body
    hits = (on & truth).flatten(1).sum(1).float()
    off = body & ~truth
    return {
        "pointing": float(np.mean(pointing(cam.numpy(), truth.numpy(), np.arange(len(x))))),
        "otsu_precision": float(hits.sum() / on.sum().clamp_min(1)),
        "otsu_dice": float(metrics.slice_dice(on, truth).mean()),
        "target_over_body": float(cam[truth].mean() / cam[off].mean().clamp_min(1e-6)),
    }


def ame_components(net: AmeCam, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each exit map and the fused map alone, min-max per slice (diagnostics)."""
    out: dict[str, list[torch.Tensor]] = {f"exit {k + 1}": [] for k in range(4)} | {"fused": []}
    with torch.inference_mode():
        for b in x.split(32):
            _, maps = net.classifier(b)
            a = upsample(maps, tuple(b.shape[-2:]))
            fused, _ = net.aggregator(b, a)
            for k in range(4):
                out[f"exit {k + 1}"].append(minmax(a[:, k : k + 1])[:, 0])
            out["fused"].append(minmax(fused[:, None])[:, 0])
    return {k: torch.cat(v) for k, v in out.items()}


def measure(task: dict, resolution: int, work: Path, seed: int, layercam: bool = True) -> list[dict]:
    cfg = CLDFConfig.from_dict(task["config"].to_dict())
    cfg.data.resolution = resolution
    cfg.ame_cam.resolution = 0
    d = cfg.to_dict()
    default = AmeCamConfig().__dict__
    changed = {k: v for k, v in cfg.ame_cam.__dict__.items() if k != "resolution" and v != default[k]}
    trained = {k: v for k, v in changed.items() if k not in INFERENCE_ONLY}
    tag = _tag([d["data"], d["cam_classifier"], changed, d["maps"]["cam_layers"]] + ([] if layercam else ["ame only"]))
    done_path = work / f"{task['name']}-{resolution}-{tag}.json"
    if done_path.is_file():
        return json.loads(done_path.read_text())
    manifest = load_manifest(task["manifest"])

    def slice_set(ids):
        return load_slice_set(manifest, ids, cfg.data.channels, resolution, tuple(cfg.data.percentiles),
                              task["labels"], cfg.data.positive_fraction)

    train_set, val_labels = slice_set(task["split"]["train"]), slice_set(task["split"]["val"])
    # each method's checkpoints depend on its own settings only: AME-CAM variants share one LayerCAM classifier
    ck_layercam = work / f"{task['name']}-{resolution}-layercam-{_tag([d['data'], d['cam_classifier']])}"
    ck_ame = work / f"{task['name']}-{resolution}-ame-{_tag([d['data'], trained])}"
    for ck in (ck_layercam, ck_ame):
        ck.mkdir(parents=True, exist_ok=True)
    req = TrainRequest(manifest=Path(task["manifest"]), out=ck_layercam, config=cfg, seed=seed)
    x, truth, negatives = validation_slices(task, cfg, resolution)
    common = {"task": task["name"], "resolution": resolution, "positive_slices": len(x),
              "negative_slices": len(negatives), "target_share_of_slice": float(truth.float().mean())}

    rows = [] if not layercam else [common | {"method": "LayerCAM", **_layercam(cfg, train_set, x, truth, negatives, seed,
                                                                                 ck_layercam, req)}]
    variant = ", ".join(f"{k}={v}" for k, v in changed.items())
    label = f"AME-CAM ({variant})" if variant else "AME-CAM"
    t0 = time.time()
    ame, card = fit_ame_cam(cfg, train_set, val_labels, seed + 3, CPU, ck_ame, req)
    cam = AmeCamMap(ame)
    maps, p_pos = (torch.cat(t) for t in zip(*[cam(b) for b in x.split(32)]))
    p_neg = torch.cat([cam(b)[1] for b in negatives.split(32)])
    rows.append(common | {"method": label, "training_s": round(sum(card["wall_clock_s"].values()), 1),
                          "chosen_step": card["chosen_step"], "auc_history": card["auc_history"],
                          "wall_s": round(time.time() - t0, 1), **_accuracy(p_pos, p_neg), **map_scores(maps, x, truth, cfg)})
    for name, m in ame_components(ame, x).items():
        rows.append(common | {"method": f"{label}: {name} alone", **map_scores(m, x, truth, cfg)})
    atomic.write_json(done_path, rows)
    return rows


def _layercam(cfg: CLDFConfig, train_set, x, truth, negatives, seed: int, ckdir: Path, req: TrainRequest) -> dict:
    """Stage 3 of `cldf train` (the clean-slice classifier) and its LayerCAM's scores."""
    torch.manual_seed(seed)
    net, seconds = fit_classifier("cam_classifier", cfg.cam_classifier, train_set, NoiseSchedule(cfg.diffusion),
                                  seed + 2, CPU, ckdir, req)
    net.eval().requires_grad_(False)
    layercam = torch.cat([LayerCAM(net, cfg.maps.cam_layers)(b)[0] for b in x.split(16)])
    return {"training_s": round(seconds, 1),
            **_accuracy(slice_presence(net, x, CPU), slice_presence(net, negatives, CPU)),
            **map_scores(layercam, x, truth, cfg)}


def _tag(settings) -> str:
    """Short hash of some settings: a folder per distinct configuration."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def _accuracy(p_pos: torch.Tensor, p_neg: torch.Tensor) -> dict:
    acc_pos, acc_neg = float((p_pos >= 0.5).float().mean()), float((p_neg < 0.5).float().mean())
    return {"accuracy_positive": acc_pos, "accuracy_negative": acc_neg, "balanced_accuracy": (acc_pos + acc_neg) / 2}


def markdown(task: dict, rows: list[dict]) -> str:
    split = task["split"]
    lines = [f"# AME-CAM localisation: {task['name']}", "",
             f"Trained on {len(split['train'])} training patients (slice labels only), scored on the "
             f"{len(split['val'])} validation patients ({', '.join(split['val'])}); never on test patients. "
             f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s), shared.",
             "AME-CAM's classifier checkpoint is the one with the best AUC on the validation patients' slice "
             "labels, so its balanced accuracy here is optimistic; pointing, precision and Dice were not "
             "selected on. Settings not named are `cldf train`'s (preset `cpu`, or the bundle's): 1,000 "
             "classifier steps of 32 slices, widths (32, 64, 128, 256), stem stride 2, 300 aggregator steps.", "",
             "| resolution | method | training s | balanced acc. (pos / neg) | pointing | Otsu precision | Otsu Dice "
             "| target / body mean |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"{r['balanced_accuracy']:.3f} ({r['accuracy_positive']:.3f} / {r['accuracy_negative']:.3f})"
               if "balanced_accuracy" in r else "")
        train_s = f"{r['training_s']:.0f}" if "training_s" in r else ""
        lines.append(f"| {r['resolution']} | {r['method']} | {train_s} | {acc} | {r['pointing']:.3f} "
                     f"| {r['otsu_precision']:.3f} | {r['otsu_dice']:.3f} | {r['target_over_body']:.2f} |")
    first = rows[0]
    lines += ["", f"{first['positive_slices']} positive validation slices (target > 1 % of the slice), "
              f"{first['negative_slices']} negative; the target covers {first['target_share_of_slice']:.1%} of a "
              "positive slice on average. AME-CAM's AUC history (step, AUC): "
              + "; ".join(f"{r['method']} at {r['resolution']}: {r['auc_history']}" for r in rows if "auc_history" in r),
              "", "Reproduce (rows are cached under `--work`; each command adds its rows with `--append`):", ""]
    commands = dict.fromkeys(r["command"] for r in rows if "command" in r)
    lines += [f"    {c}" for c in sorted(commands, key=lambda c: "--append" in c)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="take data, target, channels, split and settings from this bundle")
    p.add_argument("--data", type=Path, help="dataset manifest")
    p.add_argument("--target", help="mask values forming the target, e.g. 2,3")
    p.add_argument("--channels", help="channel names in order, e.g. CT")
    p.add_argument("--split-json", type=Path, help='{"train": [...], "val": [...], "test": [...]} case ids '
                   "(default: the split `cldf train --seed SEED` makes of --data)")
    p.add_argument("--task", help="name of the task (work folder, report title)")
    p.add_argument("--resolution", type=int, nargs="+", default=[64])
    p.add_argument("--no-layercam", type=int, nargs="*", default=[], metavar="R",
                   help="resolutions at which LayerCAM's classifier is not trained (it is slow at 128)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change one setting, as in `cldf train --set` (e.g. ame_cam.steps=2000)")
    p.add_argument("--work", type=Path, default=Path(".ame_cam_localisation"), help="checkpoints (resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="markdown report; a .json beside it")
    p.add_argument("--append", action="store_true", help="keep the rows already in --out's .json (other settings)")
    args = p.parse_args()
    task = task_from_args(args)
    from cldf.config import apply_overrides

    task["config"] = apply_overrides(task["config"], args.overrides)
    rows = [row for r in args.resolution for row in measure(task, r, args.work, args.seed, r not in args.no_layercam)]
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ame_cam_localisation.py " + shlex.join(sys.argv[1:])
    rows = [r | {"command": command} for r in rows]
    json_path = args.out.with_suffix(".json")
    if args.append and json_path.is_file():
        new = {(r["resolution"], r["method"]) for r in rows}
        rows = [r for r in json.loads(json_path.read_text()) if (r["resolution"], r["method"]) not in new] + rows
        rows.sort(key=lambda r: (r["resolution"], r["method"] != "LayerCAM"))  # stable: earlier commands' rows first
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out, markdown(task, rows))
    atomic.write_json(json_path, rows)
    print(markdown(task, rows))


if __name__ == "__main__":
    main()

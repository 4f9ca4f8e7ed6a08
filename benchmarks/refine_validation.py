"""Does LiteMedSAM refinement (`cldf.refine`) help CLDF's masks? Validation patients only.

For each bundle, segments its recorded validation patients (``training.split.val``
in bundle.json) with `Segmenter` as `cldf segment` does, keeps the mask as resized
from the bundle's grid ("none"), and refines it with every margin / growth limit
of the grid below. The image encoder runs once per slice; each setting only reruns
the prompt decoder, which is what `SamRefiner.refine` gives with that setting
(checked on the first patient against ``Segmenter(refine="sam")``).
Scores: Dice on slices whose target covers more than the bundle's positive
fraction (1 %), mean ± std over slices, and 3D Dice per patient. Also times the
image encoder per slice with 1 and 2 torch threads, with the load average.

    .venv/bin/python benchmarks/refine_validation.py   # writes benchmarks/refine-validation.md and .json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance

from cldf import cases, metrics
from cldf.bundle import load_bundle
from cldf.config import RefineConfig
from cldf.manifest import load_manifest
from cldf.refine import SamRefiner, load_litemedsam
from cldf.segment import Segmenter
from cldf.slices import from_slices, to_slices

MODELS = Path("CLDFSegmentation/Resources/Models")
BUNDLES = (MODELS / "brain-mri-flair-t1", MODELS / "abdomen-ct-liver")
MARGINS_MM = (0.0, 3.0, 6.0, 10.0)
MAX_GROW_MM = (None, 3.0, 10.0)
ORACLE_SLICES = 3  # per patient, positive slices prompted with the true mask through the grid


def settings() -> list[tuple[str, RefineConfig | None]]:
    rows: list[tuple[str, RefineConfig | None]] = [("none (CLDF mask resized from the 64 x 64 grid)", None)]
    for m in MARGINS_MM:
        for g in MAX_GROW_MM:
            rows.append((f"sam, margin {m:g} mm, max grow {'none' if g is None else f'{g:g} mm'}",
                         RefineConfig(method="sam", margin_mm=m, max_grow_mm=g)))
    return rows


def through_the_grid(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A ``(Z, Y, X)`` mask as the product's grid gives it: pad square, resize to R, 0/1 there, back."""
    small = to_slices(mask[None].astype(np.float32) * 2 - 1, resolution)[:, 0] > 0
    return from_slices(small, mask.shape[1:], mode="mask")


def surface_distance(p: np.ndarray, g: np.ndarray, spacing) -> float:
    """Symmetric mean surface distance (mm) of two ``(Y, X)`` masks."""
    return float(compute_average_surface_distance(torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None],
                                                  symmetric=True, spacing=spacing))


def refine_all(refiner: SamRefiner, image: np.ndarray, coarse: np.ndarray, spacing, configs) -> list[np.ndarray]:
    """Each config's refined mask of a volume, the image encoder run once per slice with a non-empty mask."""
    outs = [coarse.copy() for _ in configs]
    todo = np.flatnonzero(coarse.any(axis=(1, 2)))
    for start in range(0, len(todo), refiner.batch_size):
        chunk = todo[start : start + refiner.batch_size]
        emb = refiner.embed(image[chunk])
        for out, cfg in zip(outs, configs):
            out[chunk] = refiner.decode(emb, coarse[chunk], spacing, cfg)
    return outs


def measure(bundle_dir: Path, max_cases: int | None = None, check: bool = True, progress: bool = True) -> dict:
    bundle = load_bundle(bundle_dir)
    card, cfg = bundle.card, bundle.config
    manifest = load_manifest(card["training"]["manifest"])
    rows = settings()
    configs = [replace(cfg.refine, method="sam", margin_mm=c.margin_mm, max_grow_mm=c.max_grow_mm) for _, c in rows[1:]]
    seg = Segmenter(bundle, "cpu", refine="none")
    refiner = SamRefiner(replace(cfg.refine, method="sam"), "cpu")
    channel = bundle.channels.index(cfg.refine.channel or bundle.channels[0])
    per_slice = {name: [] for name, _ in rows}
    per_case = {name: [] for name, _ in rows}
    oracle = {name: [] for name, _ in rows}  # (Dice, mean surface distance) per slice
    refined_slices, seconds = 0, 0.0
    case_ids = card["training"]["split"]["val"][:max_cases]
    for n, cid in enumerate(case_ids):
        case = manifest.case(cid)
        inputs = {k: v for k, v in case.channels.items() if k in bundle.channels}
        coarse = seg.start(inputs).run(progress=False).mask.astype(bool)
        read = cases.read_case(inputs, cfg.data, reorient_to_bundle=False)  # the result is on the input's grid
        image, reference = read.normalised[channel], read.reference  # as SegmentationJob gives the refiner
        spacing = (reference.GetSpacing()[1], reference.GetSpacing()[0])
        t0 = time.perf_counter()
        masks = [coarse] + refine_all(refiner, image, coarse, spacing, configs)
        seconds += time.perf_counter() - t0
        refined_slices += int(coarse.any(axis=(1, 2)).sum())
        if check and n == 0:  # the offline path gives what `cldf segment --refine sam` gives with the bundle's setting
            product = Segmenter(bundle, "cpu", refine="sam").start(inputs).run(progress=False)
            same = [i for i, c in enumerate(configs)
                    if (c.margin_mm, c.max_grow_mm) == (cfg.refine.margin_mm, cfg.refine.max_grow_mm)]
            assert np.array_equal(product.coarse_mask.astype(bool), coarse), "coarse masks differ"
            assert not same or np.array_equal(product.mask.astype(bool), masks[1 + same[0]]), "refinement differs"
        gt = cases.read_truth(case.mask, card["task"]["mask_labels"], cfg.data, cid, reorient_to_bundle=False)
        positive = np.flatnonzero(gt.mean(axis=(1, 2)) > cfg.data.positive_fraction)
        for (name, _), m in zip(rows, masks):
            per_slice[name] += [metrics.dice(m[z], gt[z]) for z in positive]
            per_case[name].append(metrics.dice(m, gt))
        # the same settings prompted by the true mask through the bundle's grid: does SAM sharpen the grid's edges?
        some = positive[np.linspace(0, len(positive) - 1, min(ORACLE_SLICES, len(positive))).astype(int)]
        grid = through_the_grid(gt[some], cfg.data.resolution)
        for (name, _), m in zip(rows, [grid] + refine_all(refiner, image[some], grid, spacing, configs)):
            oracle[name] += [(metrics.dice(a, g), surface_distance(a, g, spacing)) for a, g in zip(m, gt[some])]
        if progress:
            print(f"{bundle_dir.name} {cid}: {len(positive)} positive slices, "
                  f"{int(coarse.any(axis=(1, 2)).sum())} slices with a mask", flush=True)
    return {
        "bundle": bundle_dir.name,
        "cases": case_ids,
        "positive_slices": len(per_slice[rows[0][0]]),
        "slices_refined": refined_slices,
        "seconds_refining": round(seconds, 1),
        "rows": [{"setting": name, "slice_dice": float(np.mean(per_slice[name])),
                  "slice_dice_std": float(np.std(per_slice[name])), "dice_3d": float(np.mean(per_case[name])),
                  "oracle_slice_dice": float(np.mean([d for d, _ in oracle[name]])),
                  "oracle_surface_mm": float(np.mean([m for _, m in oracle[name]]))}
                 for name, _ in rows],
        "oracle_slices": len(oracle[rows[0][0]]),
    }


def encoder_seconds(threads: int, slices: int = 8, repeats: int = 2) -> dict[str, float]:
    """Wall-clock and CPU seconds per slice of LiteMedSAM's image encoder at 256 x 256, best of ``repeats``."""
    torch.set_num_threads(threads)
    net = load_litemedsam()
    x = torch.rand(slices, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    wall, cpu = float("inf"), float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            net.image_encoder(x)
            wall = min(wall, (time.perf_counter() - t0) / slices)
            cpu = min(cpu, (time.process_time() - c0) / slices)
    return {"wall": wall, "cpu": cpu}


def markdown(results: list[dict], timing: dict) -> str:
    lines = ["# LiteMedSAM refinement of CLDF masks, validation patients", "",
             "`.venv/bin/python benchmarks/refine_validation.py` (shipped bundles, CPU, validation patients only). "
             "**CLDF masks**: the bundle's masks as `cldf segment` makes them, refined or not; Dice on slices with "
             "target > 1 % (mean ± std over slices) and 3D Dice (mean over patients). **True mask through the grid**: "
             f"on {ORACLE_SLICES} positive slices per patient, the ground truth padded square, resized to the bundle's "
             "grid, made 0/1 there and resized back (what the grid alone does to a perfect mask), refined or not; "
             "slice Dice and symmetric mean surface distance to the ground truth (mm).", ""]
    for r in results:
        lines += [f"## {r['bundle']} ({len(r['cases'])} validation patients, {r['positive_slices']} positive slices, "
                  f"{r['slices_refined']} slices with a CLDF mask refined; {r['oracle_slices']} slices for the "
                  "true mask)", "",
                  "| setting | CLDF masks: slice Dice | CLDF masks: 3D Dice | true mask through the grid: slice Dice "
                  "| true mask through the grid: surface distance (mm) |", "|---|---|---|---|---|"]
        best = max(x["slice_dice"] for x in r["rows"])
        for x in r["rows"]:
            d = f"{x['slice_dice']:.3f} ± {x['slice_dice_std']:.3f}"
            lines.append(f"| {x['setting']} | {'**' + d + '**' if x['slice_dice'] == best else d} | {x['dice_3d']:.3f} "
                         f"| {x['oracle_slice_dice']:.3f} | {x['oracle_surface_mm']:.2f} |")
        lines.append("")
    lines += ["## Cost", "",
              f"LiteMedSAM's image encoder (256 x 256, about 75 GFLOP per slice) on the CPU: "
              f"{timing['1']['wall']:.2f} s per slice with 1 torch thread ({timing['1']['cpu']:.2f} CPU-seconds), "
              f"{timing['2']['wall']:.2f} s with 2 ({timing['2']['cpu']:.2f} CPU-seconds of both threads); load "
              f"average {timing['load']} on {os.cpu_count()} cores while measuring (the machine was shared: the "
              "CPU-seconds are the steadier number). The prompt decoder adds about a tenth of that per box.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", dest="bundles", action="append", type=Path, default=None,
                   help="repeatable (default: the shipped brain and liver bundles)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the validation runs")
    p.add_argument("--max-cases", type=int, default=None, help="only the first N validation patients (a quick check)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/refine-validation.md"))
    args = p.parse_args()
    timing = {"load": " / ".join(f"{v:.1f}" for v in os.getloadavg())}
    timing |= {str(t): encoder_seconds(t) for t in (1, 2)}
    torch.set_num_threads(args.threads)
    results = [measure(b, args.max_cases, check=i == 0) for i, b in enumerate(args.bundles or BUNDLES)]
    args.out.write_text(markdown(results, timing))
    args.out.with_suffix(".json").write_text(json.dumps({"timing": timing, "results": results}, indent=1))
    print(args.out.read_text())


if __name__ == "__main__":
    main()

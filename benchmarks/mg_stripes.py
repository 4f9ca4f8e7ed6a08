"""Mean-gradient stripes: the map before and after sub-stride shifts (`maps.mg_shift_period`).

The noisy classifier downsamples with strided convolutions, so the gradient of
one input is periodic in the stride: the mean-gradient map shows stripes. With
a shift period p, each timestep's noisy input is rolled by another offset of a
p x p lattice and its gradient rolled back, so averaging over timesteps
averages the stride pattern out. This script scores the map with each period
on a bundle's validation patients (positive slices, target > 1 %, on the
bundle's grid): the pointing game, the Dice of its per-slice Otsu mask, and a
stripe index (spectral energy at the stride's frequencies 16 and 32 cycles
per 64 pixels along each axis, over the mean of the neighbouring
frequencies: 1 means no peak). It also draws one slice with each period.
Validation masks are read here for scoring and drawing only.

    .venv/bin/python benchmarks/mg_stripes.py --bundle CLDFSegmentation/Resources/Models/brain-mri-flair-t1 \\
        --periods 0 4 --out benchmarks/mg_stripes-brain.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from cldf import cases, metrics
from cldf.bundle import load_bundle
from cldf.evaluation.demo import GAP, heat, to_unit
from cldf.manifest import load_manifest
from cldf.maps import MeanGradient
from cldf.seeds import threshold_maps


def validation_positives(bundle, manifest_path: Path | None) -> tuple[torch.Tensor, np.ndarray]:
    """Positive validation slices at the bundle's resolution and their target masks on that grid."""
    card, cfg = bundle.card, bundle.config
    manifest = load_manifest(manifest_path or card["training"]["manifest"])
    x, truths, _ = cases.scored_slices(manifest, card["training"]["split"]["val"], card["task"]["mask_labels"],
                                       cfg.data, cfg.data.resolution)
    return x, truths.numpy()


def stripe_index(maps: np.ndarray) -> float:
    """Mean ratio of spectral amplitude at frequencies R/4 and R/2 (both axes) to that of their neighbours."""
    spectrum = np.abs(np.fft.fft2(maps - maps.mean(axis=(1, 2), keepdims=True)))
    r = maps.shape[-1]
    ratios = []
    for f in (r // 4, r // 2):
        near = [f + d for d in (-2, -1, 1, 2) if 0 < f + d < r]
        ratios.append(spectrum[:, 0, f] / spectrum[:, 0, near].mean(axis=1))
        ratios.append(spectrum[:, f, 0] / spectrum[:, near, 0].mean(axis=1))
    return float(np.mean(ratios))


def score(maps: torch.Tensor, truths: np.ndarray) -> dict:
    a = maps.numpy()
    otsu = threshold_maps(maps, "otsu").numpy()
    return {"pointing": float(np.mean([g.flat[m.argmax()] for m, g in zip(a, truths)])),
            "otsu_dice": float(metrics.slice_dice(otsu, truths).mean()), "stripe_index": stripe_index(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--data", type=Path, default=None, help="manifest (default: the one recorded in the bundle)")
    ap.add_argument("--periods", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--out", required=True, type=Path, help="Markdown; JSON and a PNG beside it")
    args = ap.parse_args()
    torch.manual_seed(0)
    bundle = load_bundle(args.bundle)
    x, truths = validation_positives(bundle, args.data)
    cfg = bundle.config.maps
    rows, maps = {}, {}
    for p in args.periods:
        mg = MeanGradient(bundle.noisy_classifier, bundle.schedule, cfg.mg_timesteps, cfg.noise_seed, p)
        maps[p] = torch.cat([mg(b) for b in x.split(16)])
        rows[p] = score(maps[p], truths)
        print(p, rows[p], flush=True)
    lines = [f"# Mean-gradient stripes, {bundle.card.get('name')}: {len(x)} positive validation slices",
             "", "| shift period | pointing | Otsu Dice | stripe index |", "|---|---|---|---|"]
    lines += [f"| {p or 'none'} | {r['pointing']:.3f} | {r['otsu_dice']:.3f} | {r['stripe_index']:.2f} |" for p, r in rows.items()]
    lines += ["", f"Reproduce: `.venv/bin/python benchmarks/mg_stripes.py --bundle {args.bundle} --periods "
              f"{' '.join(map(str, args.periods))} --out {args.out}`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps({"slices": len(x), "periods": rows}, indent=1) + "\n")
    z = int(truths.sum(axis=(1, 2)).argmax())  # the slice with the most target
    panels = [np.repeat(to_unit(x[z, 0].numpy())[..., None], 3, axis=-1)] + [heat(maps[p][z].numpy()) for p in args.periods]
    row = np.concatenate([np.pad(q, ((0, 0), (0, GAP), (0, 0)), constant_values=1.0) for q in panels], axis=1)[:, :-GAP]
    rgb = (np.kron(row, np.ones((4, 4, 1))) * 255).round().astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()

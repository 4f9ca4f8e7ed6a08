"""Whole-volume rules for a bundle's student, on its validation patients: the size rule the bundles ship (components
with at least a fraction of the largest's voxels), that rule with components also kept by their own evidence (their
mean student probability), and the student's threshold. Ground truth is read for scoring only.

    .venv/bin/python benchmarks/student_rules.py CLDFSegmentation/Resources/Models/abdomen-ct-kidney \
        ../shared/data/btcv/manifest.json

Writes ``benchmarks/student_rules-<bundle>.md``. Each patient's probabilities (and, for a bundle that refines with
LiteMedSAM, its refined mask at the default threshold) are kept in ``benchmarks/.student_rules/`` for reruns.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from cldf import cases, metrics
from cldf.bundle import load_bundle
from cldf.config.grids import STUDENT_RULES, STUDENT_THRESHOLDS
from cldf.device import resolve_device
from cldf.manifest import load_manifest
from cldf.postprocess import component_sizes
from cldf.slice_job import bundle_refiner
from cldf.student import probability_volume

HERE = Path(__file__).resolve().parent
CONFIDENCES = [1.01, 0.95, 0.9, 0.85, 0.8, 0.7]  # 1.01: size alone
FRACTIONS = [*STUDENT_RULES, 1.0]


def patient(bundle, manifest, cid: str, cache: Path) -> dict[str, np.ndarray]:
    """A validation patient's student probabilities (8-bit), the mask the rules start from, and the truth."""
    path = cache / f"{cid}.npz"
    if not path.is_file():
        cfg, case = bundle.config, manifest.case(cid)
        read = cases.read_case(case.channels, cfg.data)
        probability = probability_volume(bundle, read, resolve_device("cpu"))
        mask = probability > cfg.student.threshold
        if cfg.student.refine == "sam":
            refiner, channel = bundle_refiner(bundle, "sam", 8)
            mask = refiner.refine(read.normalised[channel], mask.astype(np.uint8), read.in_plane_spacing) > 0
        truth = cases.read_truth(case.mask, bundle.card["task"]["mask_labels"], cfg.data, cid)  # scoring only
        np.savez_compressed(path, prob=np.round(probability * 255).astype(np.uint8), mask=mask, truth=truth)
    saved = np.load(path)
    return {"prob": saved["prob"].astype(np.float32) / 255, "mask": saved["mask"], "truth": saved["truth"] > 0}


def evidence_rule(mask: np.ndarray, prob: np.ndarray, fraction: float, confidence: float) -> np.ndarray:
    """Components with ``fraction`` of the largest's voxels, or whose mean probability is at least ``confidence``."""
    labels, sizes = component_sizes(mask)
    if sizes.max() == 0:
        return mask
    mean = np.asarray(ndimage.mean(prob, labels, np.arange(len(sizes))))
    keep = (sizes >= fraction * sizes.max()) | (mean >= confidence)
    keep[0] = False
    return keep[labels]


def table(scores: dict[tuple, list[tuple[float, list[float]]]], header: str) -> list[str]:
    rows = []
    for key, per_case in scores.items():
        dice_3d = float(np.mean([d for d, _ in per_case]))
        slice_dice = float(np.mean([s for _, ss in per_case for s in ss]))
        rows.append((round((dice_3d + slice_dice) / 2, 4), key, dice_3d, slice_dice, [d for d, _ in per_case]))
    rows.sort(key=lambda r: -r[0])
    lines = [header, "|---|---|---|---|---|"]
    for score, key, d3, sd, per_case in rows[:8]:
        lines.append(f"| {' / '.join(map(str, key))} | {score:.4f} | {d3:.4f} | {sd:.4f} | "
                     f"{', '.join(f'{d:.3f}' for d in per_case)} |")
    return lines


def main(bundle_dir: Path, manifest_path: Path) -> None:
    bundle, manifest = load_bundle(bundle_dir), load_manifest(manifest_path)
    cfg = bundle.config.student
    cache = HERE / ".student_rules" / bundle_dir.name
    cache.mkdir(parents=True, exist_ok=True)
    evidence: dict[tuple, list] = {}
    thresholds: dict[tuple, list] = {}
    val = bundle.card["student"]["validation_cases"]
    for cid in val:
        p = patient(bundle, manifest, cid, cache)
        for fraction, confidence in itertools.product(FRACTIONS, CONFIDENCES):
            m = evidence_rule(p["mask"], p["prob"], fraction, confidence)
            evidence.setdefault((fraction, confidence), []).append(
                (metrics.dice(m, p["truth"]), metrics.target_slice_dice(m, p["truth"])))
        if cfg.refine != "sam":  # with SAM the threshold only moves SAM's prompt; see the bundle's own table
            for threshold, fraction in itertools.product(STUDENT_THRESHOLDS, STUDENT_RULES):
                m = evidence_rule(p["prob"] > threshold, p["prob"], fraction, 1.01)
                thresholds.setdefault((threshold, fraction), []).append(
                    (metrics.dice(m, p["truth"]), metrics.target_slice_dice(m, p["truth"])))
    head = "| {} | score | 3D Dice | Dice, slices with target | 3D Dice per patient |"
    lines = [f"# The student's whole-volume rules: {bundle.id}", "",
             f"{len(val)} validation patients; score = mean of the per-case 3D Dice and the Dice over every slice "
             f"that holds any target. The student as shipped: refine {cfg.refine}, threshold {cfg.threshold}, "
             f"fraction {cfg.min_component_fraction}. Command: `.venv/bin/python benchmarks/student_rules.py "
             f"{bundle_dir} {manifest_path}`", "",
             "## A component kept by its size or by its own evidence (best 8)", "",
             *table(evidence, head.format("fraction of the largest / mean probability that keeps a component "
                                          "(1.01: never)")), ""]
    if thresholds:
        lines += ["## The student's threshold and size rule (best 8)", "",
                  *table(thresholds, head.format("threshold / fraction of the largest")), ""]
    out = HERE / f"student_rules-{bundle_dir.name}.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""`cldf figure`: the paper's Fig. 3 for one bundle: image | ground truth | CAM | MG | CDM | CLDF.

One row per test slice: the slice with the most target in each of the first
test cases. Maps are drawn in a heat scale, masks tinted in the segment's
colour. The CAM is the bundle's source (LayerCAM or AME-CAM, as chosen on
validation) and the CLDF mask is refined when the bundle says so, as `cldf
segment` gives them. Ground truth is read here for display only, as in `evaluate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import cases
from ..bundle import load_bundle
from ..defaults import DEVICE, TARGET_COLOR
from ..manifest import load_manifest
from ..segment import Segmenter
from ..slices import from_slices
from .demo import GAP, GROUND_TRUTH_COLOR, heat, overlay, radiological, to_unit, write_png
from .evaluate import case_ids_for_split

COLUMNS = ("image", "ground truth", "CAM", "MG", "CDM saliency", "CLDF")


def figure_rows(bundle_dir: Path, manifest_path: Path, split: str = "test", rows: int = 3,
                device: str = DEVICE) -> tuple[list[np.ndarray], list[tuple[str, int]]]:
    """The panels of each row as ``(H, W, 3)`` arrays in [0, 1], and the (case, slice) of each row."""
    bundle = load_bundle(bundle_dir)
    manifest = load_manifest(manifest_path)
    labels = bundle.card.get("task", {}).get("mask_labels")
    color = tuple(bundle.card.get("task", {}).get("color", TARGET_COLOR))
    seg = Segmenter(bundle, device, 1, maps=("cdm",))
    cfg = bundle.config.data
    out, where = [], []
    for cid in case_ids_for_split(bundle, manifest, split)[:rows]:
        case = manifest.case(cid)
        read = cases.read_case(case.channels, cfg)
        volume, ref, normalised = read.volume, read.reference, read.normalised
        gt = cases.read_truth(case.mask, labels, cfg, cid)
        z = int(gt.reshape(len(gt), -1).sum(axis=1).argmax())
        x = read.slices(cfg.resolution)[z : z + 1].to(seg.device)
        r = seg.cam_resolution
        x_cam = read.slices(r)[z : z + 1].to(seg.device) if r else None
        ids = torch.tensor([z])
        maps = seg.slice_maps(x, ids, x_cam=x_cam)
        hw = volume.shape[2:]
        mask = from_slices(seg.masks(x, maps, (0,))[0], hw, mode="mask")
        if seg.refiner is not None:
            spacing = read.in_plane_spacing
            mask = seg.refiner.refine(normalised[seg.refine_channel][z : z + 1], mask, spacing)
        back = {name: from_slices(m, hw)[0] for name, m in
                (("cam", maps.cam), ("mg", maps.mean_gradient), ("cdm", maps.extra["cdm"]))}
        grey = to_unit(volume[0, z].astype(np.float32))
        row = [np.repeat(grey[..., None], 3, axis=-1), overlay(grey, gt[z], GROUND_TRUTH_COLOR),
               heat(back["cam"]), heat(back["mg"]), heat(back["cdm"]),
               overlay(grey, mask[0], color)]
        out.append([radiological(p, ref.GetDirection()) for p in row])
        where.append((cid, z))
    return out, where


def make_figure(bundle_dir: Path, manifest_path: Path, out: Path, split: str = "test", rows: int = 3,
                device: str = DEVICE) -> list[tuple[str, int]]:
    """Write the figure as a PNG; returns the (case, slice) of each row."""
    panels, where = figure_rows(bundle_dir, manifest_path, split, rows, device)
    lines = []
    for row in panels:
        padded = [np.pad(p, ((0, GAP), (0, GAP), (0, 0)), constant_values=1.0) for p in row]
        lines.append(np.concatenate(padded, axis=1))
    rgb = (np.concatenate(lines, axis=0)[:-GAP, :-GAP] * 255).round().astype(np.uint8)
    write_png(rgb, out)
    return where

"""The student's training targets: the finished pipeline's masks of the training patients, where their slice
labels say the target is.

A training patient's slice labels are known, so they stand in for the pipeline's slice gate: every slice
labelled positive is segmented (with the bundle's refinement and rules), every slice labelled negative is an
empty target, and slices labelled ambiguous are left out. Masks are made from volumes and slice labels only;
no ground-truth pixel reaches them. Each case is written to disk once made, so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import atomic, cases
from ..bundle import Bundle
from ..images import read_images
from ..manifest import Manifest
from ..segment import SegmentationJob, Segmenter
from ..weak_labels import labels_in_orientation, weak_slice_labels

log = logging.getLogger(__name__)


@dataclass
class PseudoMask:
    """One training case on the bundle's grid: its slice labels ``(Z,)`` and the pipeline's mask ``(Z, Y, X)``."""

    labels: np.ndarray
    mask: np.ndarray


def label_gated(bundle: Bundle) -> Bundle:
    """The bundle with its slice gate open: on training patients the slice labels decide which slices hold target."""
    config = copy.deepcopy(bundle.config)
    config.cluster.presence_threshold = 0.0
    config.postprocess.min_presence = 0.0
    return replace(bundle, config=config)


def pipeline_id(bundle: Bundle) -> str:
    """A hash of what makes the pipeline's masks: every setting but the student's, and every weight file but its."""
    config = {k: v for k, v in bundle.config.to_dict().items() if k != "student"}
    files = {k: v for k, v in bundle.card.get("files", {}).items() if k != "student.safetensors"}
    return hashlib.sha256(json.dumps([config, files], sort_keys=True, default=str).encode()).hexdigest()[:16]


def pseudo_masks(bundle: Bundle, manifest: Manifest, case_ids: list[str], target_labels: list[int] | None,
                 device: str, folder: Path, progress: bool = True, seconds: float = math.inf) -> dict[str, PseudoMask]:
    """Every case's `PseudoMask`, from ``folder`` where made before by this bundle, else made and saved there.

    Once ``seconds`` have passed (a share of ``--time-budget``) no further case is made, the first one aside:
    the cases made so far are returned, with a warning.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tag = {"pipeline": pipeline_id(bundle), "target_labels": target_labels}
    tag_file = folder / "made-by.json"
    if tag_file.is_file() and json.loads(tag_file.read_text()) != tag:
        log.info("%s holds another bundle's pseudo-masks: making them again", folder)
        for old in folder.glob("*.npz"):
            old.unlink()
    atomic.write_json(tag_file, tag)
    seg = Segmenter(label_gated(bundle), device)
    out, start = {}, time.monotonic()
    for cid in tqdm(case_ids, desc="pseudo-masks", unit="case", disable=not progress):
        path = folder / f"{cid}.npz"
        if not path.is_file() and out and time.monotonic() - start > seconds:
            log.warning("pseudo-masks: the student's share of the time budget is spent; it trains on the %d of %d "
                        "training cases made so far", len(out), len(case_ids))
            break
        if not path.is_file():
            made = _pseudo_mask(seg, manifest, cid, target_labels)
            with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, labels=made.labels, mask=made.mask)
        with np.load(path) as stored:
            out[cid] = PseudoMask(stored["labels"], stored["mask"])
    return out


def _pseudo_mask(seg: Segmenter, manifest: Manifest, cid: str, target_labels: list[int] | None) -> PseudoMask:
    data = seg.cfg.data
    case = manifest.case(cid)
    stored = read_images({k: v for k, v in case.channels.items() if k in data.channels}, list(data.channels))
    read = cases.case_from_images(stored, data)
    labels = weak_slice_labels(case, target_labels, data.positive_fraction)
    labels = labels_in_orientation(labels, stored[data.channels[0]], data.orientation)
    positive = np.nonzero(labels == 1)[0]
    mask = np.zeros(read.volume.shape[1:], np.uint8)
    if len(positive):  # only the slices labelled positive go through the pipeline
        part = cases.CaseVolume(read.volume[:, positive], read.reference, read.ranges, read.normalised[:, positive])
        mask[positive] = SegmentationJob(seg, part).run(progress=False).mask
    return PseudoMask(labels, mask)

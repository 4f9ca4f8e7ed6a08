"""A mask may be empty, and the volume is one object: the per-slice rule, the 3D components, their selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cldf.bundle import load_bundle
from cldf.config import PostprocessConfig
from cldf.postprocess import SliceEvidence, keep_main_components, keep_slices, mask_similarity
from cldf.segment import Segmenter


def evidence(similarity, seeds, presence) -> SliceEvidence:
    return SliceEvidence(torch.tensor(similarity, dtype=torch.float32), torch.tensor(seeds),
                         torch.tensor(presence, dtype=torch.float32))


def test_the_default_rule_keeps_every_mask():
    e = evidence([0.1, float("nan"), -0.9], [0, 3, 0], [0.01, 0.9, 0.5])
    assert keep_slices(e, PostprocessConfig()).all()


@pytest.mark.parametrize("cfg, expected", [
    (PostprocessConfig(min_similarity=0.5), [False, True, False]),
    (PostprocessConfig(require_seeds=True), [False, True, True]),
    (PostprocessConfig(min_presence=0.6), [False, True, False]),
    (PostprocessConfig(min_similarity=0.5, require_seeds=True, min_presence=0.95), [False, False, False]),
])
def test_each_slice_rule_drops_the_slices_it_names(cfg, expected):
    e = evidence([0.2, 0.8, float("nan")], [0, 5, 1], [0.3, 0.9, 0.5])
    assert keep_slices(e, cfg).tolist() == expected


def test_similarity_is_one_for_a_mask_whose_embeddings_are_the_prototype_and_nan_when_empty():
    prototype = torch.tensor([0.6, 0.8])
    e = torch.stack([prototype, prototype, torch.tensor([1.0, 0.0])])
    assert mask_similarity(e, torch.tensor([True, True, False]), prototype) == pytest.approx(1.0)
    assert mask_similarity(e, torch.tensor([False, False, True]), prototype) == pytest.approx(0.6)
    assert np.isnan(mask_similarity(e, torch.zeros(3, dtype=torch.bool), prototype))


def test_3d_components_below_the_fraction_of_the_largest_are_dropped_across_slices():
    mask = np.zeros((6, 10, 10), np.uint8)
    mask[1:5, 2:6, 2:6] = 1  # the object: 64 voxels over four slices
    mask[0, 8, 8] = 1  # an island of one voxel
    mask[4:6, 8:10, 0:2] = 1  # a small object of 8 voxels
    assert keep_main_components(mask, 0.0).sum() == 73
    assert keep_main_components(mask, 0.1).sum() == 72
    kept = keep_main_components(mask, 1.0)
    assert kept.sum() == 64 and kept.dtype == mask.dtype
    diagonal = np.zeros((2, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True  # touching by a corner across slices: one object
    assert keep_main_components(diagonal, 1.0).sum() == 2


def test_component_fraction_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"min_component_fraction must be in \[0, 1\], not 1.5"):
        keep_main_components(np.ones((2, 2, 2), bool), 1.5)


def test_a_rule_no_slice_passes_gives_an_empty_mask_though_the_gate_passes_slices(tiny_bundle, case_paths):
    bundle = load_bundle(tiny_bundle)
    inputs = {"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}
    bundle.config.cluster.presence_threshold = 0.0  # the gate passes every slice
    plain = Segmenter(bundle, "cpu", 8).start(inputs).run(progress=False)
    assert plain.mask.any()
    assert np.isfinite(plain.similarity[plain.mask.any(axis=(1, 2))]).all()
    bundle.config.postprocess.min_presence = 1.01
    strict = Segmenter(bundle, "cpu", 8).start(inputs).run(progress=False)
    assert not strict.mask.any()


def test_the_volume_keeps_only_its_largest_object_when_the_bundle_says_so(tiny_bundle, case_paths):
    from scipy import ndimage

    bundle = load_bundle(tiny_bundle)
    bundle.config.cluster.presence_threshold = 0.0
    bundle.config.postprocess.min_component_fraction = 1.0
    result = Segmenter(bundle, "cpu", 8).start({"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}).run(progress=False)
    _, n = ndimage.label(result.mask, structure=np.ones((3, 3, 3), bool))
    assert n == 1


def test_tune_chooses_the_rule_on_validation_volumes_and_records_it(tiny_bundle, small_manifest, tmp_path):
    import json
    import shutil

    from cldf.cli import main
    from cldf.config.grids import POSTPROCESS_GRID

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b", ignore=shutil.ignore_patterns(".checkpoints"))
    assert main(["-q", "tune", "--bundle", str(bundle), "--data", str(small_manifest), "--device", "cpu",
                 "--no-refine"]) == 0  # refinement's choice: Testing/engine/test_refine.py
    card = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    table = card["selection"]["postprocess"]["table"]
    assert len(table) == int(np.prod([len(v) for v in POSTPROCESS_GRID.values()]))
    assert table[0]["val_dice_3d"] == max(r["val_dice_3d"] for r in table)
    chosen = card["selection"]["postprocess"]["chosen"]
    assert {f"postprocess.{k}": v for k, v in card["config"]["postprocess"].items()} == chosen
    assert load_bundle(bundle).config.postprocess == PostprocessConfig(**{k.split(".")[1]: v for k, v in chosen.items()})

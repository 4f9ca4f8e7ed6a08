"""The student's targets come from volumes and slice labels: no ground-truth pixel reaches them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cldf.bundle import load_bundle
from cldf.manifest import load_manifest
from cldf.trainer.pseudo_masks import pseudo_masks
from cldf.trainer.train_student import student_set
from cldf.weak_labels import weak_slice_labels


@pytest.fixture(scope="module")
def made(tiny_bundle, small_manifest, tmp_path_factory):
    bundle = load_bundle(tiny_bundle)
    train = bundle.card["training"]["split"]["train"]
    return bundle, train, pseudo_masks(bundle, load_manifest(small_manifest), train, [1], "cpu",
                                       tmp_path_factory.mktemp("pseudo"), progress=False)


def test_slices_labelled_negative_are_empty_targets(made, small_manifest):
    bundle, train, masks = made
    manifest = load_manifest(small_manifest)
    for cid in train:
        labels = weak_slice_labels(manifest.case(cid), [1], bundle.config.data.positive_fraction)
        np.testing.assert_array_equal(masks[cid].labels, labels)  # the LGG cases are stored in the bundle's orientation
        assert not masks[cid].mask[labels != 1].any()
    assert any(m.mask.any() for m in masks.values())


def test_the_same_targets_come_from_slice_labels_alone(made, small_manifest, tmp_path):
    """A manifest whose training cases carry slice-label CSVs and no masks gives the very same pseudo-masks."""
    bundle, train, masks = made
    raw = json.loads(Path(small_manifest).read_text())
    manifest = load_manifest(small_manifest)
    for case in raw["cases"]:
        if case["id"] in train:
            labels = weak_slice_labels(manifest.case(case["id"]), [1], bundle.config.data.positive_fraction)
            path = tmp_path / f"{case['id']}.csv"
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([("slice", "label"), *enumerate(labels.tolist())])
            case["slice_labels"] = str(path)
            case.pop("mask")
    unmasked = tmp_path / "manifest.json"
    unmasked.write_text(json.dumps(raw))
    again = pseudo_masks(bundle, load_manifest(unmasked), train, [1], "cpu", tmp_path / "pseudo", progress=False)
    for cid in train:
        np.testing.assert_array_equal(again[cid].mask, masks[cid].mask)


def test_the_student_set_leaves_out_ambiguous_slices_and_positive_ones_left_empty(made, small_manifest):
    bundle, train, masks = made
    data = student_set(bundle, load_manifest(small_manifest), masks)
    expected = sum(int(((m.labels == 0) | ((m.labels == 1) & m.mask.any(axis=(1, 2)))).sum()) for m in masks.values())
    assert len(data) == expected
    holding = data.labels.flatten(1).any(dim=1)
    assert holding.any() and (~holding).any()
    assert data.images.shape[-1] == bundle.config.student.resolution

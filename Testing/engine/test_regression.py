"""Seeded regression check: `cldf segment` with the shipped brain bundle on the shipped sample scan.

The outputs `cldf segment` writes are compared with the values recorded in `regression_brain_sample.json`:
the CAM and mean-gradient maps by their sums (whole volume and per slice, within a tight tolerance: float
results may differ in the last bits between machines and thread counts), the seeds and the final
(refined) mask voxel for voxel (a hash and the voxels per slice), the presence probability and
prototype similarity per slice. Any stage that changes what it computes (reading, normalising, a map,
the seeds, the features, the decoder, K-means, the gate, post-processing, refinement, writing) fails it.

A deliberate change records new values (then review the difference and commit the file)::

    CLDF_RECORD_REGRESSION=1 .venv/bin/pytest Testing/engine/test_regression.py
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cldf.bundle import load_bundle
from cldf.cli import main
from conftest import BRAIN_BUNDLE, SAMPLE_DIR

RECORD = Path(__file__).with_name("regression_brain_sample.json")
RECORDING = os.environ.get("CLDF_RECORD_REGRESSION") == "1"
MAPS = ("cam", "mean_gradient")  # written as 0..255 for 0..1
LABELS = ("seeds", "mask")
#: Relative tolerance of a map's sums, with a floor of a few quantisation steps for nearly empty slices.
MAP_RTOL, MAP_ATOL = 1e-4, 64
PER_SLICE_ATOL = 2e-4  # presence and similarity are written with 4 decimals

pytestmark = pytest.mark.slow


def summary(out: Path) -> dict:
    """What is compared, from the files `cldf segment` wrote into ``out``."""
    arrays = {name: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}.nii.gz"))) for name in MAPS + LABELS}
    found: dict = {"shape": list(arrays["mask"].shape)}
    for name in MAPS:
        a = arrays[name].astype(np.int64)
        found[name] = {"sum": int(a.sum()), "slice_sums": a.sum(axis=(1, 2)).tolist()}
    for name in LABELS:
        a = np.ascontiguousarray(arrays[name].astype(np.uint8))
        found[name] = {"sha256": hashlib.sha256(a.tobytes()).hexdigest(),
                       "slice_voxels": {str(v): (a == v).sum(axis=(1, 2)).tolist() for v in np.unique(a) if v}}
    with open(out / "slices.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    found["presence"] = [float(r["presence_probability"]) for r in rows]
    found["similarity"] = [float(r["prototype_similarity"]) if r["prototype_similarity"] else None for r in rows]
    return found


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> dict:
    """`cldf segment` on the sample as a user runs it (the bundle's refinement on), seeded, on the CPU, with the
    CLDF pipeline (the bundle segments with its student by default: `--segmenter cldf` keeps every stage checked)."""
    sample = json.loads((SAMPLE_DIR / "manifest.json").read_text(encoding="utf-8"))["cases"][0]
    out = tmp_path_factory.mktemp("regression") / "out"
    inputs = [arg for name, file in sample["channels"].items() for arg in ("--input", f"{name}={SAMPLE_DIR / file}")]
    torch.manual_seed(0)  # the bundle's own seeds drive every random step; this only fixes anything left over
    assert main(["-q", "segment", "--bundle", str(BRAIN_BUNDLE), *inputs, "--out", str(out), "--device", "cpu",
                 "--decoder-seed", "0", "--segmenter", "cldf"]) == 0
    found = {"bundle": load_bundle(BRAIN_BUNDLE).id, **summary(out)}
    if RECORDING:
        RECORD.write_text(json.dumps(found, indent=1) + "\n", encoding="utf-8")
        pytest.skip(f"recorded {RECORD.name}: review its difference and commit it")
    return found


@pytest.fixture(scope="module")
def recorded() -> dict:
    if not RECORD.is_file():
        pytest.fail(f"{RECORD.name} is missing: record it (CLDF_RECORD_REGRESSION=1, see this file's docstring)")
    return json.loads(RECORD.read_text(encoding="utf-8"))


def test_the_record_is_of_the_shipped_bundle(segmented, recorded):
    assert segmented["bundle"] == recorded["bundle"], (
        "the shipped brain bundle changed since the values were recorded: record them again "
        "(CLDF_RECORD_REGRESSION=1, see this file's docstring)")
    assert segmented["shape"] == recorded["shape"]


@pytest.mark.parametrize("name", MAPS)
def test_each_map_has_the_recorded_sums(segmented, recorded, name):
    got, want = segmented[name], recorded[name]
    assert got["sum"] == pytest.approx(want["sum"], rel=MAP_RTOL, abs=MAP_ATOL), name
    np.testing.assert_allclose(got["slice_sums"], want["slice_sums"], rtol=MAP_RTOL, atol=MAP_ATOL, err_msg=name)


@pytest.mark.parametrize("name", LABELS)
def test_the_seeds_and_the_mask_are_the_recorded_ones_voxel_for_voxel(segmented, recorded, name):
    got, want = segmented[name], recorded[name]
    assert got["slice_voxels"] == want["slice_voxels"], f"{name}: voxels per label and slice differ"
    assert got["sha256"] == want["sha256"], f"{name}: same voxel counts, other voxels"


def test_the_mask_is_the_sample_tumour_and_empty_where_the_gate_says_absent(segmented):
    """What the record holds is worth holding: a tumour on the slices judged present, nothing elsewhere."""
    voxels = np.array(segmented["mask"]["slice_voxels"]["1"])
    present = np.array(segmented["presence"]) >= load_bundle(BRAIN_BUNDLE).config.cluster.presence_threshold
    assert present.any() and not present.all()
    assert voxels[present].sum() > 5000 and not voxels[~present].any()


@pytest.mark.parametrize("name", ["presence", "similarity"])
def test_the_per_slice_values_are_the_recorded_ones(segmented, recorded, name):
    got, want = segmented[name], recorded[name]
    assert [v is None for v in got] == [v is None for v in want], f"{name}: other slices have a value"
    np.testing.assert_allclose([v for v in got if v is not None], [v for v in want if v is not None],
                               atol=PER_SLICE_ATOL, err_msg=name)

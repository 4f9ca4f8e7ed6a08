"""Reading, validating, normalising and slicing volumes; weak labels and splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.images import InputError, read_channels
from cldf.manifest import load_manifest, split_cases
from cldf.slices import from_slices, normalise, to_slices
from cldf.weak_labels import AMBIGUOUS, weak_slice_labels
from conftest import write_image


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    a = write_image(rng.random((6, 20, 24)).astype(np.float32), tmp_path / "a.nii.gz")
    b = write_image(rng.random((6, 20, 24)).astype(np.float32), tmp_path / "b.nii.gz")
    return {"FLAIR": a, "T1": b}


def test_channels_are_stacked_in_bundle_order(pair):
    volume, ref = read_channels({"T1": pair["T1"], "FLAIR": pair["FLAIR"]}, ["FLAIR", "T1"])
    assert volume.shape == (2, 6, 20, 24)
    np.testing.assert_array_equal(volume[0], sitk.GetArrayFromImage(sitk.ReadImage(str(pair["FLAIR"]))))


def test_refuses_a_missing_channel(pair):
    with pytest.raises(InputError, match=r"missing channel\(s\) \['T1'\]"):
        read_channels({"FLAIR": pair["FLAIR"]}, ["FLAIR", "T1"])


def test_refuses_an_extra_channel(pair):
    with pytest.raises(InputError, match=r"unexpected channel\(s\) \['T1ce'\]"):
        read_channels({**pair, "T1ce": pair["T1"]}, ["FLAIR", "T1"])


@pytest.mark.parametrize("change", ["size", "spacing", "origin", "direction"])
def test_refuses_channels_on_different_grids(tmp_path, pair, change):
    kw = {"spacing": (1.0, 1.0, 2.0) if change == "spacing" else (1.0, 1.0, 1.0),
          "origin": (5.0, 0.0, 0.0) if change == "origin" else (0.0, 0.0, 0.0),
          "direction": (0, 1, 0, 1, 0, 0, 0, 0, -1) if change == "direction" else None}
    shape = (6, 20, 25) if change == "size" else (6, 20, 24)
    other = write_image(np.random.default_rng(1).random(shape).astype(np.float32), tmp_path / "c.nii.gz", **kw)
    with pytest.raises(InputError, match="different voxel grids.*resample"):
        read_channels({"FLAIR": pair["FLAIR"], "T1": other}, ["FLAIR", "T1"])


def test_refuses_a_2d_image(tmp_path, pair):
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 24), np.float32)), str(flat))
    with pytest.raises(InputError, match="is a 2D image; a 3D volume"):
        read_channels({"FLAIR": flat, "T1": pair["T1"]}, ["FLAIR", "T1"])


def test_refuses_a_volume_of_one_slice(tmp_path, pair):
    one = write_image(np.random.default_rng(2).random((1, 20, 24)).astype(np.float32), tmp_path / "one.nii.gz")
    with pytest.raises(InputError, match="single 2D slice"):
        read_channels({"FLAIR": one, "T1": pair["T1"]}, ["FLAIR", "T1"])


def test_refuses_a_constant_volume(tmp_path, pair):
    const = write_image(np.full((6, 20, 24), 7, np.float32), tmp_path / "const.nii.gz")
    with pytest.raises(InputError, match="constant: every voxel is 7"):
        read_channels({"FLAIR": const, "T1": pair["T1"]}, ["FLAIR", "T1"])


def test_refuses_an_all_zero_volume(tmp_path, pair):
    zeros = write_image(np.zeros((6, 20, 24), np.float32), tmp_path / "zeros.nii.gz")
    with pytest.raises(InputError, match="empty: every voxel is 0"):
        read_channels({"FLAIR": zeros, "T1": pair["T1"]}, ["FLAIR", "T1"])


def test_refuses_an_empty_file(tmp_path, pair):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="empty.nii.gz is not an image this tool can read, or it is corrupted"):
        read_channels({"FLAIR": tmp_path / "empty.nii.gz", "T1": pair["T1"]}, ["FLAIR", "T1"])


def test_refuses_nans(tmp_path, pair):
    a = np.random.default_rng(2).random((6, 20, 24)).astype(np.float32)
    a[2, 3, 4] = np.nan
    bad = write_image(a, tmp_path / "nan.nrrd")
    with pytest.raises(InputError, match="1 NaN or infinite"):
        read_channels({"FLAIR": bad, "T1": pair["T1"]}, ["FLAIR", "T1"])


def test_refuses_a_missing_file(pair, tmp_path):
    with pytest.raises(FileNotFoundError, match="channel 'T1'"):
        read_channels({"FLAIR": pair["FLAIR"], "T1": tmp_path / "nope.nii.gz"}, ["FLAIR", "T1"])


def test_normalise_maps_the_robust_range_to_minus_one_one():
    v = np.random.default_rng(3).normal(100, 20, (2, 4, 16, 16)).astype(np.float32)
    n = normalise(v, (0.5, 99.5))
    assert n.min() == -1.0 and n.max() == 1.0
    assert abs(float(np.median(n))) < 0.1


def test_slices_go_back_to_the_input_grid_with_the_same_content():
    v = np.zeros((1, 3, 40, 60), np.float32)
    v[0, :, 10:30, 20:40] = 1.0
    s = to_slices(v * 2 - 1, 32)
    assert s.shape == (3, 1, 32, 32)
    back = from_slices((s[:, 0] > 0).float(), (40, 60), mode="mask")
    assert back.shape == (3, 40, 60)
    truth = v[0] > 0
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.85  # what 60 -> 32 -> 60 pixels can keep of a 20-pixel square


def test_weak_labels_follow_the_area_fraction_rule(lgg_manifest):
    m = load_manifest(lgg_manifest)
    case = m.cases[0]
    labels = weak_slice_labels(case, [1], 0.01)
    frac = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))).mean(axis=(1, 2))
    np.testing.assert_array_equal(labels == 1, frac > 0.01)
    np.testing.assert_array_equal(labels == 0, frac == 0)
    np.testing.assert_array_equal(labels == AMBIGUOUS, (frac > 0) & (frac <= 0.01))


def test_slice_labels_can_come_from_a_csv(tmp_path, pair):
    (tmp_path / "labels.csv").write_text("slice,label\n0,0\n1,1\n2,1\n3,0\n4,0\n5,1\n")
    (tmp_path / "m.json").write_text(json.dumps({"cases": [
        {"id": "p1", "channels": {"FLAIR": str(pair["FLAIR"])}, "slice_labels": "labels.csv"}]}))
    case = load_manifest(tmp_path / "m.json").cases[0]
    np.testing.assert_array_equal(weak_slice_labels(case, None, 0.01), [0, 1, 1, 0, 0, 1])


def test_split_is_by_patient_deterministic_and_disjoint(lgg_manifest):
    m = load_manifest(lgg_manifest)
    a = split_cases(m, (0.6, 0.15, 0.25), seed=0)
    assert a == split_cases(m, (0.6, 0.15, 0.25), seed=0)
    assert a != split_cases(m, (0.6, 0.15, 0.25), seed=1)
    ids = a["train"] + a["val"] + a["test"]
    assert sorted(ids) == sorted(c.id for c in m.cases) and len(set(ids)) == len(ids)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (24, 6, 10)


def test_manifest_errors_are_readable(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_manifest(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")

"""The slice cache: built once, reused without reading a volume, rebuilt when an input or a setting changes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import cldf.trainer.slicecache as slicecache
from cldf.manifest import load_manifest
from cldf.trainer.slice_set import load_slice_set


@pytest.fixture
def copied(small_manifest, tmp_path):
    """The two training cases of the small manifest, with their files copied (so a test may change them)."""
    raw = json.loads(small_manifest.read_text(encoding="utf-8"))
    cases = []
    for case in raw["cases"][:2]:
        folder = tmp_path / case["id"]
        folder.mkdir()
        for key, path in [*case["channels"].items(), ("mask", case["mask"])]:
            shutil.copy(path, folder / f"{key}.nii.gz")
        cases.append({"id": case["id"], "mask": f"{case['id']}/mask.nii.gz",
                      "channels": {k: f"{case['id']}/{k}.nii.gz" for k in case["channels"]}})
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"cases": cases}), encoding="utf-8")
    return path


def _cached(manifest, root, resolution=32):
    m = load_manifest(manifest)
    return slicecache.cached_slice_set(m, [c.id for c in m.cases], ["FLAIR", "T1"], resolution, (0.5, 99.5), [1],
                                       0.01, "LPS", root=root, progress=False)


def _builds(monkeypatch) -> list:
    calls, real = [], slicecache.load_slice_set
    monkeypatch.setattr(slicecache, "load_slice_set", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_the_cache_holds_what_loading_gives_and_is_reused_without_reading(copied, tmp_path, monkeypatch):
    m = load_manifest(copied)
    direct = load_slice_set(m, [c.id for c in m.cases], ["FLAIR", "T1"], 32, (0.5, 99.5), [1], 0.01, "LPS")
    built = _cached(copied, tmp_path / "cache")
    assert torch.equal(built.images[:], direct.images) and torch.equal(built.labels, direct.labels)
    assert torch.equal(built.case_index, direct.case_index) and np.array_equal(built.ranges, direct.ranges)

    def no_reading(*a, **k):
        raise AssertionError("a volume was read")

    monkeypatch.setattr(slicecache, "load_slice_set", no_reading)
    monkeypatch.setattr("cldf.trainer.slice_set.read_images", no_reading)
    again = _cached(copied, tmp_path / "cache")
    assert torch.equal(again.images[:], direct.images)
    flair = copied.parent / m.cases[0].id / "FLAIR.nii.gz"
    os.utime(flair, ns=(1, 1))  # touched, content unchanged: reused after comparing the sha256
    assert torch.equal(_cached(copied, tmp_path / "cache").images[:], direct.images)


def test_a_changed_volume_or_setting_rebuilds_the_cache(copied, tmp_path, monkeypatch):
    first = _cached(copied, tmp_path / "cache")
    calls = _builds(monkeypatch)
    m = load_manifest(copied)
    t1 = copied.parent / m.cases[1].id / "T1.nii.gz"
    image = sitk.ReadImage(str(t1))
    inverted = sitk.GetImageFromArray(255 - sitk.GetArrayFromImage(image))  # a changed file
    inverted.CopyInformation(image)
    sitk.WriteImage(inverted, str(t1))
    changed = _cached(copied, tmp_path / "cache")
    assert len(calls) == 2 and not torch.equal(changed.images[:], first.images[:])
    calls.clear()
    _cached(copied, tmp_path / "cache", resolution=24)  # another setting: another cache
    assert len(calls) == 2 and len(list((tmp_path / "cache").iterdir())) == 2

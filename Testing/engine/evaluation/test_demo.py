"""`cldf demo` on the shipped sample scan, the sample itself (files, licence) and its Sample Data registration."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.cli import main
from cldf.evaluation import demo
from cldf.images import InputError
from cldf.manifest import load_manifest
from conftest import BRAIN_BUNDLE, TUMOUR_CASE

SAMPLE = demo.SAMPLE_DIR
DICE_LINE = re.compile(r"Dice against the ground truth: 3D ([0-9.]+), "
                       r"mean over the (\d+) slices holding tumour ([0-9.]+)")


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the shipped sample
def test_the_sample_is_one_documented_test_case_of_the_brain_bundle():
    assert [p.name for p in SAMPLE.parent.iterdir()] == [TUMOUR_CASE]  # one case ships, no other
    manifest = load_manifest(SAMPLE / "manifest.json")
    (case,) = manifest.cases
    bundle = json.loads((BRAIN_BUNDLE / "bundle.json").read_text(encoding="utf-8"))
    assert case.id == TUMOUR_CASE and case.id in bundle["training"]["split"]["test"]
    assert sorted(case.channels) == sorted(bundle["channels"]) == ["FLAIR", "T1"]
    assert {p.name for p in case.channels.values()} | {case.mask.name} == {"flair.nii.gz", "t1.nii.gz", "mask.nii.gz"}
    images = [sitk.ReadImage(str(p)) for p in [*case.channels.values(), case.mask]]
    assert all(i.GetSize() == (256, 256, 22) and i.GetDirection() == images[0].GetDirection() for i in images)
    mask = read(case.mask)
    assert set(np.unique(mask)) == {0, 1}
    holding = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    raw = json.loads((SAMPLE / "manifest.json").read_text(encoding="utf-8"))["cases"][0]
    assert holding.tolist() == list(range(9, 19)) and raw["n_tumor_slices"] == len(holding)
    assert sum(p.stat().st_size for p in SAMPLE.glob("*.nii.gz")) < 2_000_000


def test_the_sample_files_are_the_lgg_case_renamed(lgg_manifest):
    raw = next(c for c in json.loads(lgg_manifest.read_text(encoding="utf-8"))["cases"] if c["id"] == TUMOUR_CASE)
    source = {"flair.nii.gz": raw["channels"]["FLAIR"], "t1.nii.gz": raw["channels"]["T1"], "mask.nii.gz": raw["mask"]}
    for shipped, original in source.items():
        assert sha256(SAMPLE / shipped) == sha256(lgg_manifest.parent / original), shipped


def test_the_licence_names_the_source_the_authors_and_the_licence():
    text = " ".join((SAMPLE / "LICENSE.txt").read_text(encoding="utf-8").split())
    for needed in ("TCGA-LGG", "lgg-mri-segmentation", "Buda", "Kaggle", "The Cancer Imaging Archive",
                   "CC BY-NC-SA 4.0", "creativecommons.org/licenses/by-nc-sa/4.0", "TCIA's data usage",
                   "pre.nii.gz -> t1.nii.gz", "seg.nii.gz -> mask.nii.gz"):
        assert needed in text, needed


# ------------------------------------------------------------------ the demo
@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> tuple[Path, str]:
    """The demo on the shipped sample, without SAM refinement (minutes on CPU otherwise); its montage and output."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        montage = demo.run_demo(out, progress=False, refine="none")
    return montage, printed.getvalue()


def test_the_demo_prints_the_dice_of_its_mask_against_the_ground_truth(sample_run):
    montage, printed = sample_run
    match = DICE_LINE.search(printed)
    assert match, printed
    mask, truth = read(montage.parent / "mask.nii.gz") > 0, read(SAMPLE / "mask.nii.gz") > 0
    d3 = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    per_slice = [2 * (mask[z] & truth[z]).sum() / (mask[z].sum() + truth[z].sum()) for z in range(9, 19)]
    assert float(match.group(1)) == pytest.approx(d3, abs=5e-4) and int(match.group(2)) == 10
    assert float(match.group(3)) == pytest.approx(np.mean(per_slice), abs=5e-4)
    assert 0.3 < d3 <= 1.0  # the shipped bundle finds this tumour
    assert f"case {TUMOUR_CASE}" in printed and "slices 13, 14, 15" in printed


def test_the_montage_shows_the_slices_with_the_most_ground_truth(sample_run):
    montage, _ = sample_run
    rgb = read(montage)
    truth = read(SAMPLE / "mask.nii.gz")
    area = truth.reshape(len(truth), -1).sum(axis=1, dtype=np.int64)
    chosen = sorted(np.argsort(-area, kind="stable")[:3].tolist())
    assert chosen == [13, 14, 15]  # each row's ground-truth panel below must show these slices
    strip, gap, side, columns = 18, demo.GAP, 256, len(demo.COLUMNS)
    assert rgb.shape == (strip + gap + 3 * (strip + side + gap) - gap, columns * (side + gap) - gap, 3)
    grey = demo.to_unit(read(SAMPLE / "flair.nii.gz").astype(np.float32))
    direction = sitk.ReadImage(str(SAMPLE / "flair.nii.gz")).GetDirection()
    for row, z in enumerate(chosen):
        top = strip + gap + row * (strip + side + gap)
        label, gt_panel = rgb[top : top + strip], rgb[top + strip : top + strip + side, side + gap : 2 * side + gap]
        expected = demo.radiological(demo.overlay(grey[z], truth[z], demo.GROUND_TRUTH_COLOR), direction)
        np.testing.assert_array_equal(gt_panel, (expected * 255).round().astype(np.uint8))
        assert (label == 255).all(axis=2).sum() > 200  # the line naming case, slice and Dice
    header = rgb[:strip, :side]
    np.testing.assert_array_equal(header, (demo.text_strip("image", side) * 255).astype(np.uint8))


def test_the_demo_takes_a_case_from_a_given_manifest(lgg_manifest, tmp_path, capsys):
    demo.run_demo(tmp_path / "lgg", data=lgg_manifest, progress=False, refine="none")
    first_test = json.loads((BRAIN_BUNDLE / "bundle.json").read_text(encoding="utf-8"))["training"]["split"]["test"][0]
    printed = capsys.readouterr().out
    assert f"case {first_test} from {lgg_manifest}" in printed and DICE_LINE.search(printed)


def test_the_demo_refuses_without_the_sample_and_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SAMPLE_DIR", tmp_path / "SampleData" / TUMOUR_CASE)
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sample scan is missing" in err and "git checkout -- Resources/SampleData" in err
    assert "--data MANIFEST" in err and not (tmp_path / "out").exists()


def test_the_demo_refuses_a_case_without_a_mask(tmp_path):
    raw = json.loads((SAMPLE / "manifest.json").read_text(encoding="utf-8"))
    del raw["cases"][0]["mask"]
    raw["cases"][0]["channels"] = {k: str(SAMPLE / v) for k, v in raw["cases"][0]["channels"].items()}
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="has no mask"):
        demo.run_demo(tmp_path / "out", data=tmp_path / "manifest.json", progress=False, refine="none")


# ------------------------------------------------------------------ pieces of the montage
def test_dice_over_the_volume_and_over_slices_holding_target():
    truth = np.zeros((3, 4, 4), bool)
    truth[0, :2] = truth[1, 0] = True  # 8 and 4 voxels
    pred = np.zeros_like(truth)
    pred[0, :1] = pred[2, 0] = True  # 4 on slice 0 (all inside), 4 false positives on slice 2
    d3, mean, n = demo.dice_scores(pred, truth)
    assert d3 == pytest.approx(2 * 4 / (8 + 12)) and n == 2 and mean == pytest.approx((2 * 4 / 12 + 0.0) / 2)
    assert np.isnan(demo.dice_scores(pred, np.zeros_like(truth))[1])


def test_text_is_drawn_from_the_bitmap_font():
    bits = demo.text_bitmap("1_", scale=1)
    assert bits.shape == (5, 8)
    np.testing.assert_array_equal(bits[:, :4], [[0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0]])
    assert bits[:4, 4:].sum() == 0 and bits[4, 4:7].all()
    assert (demo.text_bitmap("a") == demo.text_bitmap("A")).all()
    assert (demo.text_bitmap("é") == demo.text_bitmap("?")).all()  # unknown characters
    strip = demo.text_strip("a long line cut at the panel's edge", 40)
    assert strip.shape == (18, 40, 3) and strip[:, 36:].max() == 0 and strip.max() == 1.0


# ------------------------------------------------------------------ Slicer's Sample Data module
def test_the_sample_data_source_points_at_the_shipped_files():
    from CLDFSegmentationLib import sampledata

    (source,) = sampledata.sampleDataSources()
    assert source["category"] == "CLDF Segmentation" and source["sampleName"] == TUMOUR_CASE
    paths = [Path(unquote(urlparse(u).path)) for u in source["uris"]]
    assert all(u.startswith("file://") for u in source["uris"])
    assert paths == [SAMPLE / "flair.nii.gz", SAMPLE / "t1.nii.gz"] and all(p.is_file() for p in paths)
    assert source["nodeNames"] == [f"{TUMOUR_CASE}_FLAIR", f"{TUMOUR_CASE}_T1"]
    assert len(set(source["fileNames"])) == 2 and all(n.endswith(".nii.gz") for n in source["fileNames"])
    assert source["checksums"] == [f"SHA256:{sha256(p)}" for p in paths]  # Slicer verifies the copies with these
    moved = sampledata.sampleDataSources(Path("/elsewhere") / "case")
    assert moved[0]["uris"][0] == (Path("/elsewhere") / "case" / "flair.nii.gz").as_uri()


def test_the_module_registers_the_sample_once_slicer_has_started():
    import ast

    module = Path(__file__).resolve().parents[3] / "CLDFSegmentation" / "CLDFSegmentation.py"
    tree = ast.parse(module.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CLDFSegmentation")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    source = ast.unparse(init)
    assert "from CLDFSegmentationLib.sampledata import registerSampleData" in source
    assert "slicer.app.connect('startupCompleted()', registerSampleData)" in source

"""The results table from recorded metrics, and the Fig. 3-like figure, on a real (tiny) bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.cli import main
from cldf.evaluation.demo import GAP
from cldf.evaluation.evaluate import _slice_scores, pointing
from cldf.evaluation.figure import COLUMNS
from cldf.evaluation.results import cldf_is_best


def test_results_table_from_the_metrics_recorded_in_bundles(tiny_bundle, small_manifest, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b", ignore=shutil.ignore_patterns(".checkpoints"))
    card = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    card.pop("metrics", None)  # other tests may have recorded some into the shared tiny bundle
    (bundle / "bundle.json").write_text(json.dumps(card))
    out = tmp_path / "results.md"
    assert main(["-q", "results", "--bundle", str(bundle), "--out", str(out)]) == 2
    assert "cldf evaluate" in capsys.readouterr().err  # nothing recorded yet: says what to run
    assert main(["-q", "evaluate", "--bundle", str(bundle), "--data", str(small_manifest), "--out",
                 str(tmp_path / "r.json"), "--device", "cpu", "--methods", "mg,cldf-untrained,cldf", "--record"]) == 0
    assert main(["-q", "results", "--bundle", str(bundle), "--bundle", str(bundle), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert ", test: 1 cases, " in text and "tumour (" in text and "| MG |" in text and "| CLDF, untrained CDM |" in text
    assert f"{report['methods']['cldf']['dice']:.3f} ± {report['methods']['cldf']['dice_std']:.3f}" in text
    pointing = text.split("**Pointing game")[1]
    assert "| MG |" in pointing and "| CLDF |" not in pointing  # only maps have a maximum to point with
    assert f"{report['methods']['mg']['pointing']:.3f}" in pointing
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert len(data["columns"]) == 2 and data["columns"][0]["cases"] == report["cases"]


def test_cldf_is_best_only_when_it_beats_every_compared_row():
    rows = {"mg": {"dice": 0.5}, "layercam+cl": {"dice": 0.6}, "cldf-untrained": {"dice": 0.9}, "cldf": {"dice": 0.55}}
    assert not cldf_is_best(rows)
    rows["cldf"]["dice"] = 0.65
    assert cldf_is_best(rows)  # the untrained-CDM row stands beside CLDF, not against it


def test_figure_has_six_panels_per_test_slice(tiny_bundle, small_manifest, tmp_path, capsys):
    out = tmp_path / "fig.png"
    assert main(["-q", "figure", "--bundle", str(tiny_bundle), "--data", str(small_manifest), "--out", str(out),
                 "--device", "cpu"]) == 0
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    case = json.loads(small_manifest.read_text(encoding="utf-8"))["cases"][3]
    h, w = sitk.GetArrayFromImage(sitk.ReadImage(case["mask"])).shape[1:]
    assert rgb.shape == (h, len(COLUMNS) * (w + GAP) - GAP, 3)  # the tiny bundle's test split has one case
    assert "slice" in capsys.readouterr().out
    gt_panel = rgb[:, w + GAP : 2 * w + GAP]
    assert np.any(np.all(gt_panel == (80, 200, 80), axis=-1))  # the ground-truth outline is drawn


def test_precision_and_pointing_count_the_right_pixels():
    gt = np.zeros((3, 4, 4), bool)
    gt[:2, 1:3, 1:3] = True  # slices 0 and 1 hold the target, slice 2 does not
    maps = np.zeros((3, 4, 4), np.float32)
    maps[0, 1, 1] = 1.0  # maximum on the target
    maps[1, 0, 0] = 1.0  # maximum off it
    assert pointing(maps, gt, np.array([0, 1])) == [True, False]
    pred = np.zeros_like(gt)
    pred[0, 1:3, 1:4] = True  # 4 of 6 on the target
    pred[1, 0, :] = True  # 0 of 4
    pred[2] = True  # not a positive slice: not counted
    sc = _slice_scores(pred, gt, np.array([0, 1]), (1.0, 1.0))
    assert sc.hits == [4, 0] and sc.predicted == [6, 4] and sc.precision == pytest.approx(0.4)


def test_the_shipped_row_is_the_refined_one_when_the_bundle_refines():
    rows = {"mg+cl": {"dice": 0.5}, "ame-cam+cl": {"dice": 0.58}, "cldf": {"dice": 0.55}, "cldf+sam": {"dice": 0.6}}
    assert not cldf_is_best(rows, "cldf")  # the AME-CAM ablation beats unrefined CLDF
    assert cldf_is_best(rows, "cldf+sam")


def test_a_case_without_positive_slices_points_nowhere_and_does_not_fail():
    maps = np.random.default_rng(0).random((4, 8, 8))
    assert pointing(maps, np.zeros((4, 8, 8), bool), np.array([], dtype=np.int64)) == []


def test_the_shipped_row_follows_the_segmenter_the_bundle_chose():
    from cldf.evaluation.results import shipped_row

    assert shipped_row({"refine": {"method": "sam"}}) == "cldf+sam"
    assert shipped_row({"refine": {"method": "none"}, "student": {"segmenter": "cldf"}}) == "cldf"
    assert shipped_row({"refine": {"method": "sam"}, "student": {"segmenter": "student", "refine": "none"}}) == "student"
    assert shipped_row({"student": {"segmenter": "student", "refine": "sam"}}) == "student+sam"


def test_recording_some_methods_again_keeps_the_other_rows_of_the_same_cases():
    from cldf.cli import _merged_metrics

    first = _merged_metrics(None, "cldf evaluate A", ["c1", "c2"], "p", {"cldf": {"dice": 0.5}},
                            {"c1": {"cldf": {"dice_3d": 0.4}}, "c2": {"cldf": {"dice_3d": 0.6}}})
    both = _merged_metrics(first, "cldf evaluate B", ["c1", "c2"], "p", {"student": {"dice": 0.7}},
                           {"c1": {"student": {"dice_3d": 0.8}}, "c2": {"student": {"dice_3d": 0.9}}})
    assert both["methods"] == {"cldf": {"dice": 0.5}, "student": {"dice": 0.7}}
    assert both["per_case"]["c1"] == {"cldf": {"dice_3d": 0.4}, "student": {"dice_3d": 0.8}}
    assert both["commands"] == {"cldf": "cldf evaluate A", "student": "cldf evaluate B"}
    other = _merged_metrics(both, "cldf evaluate C", ["c3"], "p", {"student": {"dice": 0.1}}, {"c3": {}})
    assert other["methods"] == {"student": {"dice": 0.1}} and "commands" not in other  # other cases: all replaced

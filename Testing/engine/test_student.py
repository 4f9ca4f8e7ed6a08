"""The student: a U-Net trained on the pipeline's masks of the training patients, segmenting in one pass per slice."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cldf.bundle import BundleError, load_bundle
from cldf.cli import main
from cldf.config import StudentConfig
from cldf.student import StudentSegmenter, make_segmenter, student_slices
from cldf.trainer.batches import StepDraws
from cldf.trainer.train_student import augment_pair


@pytest.fixture()
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def inputs(case_paths) -> dict:
    return {"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}


def test_training_adds_a_student_weighed_against_the_pipeline_on_validation(tiny_bundle):
    card = json.loads((tiny_bundle / "bundle.json").read_text())
    assert "student.safetensors" in card["files"]
    student = card["student"]
    assert student["validation_cases"] == card["training"]["split"]["val"]
    assert {r["segmenter"] for r in student["table"]} == {"cldf", "student"}  # no SAM rows: select_refine is off
    best = student["table"][0]
    assert best["score"] == max(r["score"] for r in student["table"])
    assert card["config"]["student"]["segmenter"] == student["chosen"]["student.segmenter"]
    assert student["slices_with_pseudo_mask"] > 0 and student["slices_without"] > 0


def test_student_segments_on_the_input_grid_the_same_twice(tiny_bundle, case_paths):
    bundle = load_bundle(tiny_bundle)
    first = StudentSegmenter(bundle, "cpu", 4, maps=False).start(inputs(case_paths)).run(progress=False)
    again = StudentSegmenter(load_bundle(tiny_bundle), "cpu", 4, maps=False).start(inputs(case_paths)).run(progress=False)
    reference = sitk.ReadImage(str(case_paths["FLAIR"]))
    assert first.mask.shape == sitk.GetArrayFromImage(reference).shape
    np.testing.assert_array_equal(first.mask, again.mask)
    assert not first.has_maps and not first.cam.any() and not first.mean_gradient.any()
    assert ((first.presence >= 0) & (first.presence <= 1)).all()


def test_the_overlays_are_computed_only_when_asked_for(tiny_bundle, case_paths):
    bundle = load_bundle(tiny_bundle)
    plain = StudentSegmenter(bundle, "cpu", 4, maps=False).start(inputs(case_paths)).run(progress=False)
    with_maps = StudentSegmenter(bundle, "cpu", 4, maps=True).start(inputs(case_paths)).run(progress=False)
    assert with_maps.has_maps and with_maps.cam.any() and with_maps.mean_gradient.any()
    np.testing.assert_array_equal(plain.mask, with_maps.mask)  # the maps do not change the student's mask


def test_the_segmenter_is_the_bundles_unless_named(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    chosen = bundle.config.student.segmenter
    assert type(make_segmenter(bundle, device="cpu")).__name__ == {"cldf": "Segmenter", "student": "StudentSegmenter"}[chosen]
    assert isinstance(make_segmenter(bundle, "student", "cpu"), StudentSegmenter)
    with pytest.raises(ValueError, match="segmenter must be one of"):
        make_segmenter(bundle, "unet", "cpu")
    with pytest.raises(ValueError, match="extra maps"):
        make_segmenter(bundle, "student", "cpu", extra_maps=("cdm",))


def test_a_bundle_without_a_student_says_how_to_get_one(copy, case_paths, tmp_path, capsys):
    card = json.loads((copy / "bundle.json").read_text())
    (copy / "student.safetensors").unlink()
    card["files"].pop("student.safetensors")
    card.pop("student")
    from cldf.bundle import write_card

    write_card(copy / "bundle.json", card)
    code = main(["-q", "segment", "--bundle", str(copy), "--input", f"FLAIR={case_paths['FLAIR']}",
                 "--input", f"T1={case_paths['T1']}", "--out", str(tmp_path / "out"), "--segmenter", "student"])
    assert code == 2 and "cldf student --bundle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_tampered_student_is_refused(copy):
    data = bytearray((copy / "student.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "student.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="student.safetensors does not match"):
        load_bundle(copy)


def test_cli_student_run_writes_the_mask_and_without_maps_nothing_else(tiny_bundle, case_paths, tmp_path):
    args = ["-q", "segment", "--bundle", str(tiny_bundle), "--input", f"FLAIR={case_paths['FLAIR']}",
            "--input", f"T1={case_paths['T1']}", "--segmenter", "student"]
    assert main([*args, "--out", str(tmp_path / "maps")]) == 0
    assert main([*args, "--out", str(tmp_path / "fast"), "--no-maps"]) == 0
    assert {p.name for p in (tmp_path / "maps").iterdir()} >= {"cam.nii.gz", "mean_gradient.nii.gz", "mask.nii.gz"}
    assert {p.name for p in (tmp_path / "fast").iterdir()} == {"mask.nii.gz", "slices.csv", "cldf-result.json"}
    marker = json.loads((tmp_path / "fast" / "cldf-result.json").read_text())
    assert marker["segmenter"] == "student" and marker["files"] == ["mask.nii.gz", "slices.csv"]
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f / "mask.nii.gz"))) for f in ("maps", "fast")]
    np.testing.assert_array_equal(*masks)


def test_neighbouring_slices_become_channels_and_repeat_at_the_ends():
    volume = np.arange(3, dtype=np.float32)[None, :, None, None] * np.ones((2, 3, 8, 8), np.float32) / 3
    x = student_slices(volume, StudentConfig(resolution=8, context=1))
    assert x.shape == (3, 6, 8, 8)
    # slice 0's neighbours: slice 0 again (below the first), then slice 1; channels of each slice together
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([0, 0, 0, 0, 1, 1]) / 3)
    assert torch.allclose(x[2, :, 0, 0], torch.tensor([1, 1, 2, 2, 2, 2]) / 3)


def test_augmentation_moves_slices_and_targets_together():
    y = torch.zeros(4, 32, 32)
    y[:, 8:20, 10:24] = 1
    x = (y * 2 - 1)[:, None].repeat(1, 2, 1, 1)
    for step in range(5):
        d = StepDraws(0, step, lambda g: torch.randint(4, (4,), generator=g))
        xa, ya = augment_pair(x, y, d, flips=True)
        assert ya.sum() > 0.8 * y.sum()
        for i in range(4):
            inside, outside = xa[i, 0][ya[i] > 0], xa[i, 0][ya[i] == 0]
            assert inside.mean() > outside.mean() + 0.5  # the bright square is where the target went


def test_cldf_student_retrains_a_bundles_student_with_the_settings_given(copy, small_manifest, capsys):
    assert main(["-q", "student", "--bundle", str(copy), "--data", str(small_manifest), "--device", "cpu",
                 "--set", "student.steps=41"]) == 0
    card = json.loads((copy / "bundle.json").read_text())
    assert card["config"]["student"]["steps"] == 41 and card["student"]["steps"] == 41
    assert card["student"]["command"].startswith("cldf -q student")
    assert not (copy.parent / "bundle.student-checkpoints").exists()
    load_bundle(copy)
    assert main(["-q", "student", "--bundle", str(copy), "--data", str(small_manifest), "--device", "cpu",
                 "--set", "diffusion.steps=3"]) == 2
    assert "student settings only" in capsys.readouterr().err


def test_cldf_student_choose_weighs_the_student_again_and_changes_no_weight(copy, small_manifest):
    from cldf.config.grids import STUDENT_THRESHOLDS

    files = json.loads((copy / "bundle.json").read_text())["files"]
    assert main(["-q", "student", "--bundle", str(copy), "--data", str(small_manifest), "--device", "cpu",
                 "--choose"]) == 0
    card = json.loads((copy / "bundle.json").read_text())
    assert card["files"] == files and card["student"]["rechosen"]["command"].startswith("cldf -q student")
    rows = card["student"]["table"]
    assert {r["threshold"] for r in rows if r["segmenter"] == "student"} == set(STUDENT_THRESHOLDS)
    assert {r["segmenter"] for r in rows} == {"cldf", "student", "student+sam"}
    chosen = card["student"]["chosen"]
    if chosen["student.segmenter"] == "student":
        assert card["config"]["student"]["threshold"] == chosen["student.threshold"] == rows[0]["threshold"]
    assert load_bundle(copy).student is not None


def test_evaluate_gives_the_student_rows_alone(tiny_bundle, small_manifest):
    from cldf.evaluation.evaluate import evaluate
    from cldf.manifest import load_manifest

    bundle = load_bundle(tiny_bundle)
    test = bundle.card["training"]["split"]["test"]
    report = evaluate(bundle, load_manifest(small_manifest), test, [1], "cpu", methods=("student", "student+sam"),
                      progress=False)
    assert set(report["methods"]) == {"student", "student+sam"}
    assert all(0 <= r["dice_3d"] <= 1 for r in report["methods"].values())


def test_a_pipeline_that_finds_nothing_leaves_the_bundle_without_a_student(copy, small_manifest, tmp_path, caplog):
    from cldf.bundle import update_card
    from cldf.manifest import load_manifest
    from cldf.trainer.stages import TrainRequest
    from cldf.trainer.train import _student_stage

    card = json.loads((copy / "bundle.json").read_text())
    config = {**card["config"], "postprocess": {**card["config"]["postprocess"], "min_similarity": 1.0},  # no mask kept
              "student": {**card["config"]["student"], "segmenter": "cldf"}}  # as `cldf train` leaves it
    files = {k: v for k, v in card["files"].items() if k != "student.safetensors"}
    (copy / "student.safetensors").unlink()
    update_card(copy, config=config, files=files, student={})
    cfg = load_bundle(copy).config
    req = TrainRequest(manifest=small_manifest, out=copy, config=cfg, device="cpu", progress=False,
                       target_labels=card["task"]["mask_labels"])
    with caplog.at_level("WARNING"):
        _student_stage(copy, cfg, load_manifest(small_manifest), req, tmp_path / "checkpoints")
    assert "nothing to train a student on" in caplog.text and "segments with the pipeline" in caplog.text
    bundle = load_bundle(copy)  # installed, sealed, and segmenting with the pipeline
    assert "nothing to train a student on" in bundle.card["student"]["skipped"]
    assert bundle.student is None and bundle.config.student.segmenter == "cldf"


def test_the_segmenters_validation_score_is_said_and_recorded_and_a_low_one_warned(tiny_bundle, case_paths,
                                                                                     tmp_path, caplog):
    card = json.loads((tiny_bundle / "bundle.json").read_text())
    settings = card["config"]["student"]
    row = next(r for r in card["student"]["table"] if r["segmenter"] == "student"
               and r["min_component_fraction"] == settings["min_component_fraction"]
               and r["threshold"] == settings["threshold"])
    with caplog.at_level("INFO"):
        assert main(["segment", "--bundle", str(tiny_bundle), "--input", f"FLAIR={case_paths['FLAIR']}",
                     "--input", f"T1={case_paths['T1']}", "--segmenter", "student", "--no-maps",
                     "--out", str(tmp_path / "out")]) == 0
    marker = json.loads((tmp_path / "out" / "cldf-result.json").read_text())
    assert marker["validation"] == {"segmenter": "student", "dice_3d": row["dice_3d"],
                                    "patients": len(card["student"]["validation_cases"])}
    said = {r.getMessage(): r.levelname for r in caplog.records}
    if row["dice_3d"] < 0.3:  # a tiny bundle trained for seconds
        assert said[f"bundle 'tiny' scored a 3D Dice of {row['dice_3d']:.2f} on its 1 validation patients (below 0.3): its masks are "
                     "unreliable; train it on more patients or for longer"] == "WARNING"
    else:
        assert any(m.endswith(f"3D Dice {row['dice_3d']:.2f} on 1 validation patients (student)") for m in said)


@pytest.mark.parametrize("name,segmenter,dice", [("brain-mri-flair-t1", None, 0.8335),
                                                 ("brain-mri-flair-t1", "cldf", 0.7132),
                                                 ("abdomen-ct-spleen", None, 0.8063),
                                                 ("abdomen-ct-liver", None, 0.8802),
                                                 ("abdomen-ct-kidney", None, 0.7678)])
def test_the_shipped_cards_give_their_validation_scores(name, segmenter, dice):
    from cldf.card import validation_score
    from conftest import REPO

    card = json.loads((REPO / "CLDFSegmentation/Resources/Models" / name / "bundle.json").read_text())
    score = validation_score(card, segmenter)
    assert score.dice_3d == dice and score.patients == len(card["student"]["validation_cases"]) and not score.low


def test_the_panel_line_gives_each_segmenters_validation_score_and_warns_when_low_or_missing(tiny_bundle, tmp_path):
    from cldf.bundle import write_card
    from cldf.card import card_summary

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    card = json.loads((copy / "bundle.json").read_text())
    for row in card["student"]["table"]:
        row["dice_3d"] = 0.8 if row["segmenter"] == "student" else 0.1
    card["selection"] = {}  # the pipeline's own rule table gone: only the student's table speaks for it
    write_card(copy / "bundle.json", card)
    summary = card_summary(copy)
    assert summary.says("student").startswith("Validation: 3D Dice 0.80 on 1 validation patients (student)")
    assert summary.says("cldf") == ("Warning: bundle 'tiny' scored a 3D Dice of 0.10 on its 1 validation patients "
                                    "(below 0.3): its masks are unreliable; train it on more patients or for longer.")
    card.pop("student")
    write_card(copy / "bundle.json", card)
    assert "no validation score" in card_summary(copy).says("bundle")

"""`cldf train --time-budget`: each stage stops at its share and the bundle is complete and says so; the paper
preset (256 x 256, the paper's networks) trains to the end on real scans that way and segments a real slice."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.bundle import load_bundle
from cldf.cli import main
from cldf.config import CLDFConfig
from cldf.trainer.stages import BUDGET_SHARES, TrainRequest
from conftest import TINY_STUDENT

BUNDLE_FILES = {"bundle.json", "cdm.safetensors", "noisy_classifier.safetensors", "cam_classifier.safetensors",
                "decoders.safetensors"}


def test_a_time_budget_stops_each_stage_at_its_share_and_the_bundle_records_it(small_manifest, tmp_path):
    out = tmp_path / "bundle"
    args = ["-q", "train", "--data", str(small_manifest), "--out", str(out), "--target", "1", "--channels", "FLAIR,T1",
            "--device", "cpu", "--decoder-seeds", "0", "--no-select", "--time-budget", "0.1",
            "--set", "data.resolution=32", "--set", "diffusion.steps=1000000", "--set", "noisy_classifier.steps=1000000",
            "--set", "cam_classifier.steps=1", "--set", "decoder.epochs=1", "--set", "decoder.pixels_per_class=32",
            "--set", "student.enabled=false"]  # the student's budget: below
    assert main(args) == 0
    assert set(p.name for p in out.iterdir()) == BUNDLE_FILES
    training = json.loads((out / "bundle.json").read_text(encoding="utf-8"))["training"]
    budget = training["time_budget"]
    assert budget["minutes"] == 0.1 and budget["shares"] == BUDGET_SHARES
    stopped = budget["stopped_at_share"]
    assert {"cdm", "noisy_classifier"} <= set(stopped) and "cam_classifier" not in stopped  # 1 step, taken however little is left
    for name in ("cdm", "noisy_classifier"):  # each stopped at a step boundary
        assert 0 < stopped[name] < 1_000_000
    trained = ("cdm", "noisy_classifier", "cam_classifier", "decoders")  # no selection, AME-CAM, CPF-CTE, student
    cdm_share = 6.0 * BUDGET_SHARES["cdm"] / sum(BUDGET_SHARES[s] for s in trained)  # less what ran before it
    seconds = training["wall_clock_s"]
    assert seconds["cdm"] < cdm_share + 1.0 and seconds["cdm"] + seconds["noisy_classifier"] < 6.0 + 1.0
    load_bundle(out)
    # the student alone within a budget: its pseudo-masks' share ends after the first case, its training and
    # validation then take what is left
    assert main(["-q", "student", "--bundle", str(out), "--data", str(small_manifest), "--device", "cpu",
                 "--time-budget", "0.01", *TINY_STUDENT]) == 0
    student = json.loads((out / "bundle.json").read_text(encoding="utf-8"))["student"]
    assert student["cases_with_pseudo_masks"] == 1 < student["training_cases"]


def _without_student(bundle: Path, copy: Path) -> Path:
    """A copy of ``bundle`` as the student's stage finds it: the pipeline alone."""
    from cldf.bundle import update_card

    shutil.copytree(bundle, copy)
    card = json.loads((copy / "bundle.json").read_text(encoding="utf-8"))
    (copy / "student.safetensors").unlink()
    update_card(copy, files={k: v for k, v in card["files"].items() if k != "student.safetensors"}, student={},
                config={**card["config"], "student": {**card["config"]["student"], "segmenter": "cldf"}})
    return copy


def test_a_student_whose_time_is_already_spent_is_left_out_and_the_card_says_why(tiny_bundle, small_manifest,
                                                                                 tmp_path, caplog):
    from cldf.manifest import load_manifest
    from cldf.trainer.train import _student_stage

    copy = _without_student(tiny_bundle, tmp_path / "bundle")
    cfg = load_bundle(copy).config
    req = TrainRequest(manifest=small_manifest, out=copy, config=cfg, device="cpu", progress=False,
                       time_budget_min=1.0, started=time.monotonic() - 61.0)  # the minute is gone
    with caplog.at_level("WARNING"):
        _student_stage(copy, cfg, load_manifest(small_manifest), req, tmp_path / "checkpoints")
    assert "time budget (1 min) was spent before the student's stage" in caplog.text
    bundle = load_bundle(copy)
    assert bundle.student is None and "time budget" in bundle.card["student"]["skipped"]
    assert not (tmp_path / "checkpoints").exists()  # no work was started


def test_each_stage_gets_its_share_of_what_is_left_among_the_stages_still_to_run():
    req = TrainRequest(manifest=Path("m.json"), out=Path("b"), config=CLDFConfig(), time_budget_min=10.0,
                       started=time.monotonic() - 60.0)  # a minute gone: 540 s left
    runs = ("cdm", "noisy_classifier", "cam_classifier", "selection", "decoders", "postprocess", "student")
    assert req.stage_seconds("cdm") == pytest.approx(540 * 0.40 / sum(BUDGET_SHARES[s] for s in runs), abs=1.0)
    assert req.stage_seconds("student") == pytest.approx(540.0, abs=1.0)  # the last stage: all that is left
    req.select = False  # no selection: its shares go to the others
    assert req.stage_seconds("decoders") == pytest.approx(540 * 0.10 / 0.15, abs=1.0)
    student_only = TrainRequest(manifest=Path("m.json"), out=Path("b"), config=CLDFConfig(), time_budget_min=1.0,
                                budget_stages=("student",))
    assert student_only.stage_seconds("student") == pytest.approx(60.0, abs=1.0)
    late = TrainRequest(manifest=Path("m.json"), out=Path("b"), config=CLDFConfig(), time_budget_min=1.0,
                        started=time.monotonic() - 120.0)
    assert late.stage_seconds("cdm") == 0.0  # over budget: every stage stops at its first step boundary


def test_the_paper_preset_trains_to_the_end_on_real_scans_and_segments(small_manifest, case_paths, tmp_path):
    """The paper's networks at 256 x 256 within a one-minute budget (on a CPU: batches of 2, and the mean
    gradient over 2 of its 20 timesteps, which costs 26 s per slice on one core)."""
    out = tmp_path / "paper"
    args = ["-q", "train", "--data", str(small_manifest), "--out", str(out), "--target", "1", "--channels", "FLAIR,T1",
            "--device", "cpu", "--preset", "paper", "--time-budget", "1", "--no-select", "--decoder-seeds", "0",
            "--set", "diffusion.batch_size=2", "--set", "noisy_classifier.batch_size=2",
            "--set", "cam_classifier.batch_size=2", "--set", "maps.mg_timesteps=[100,200]",  # 2 of its 20 MG steps
            "--set", "student.enabled=false"]  # its pseudo-masks would run that mean gradient on every training slice
    assert main(args) == 0
    bundle = load_bundle(out)
    assert bundle.config.data.resolution == 256 and bundle.config.diffusion.channels == (64, 128, 256, 256)
    assert set(bundle.card["training"]["time_budget"]["stopped_at_share"]) >= {"cdm", "noisy_classifier"}

    flair, t1 = (sitk.ReadImage(str(case_paths[c])) for c in ("FLAIR", "T1"))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case_paths["mask"])))
    z = int(np.argmax(mask.sum(axis=(1, 2))))  # two real slices through the tumour
    paths = {}
    for name, image in (("FLAIR", flair), ("T1", t1)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(image[:, :, z : z + 2], str(paths[name]))
    result = tmp_path / "result"
    assert main(["-q", "segment", "--bundle", str(out), "--input", f"FLAIR={paths['FLAIR']}",
                 "--input", f"T1={paths['T1']}", "--out", str(result), "--device", "cpu"]) == 0
    seg = sitk.ReadImage(str(result / "mask.nii.gz"))
    assert seg.GetSize() == (flair.GetSize()[0], flair.GetSize()[1], 2)
    assert (result / "cldf-result.json").is_file()


def test_the_paper_preset_on_a_cpu_warns_about_its_memory_before_any_work(small_manifest, tmp_path, monkeypatch,
                                                                           caplog):
    import cldf.trainer.train as train_module

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the checks")

    monkeypatch.setattr(train_module, "load_manifest", stop)
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="stopped after the checks"):
        main(["train", "--data", str(small_manifest), "--out", str(tmp_path / "b"), "--target", "1",
              "--channels", "FLAIR,T1", "--device", "cpu", "--preset", "paper"])
    assert "more than 23 GB at the paper's 16" in caplog.text and "diffusion.batch_size=2" in caplog.text
    assert not (tmp_path / "b").exists()


def test_a_selection_whose_share_holds_no_grid_point_is_left_out_and_the_preset_kept(tiny_bundle, small_manifest,
                                                                                     tmp_path, caplog):
    from cldf.manifest import load_manifest
    from cldf.trainer.slicecache import cached_slice_set
    from cldf.trainer.train import _select

    bundle = load_bundle(tiny_bundle)
    cfg, card = bundle.config, bundle.card
    manifest = load_manifest(small_manifest)
    split = card["training"]["split"]
    data = cached_slice_set(manifest, split["train"], cfg.data.channels, cfg.data.resolution,
                            tuple(cfg.data.percentiles), [1], cfg.data.positive_fraction, cfg.data.orientation)
    req = TrainRequest(manifest=small_manifest, out=tmp_path / "b", config=cfg, device="cpu", progress=False,
                       time_budget_min=0.01, budget_stages=("selection",))  # 0.6 s: one batch of maps takes more
    before = cfg.to_dict()
    with caplog.at_level("WARNING"):
        chosen = _select(bundle, data, manifest, split["val"], req, tmp_path)
    assert chosen.to_dict() == before and req.budget_stops["selection"] == 0
    assert "settings selection skipped: its share of the time budget" in caplog.text
    record = json.loads((tmp_path / "selection.json").read_text(encoding="utf-8"))
    assert record["table"] == [] and "preset's settings were kept" in record["skipped"]
    assert _select(bundle, data, manifest, split["val"], req, tmp_path).to_dict() == before  # resumed: the same


def test_a_student_whose_share_cannot_take_two_volumes_through_the_pipeline_is_left_out(tiny_bundle, small_manifest,
                                                                                         tmp_path, caplog):
    from cldf.manifest import load_manifest
    from cldf.trainer.train import _student_stage

    copy = _without_student(tiny_bundle, tmp_path / "bundle")
    ckdir = tmp_path / "checkpoints"
    (ckdir / "postprocess-volumes").mkdir(parents=True)
    (ckdir / "postprocess-volumes" / "case.safetensors").write_bytes(b"")  # one volume scored ...
    (ckdir / "postprocess.json").write_text(json.dumps({"seconds": 100.0}), encoding="utf-8")  # ... in 100 s
    cfg = load_bundle(copy).config
    req = TrainRequest(manifest=small_manifest, out=copy, config=cfg, device="cpu", progress=False,
                       time_budget_min=1.0, budget_stages=("student",))  # 60 s left, 200 s needed
    with caplog.at_level("WARNING"):
        _student_stage(copy, cfg, load_manifest(small_manifest), req, ckdir)
    assert "is less than its first training case and validation patient take through the pipeline (about 200 s)" \
        in caplog.text
    assert load_bundle(copy).student is None and "about 200 s" in load_bundle(copy).card["student"]["skipped"]

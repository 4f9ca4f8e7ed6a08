"""The `cldf` command end to end on real scans: segment, evaluate, train resume, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from cldf.cli import main
from conftest import TINY_STUDENT, oblique_direction, write_image


@pytest.fixture(scope="module")
def oblique_case(case_paths, tmp_path_factory):
    """A real case's voxels on an oblique, right-handed, anisotropic grid."""
    d = tmp_path_factory.mktemp("oblique")
    geometry = {"spacing": (0.7, 0.9, 3.3), "origin": (-12.5, 40.0, 7.25), "direction": oblique_direction()}
    out = {}
    for name in ("FLAIR", "T1"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(case_paths[name])))[:, :200, :180]
        out[name] = write_image(a, d / f"{name}.nrrd", **geometry)
    return out


def _segment(bundle, inputs, out, *extra):
    args = ["-q", "segment", "--bundle", str(bundle), "--out", str(out), "--device", "cpu"]
    for k, v in inputs.items():
        args += ["--input", f"{k}={v}"]
    return main(args + list(extra))


def test_outputs_have_the_inputs_exact_geometry(tiny_bundle, oblique_case, tmp_path):
    assert _segment(tiny_bundle, oblique_case, tmp_path / "o") == 0
    ref = sitk.ReadImage(str(oblique_case["FLAIR"]))
    for name in ("cam", "mean_gradient", "seeds", "mask"):
        img = sitk.ReadImage(str(tmp_path / "o" / f"{name}.nii.gz"))
        assert img.GetSize() == ref.GetSize() == (180, 200, ref.GetSize()[2])
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-5)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / "mask.nii.gz")))
    seeds = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / "seeds.nii.gz")))
    assert set(np.unique(mask)) <= {0, 1} and set(np.unique(seeds)) <= {0, 1, 2}
    cam = sitk.ReadImage(str(tmp_path / "o" / "cam.nii.gz"))
    assert cam.GetPixelID() == sitk.sitkUInt8  # 0..255 for the map's 0..1
    rows = (tmp_path / "o" / "slices.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("slice,presence_probability") and len(rows) == ref.GetSize()[2] + 1


def test_two_runs_with_the_same_seed_give_identical_masks(tiny_bundle, case_paths, tmp_path):
    inputs = {"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}
    assert _segment(tiny_bundle, inputs, tmp_path / "a") == 0
    assert _segment(tiny_bundle, inputs, tmp_path / "b", "--batch-size", "3") == 0
    for name in ("mask", "seeds", "cam"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / f"{name}.nii.gz"))).astype(int)
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / f"{name}.nii.gz"))).astype(int)
        # another batch size may move a map value across an 8-bit step (1/255); masks and seeds are equal
        np.testing.assert_allclose(a, b, atol=1 if name == "cam" else 0)


def test_refuses_an_output_folder_with_results_unless_overwrite(tiny_bundle, case_paths, tmp_path, capsys):
    inputs = {"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}
    assert _segment(tiny_bundle, inputs, tmp_path / "o", "--format", "nrrd") == 0
    before = (tmp_path / "o" / "mask.nrrd").stat().st_mtime_ns
    assert _segment(tiny_bundle, inputs, tmp_path / "o", "--format", "nrrd") == 2
    assert "already holds results" in capsys.readouterr().err
    assert (tmp_path / "o" / "mask.nrrd").stat().st_mtime_ns == before
    assert _segment(tiny_bundle, inputs, tmp_path / "o", "--format", "nrrd", "--overwrite") == 0


@pytest.mark.parametrize("inputs,message", [
    (lambda p: {"FLAIR": p["FLAIR"]}, "missing channel"),
    (lambda p: {"FLAIR": p["FLAIR"], "T1": p["T1"], "T1ce": p["T1"]}, "unexpected channel"),
    (lambda p: {"FLAIR": p["FLAIR"], "T1": p["mask"].parent / "nothing.nii.gz"}, "file not found"),
])
def test_bad_inputs_get_a_clear_error_and_write_nothing(tiny_bundle, case_paths, tmp_path, capsys, inputs, message):
    assert _segment(tiny_bundle, inputs(case_paths), tmp_path / "o") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refuses_channels_on_different_grids(tiny_bundle, case_paths, oblique_case, tmp_path, capsys):
    assert _segment(tiny_bundle, {"FLAIR": case_paths["FLAIR"], "T1": oblique_case["T1"]}, tmp_path / "o") == 2
    assert "different voxel grids" in capsys.readouterr().err


def test_evaluate_reports_every_method(tiny_bundle, small_manifest, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["-q", "evaluate", "--bundle", str(tiny_bundle), "--data", str(small_manifest),
                 "--split", "test", "--out", str(out), "--device", "cpu", "--record"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    recorded = json.loads((tiny_bundle / "bundle.json").read_text(encoding="utf-8"))["metrics"]["test"]
    assert recorded["methods"]["cldf"]["dice"] == report["methods"]["cldf"]["dice"]
    assert recorded["command"].startswith("cldf ") and recorded["cases"] == report["cases"]
    assert list(report["methods"]) == ["gradcam", "layercam", "scorecam", "mg", "fusion", "cdm", "layercam+cl",
                                       "mg+cl", "cldf-untrained", "encoder-features", "cldf", "cldf+sam", "student",
                                       "student+sam"]
    cldf = report["methods"]["cldf"]
    assert sorted(cldf["by_seed"]) == ["0", "1"] and 0 <= cldf["dice"] <= 1 and cldf["n_slices"] > 0
    for method, r in report["methods"].items():  # pointing only for maps; precision for every row
        assert ("pointing" in r) == (method in ("gradcam", "layercam", "scorecam", "mg", "cdm")), method
        assert 0 <= r["precision"] <= 1 and 0 <= r.get("pointing", 0) <= 1, method
        assert r["fp_ml_empty_slices"] >= 0 and 0 <= r["dice_3d"] <= 1, method
    case = report["per_case"][report["cases"][0]]["cldf"]
    assert case["fp_ml_empty_slices"] >= 0 and 0 <= case["dice_3d"] <= 1
    assert "| cldf |" in capsys.readouterr().out


def test_segment_writes_the_cdm_saliency_map_on_request(tiny_bundle, oblique_case, tmp_path):
    assert _segment(tiny_bundle, oblique_case, tmp_path / "o", "--maps", "cdm") == 0
    sal = sitk.ReadImage(str(tmp_path / "o" / "cdm_saliency.nii.gz"))
    ref = sitk.ReadImage(str(oblique_case["FLAIR"]))
    assert sal.GetSize() == ref.GetSize() and np.allclose(sal.GetDirection(), ref.GetDirection())
    a = sitk.GetArrayFromImage(sal)
    assert sal.GetPixelID() == sitk.sitkUInt8 and a.std() > 0
    assert _segment(tiny_bundle, oblique_case, tmp_path / "p", "--maps", "cam") == 2


def test_ablate_adds_the_decoders_train_makes_to_an_older_bundle(tiny_bundle, small_manifest, tmp_path, capsys):
    import torch

    from cldf.bundle import load_bundle, replace_decoders

    older = shutil.copytree(tiny_bundle, tmp_path / "older", ignore=shutil.ignore_patterns(".checkpoints"))
    full = load_bundle(tiny_bundle)
    replace_decoders(older, {v: full.decoders[v] for v in ("cdm", "untrained")})
    report = tmp_path / "r.json"
    evaluate = ["-q", "evaluate", "--bundle", str(older), "--data", str(small_manifest), "--out", str(report),
                "--device", "cpu"]
    assert main(evaluate + ["--methods", "mg+cl"]) == 2
    assert "cldf ablate" in capsys.readouterr().err
    assert main(["-q", "ablate", "--bundle", str(older), "--data", str(small_manifest), "--device", "cpu"]) == 0
    added = load_bundle(older)
    for v in ("cam-seeds", "mg-seeds", "encoder"):
        for s, d in full.decoders[v].items():
            for k, t in d.state_dict().items():
                torch.testing.assert_close(added.decoders[v][s].state_dict()[k], t)
    assert json.loads((older / "bundle.json").read_text(encoding="utf-8"))["added_decoders"]["variants"] == ["cam-seeds", "mg-seeds", "encoder"]
    assert main(evaluate + ["--methods", "mg+cl,cdm"]) == 0
    assert list(json.loads(report.read_text(encoding="utf-8"))["methods"]) == ["mg+cl", "cdm"]


def test_train_resumes_instead_of_starting_over(small_manifest, tmp_path, monkeypatch, capsys):
    import cldf.trainer.train as train_module

    out = tmp_path / "bundle"
    args = ["-q", "train", "--data", str(small_manifest), "--target", "1", "--channels", "FLAIR,T1",
            "--out", str(out), "--device", "cpu", "--decoder-seeds", "0", "--set", "data.resolution=32",
            "--set", "diffusion.steps=3", "--set", "noisy_classifier.steps=3", "--set", "cam_classifier.steps=3",
            "--set", "decoder.epochs=1", "--set", "decoder.pixels_per_class=32", "--no-refine-selection",
            *TINY_STUDENT]

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_train_decoders", stop)  # stopped after the network stages
    assert main(args) == 130 and not out.exists()
    cdm_meta = json.loads((tmp_path / "bundle.checkpoints" / "cdm.json").read_text(encoding="utf-8"))
    assert cdm_meta["step"] == 3
    monkeypatch.undo()
    assert main(args) == 0  # every network stage found complete: nothing retrained
    first = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    assert first["training"]["wall_clock_s"]["cdm"] == round(cdm_meta["seconds"], 1)
    assert first["training"]["command"].startswith("cldf ") and "--channels FLAIR,T1" in first["training"]["command"]
    assert not (tmp_path / "bundle.checkpoints").exists()
    capsys.readouterr()
    assert main(args) == 2  # a finished bundle is never rewritten
    assert "already holds a finished bundle" in capsys.readouterr().err
    assert json.loads((out / "bundle.json").read_text(encoding="utf-8")) == first


def test_train_help_is_for_newcomers(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "resumes" in text and "--preset" in text and "slice labels" in text


def test_bench_compares_both_paths_on_the_same_slices(tiny_bundle, small_manifest):
    from cldf.evaluation.bench import run_bench

    report = run_bench(tiny_bundle, small_manifest, None, slices=3, device="cpu")
    assert report["max_abs_diff"] < 1e-4 and report["slices"] == 3
    assert all(report[p]["s_per_slice"] > 0 for p in ("fast", "fast-all", "literal", "layercam", "cdm-saliency"))
    assert "cldf-volume" not in report  # a slice subset is not a volume


def test_bench_resamples_the_volume_and_writes_the_report(tiny_bundle, small_manifest, tmp_path):
    from cldf import cli_parser as cli
    from cldf.evaluation import bench

    assert cli.PATHS == bench.PATHS
    out = tmp_path / "speed.md"
    report = bench.run_bench(tiny_bundle, small_manifest, None, device="cpu", depth=7,
                             paths=("fast", "literal", "cldf-volume", "cldf-volume-sam", "student-volume",
                                    "student-cohort"), out=out)
    assert report["slices"] == 7 and report["cldf-volume"]["seconds"] > 0
    text = out.read_text(encoding="utf-8")
    assert "resampled to 7 slices" in text and "| cldf-volume |" in text and "whole volume" in text
    assert "| student-volume |" in text and "faster than cldf-volume-sam" in text and "volumes per hour" in text
    assert json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["depth"] == 7
    with pytest.raises(ValueError, match="must include fast and literal"):
        bench.run_bench(tiny_bundle, small_manifest, None, device="cpu", paths=("layercam",))


@pytest.mark.parametrize("flags", [[], ["-v"]])
def test_library_notes_are_printed_only_when_asked_for_and_warnings_stand_out(flags):
    """The torchvision note (beside a CPU-only torch) is a debug line; warnings carry their level."""
    code = ("import logging, sys; from cldf.cli import _log_to_stderr; _log_to_stderr(False, '-v' in sys.argv); "
            "from cldf.refine import _import_builder; _import_builder(); "
            "logging.getLogger('cldf').warning('intensities unlike the training scans')")
    run = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == "warning: intensities unlike the training scans"
    torchvision = [line for line in lines if "torchvision" in line]
    assert not torchvision if not flags else all("LiteMedSAM does not need them" in t for t in torchvision)


def _refused_training(doc: dict, folder, capsys) -> str:
    """`cldf train` on the manifest ``doc``: refused (exit 2) before any work, nothing written; its error."""
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps(doc), encoding="utf-8")
    out = folder / "bundle"
    assert main(["-q", "train", "--data", str(manifest), "--out", str(out), "--channels", "FLAIR,T1",
                 "--target", "1", "--device", "cpu"]) == 2
    assert not out.exists() and not list(folder.glob("bundle.*"))  # no checkpoint folder either
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("cldf train: error: ")
    return err


@pytest.mark.parametrize("cases", [1, 2])
def test_training_on_too_few_patients_is_refused_before_any_work(small_manifest, tmp_path, capsys, cases):
    doc = json.loads(small_manifest.read_text(encoding="utf-8"))
    doc["cases"] = [{k: v for k, v in c.items() if k != "split"} for c in doc["cases"][:cases]]
    err = _refused_training(doc, tmp_path, capsys)
    assert "the training split holds 1 patient(s) (TCGA_" in err  # 60 % of 1 or 2 patients: 1
    assert f"of the manifest's {cases}; training needs at least 2 patients" in err and "add patients" in err


def test_a_case_without_a_channel_asked_for_is_named_before_any_work(small_manifest, tmp_path, capsys):
    doc = json.loads(small_manifest.read_text(encoding="utf-8"))
    val = next(c for c in doc["cases"] if c["split"] == "val")
    del val["channels"]["T1"]  # a validation case: the run would have found out only at the settings selection
    doc["cases"][0]["channels"]["FLAIR"] = str(tmp_path / "gone.nii.gz")
    err = _refused_training(doc, tmp_path, capsys)
    assert f"case '{val['id']}' has no channel 'T1' (it has 'FLAIR'" in err
    assert f"case '{doc['cases'][0]['id']}', channel 'FLAIR': {tmp_path / 'gone.nii.gz'} is not there" in err


def test_a_setting_out_of_its_range_is_refused_before_any_work(small_manifest, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["-q", "train", "--data", str(small_manifest), "--out", str(out), "--channels", "FLAIR,T1",
                 "--target", "1", "--device", "cpu", "--set", "data.resolution=65"]) == 2
    assert "setting data.resolution is 65; the diffusion U-Net halves it 2 times, so it must be a multiple of 4" \
        in capsys.readouterr().err
    assert not out.exists()

"""`cldf train` against mismatched re-runs and interruptions, on real scans: refusals change nothing on disk,
SIGINT/SIGTERM save at the step boundary, SIGKILL loses at most the checkpoint interval, bundles stay clean."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cldf.trainer.train as train_module
from cldf.cli import main
from conftest import TINY_STUDENT

TINY = ("--target", "1", "--channels", "FLAIR,T1", "--device", "cpu", "--decoder-seeds", "0",
        "--set", "data.resolution=32", "--set", "diffusion.batch_size=2", "--set", "noisy_classifier.steps=3",
        "--set", "cam_classifier.steps=3", "--set", "decoder.epochs=1", "--set", "decoder.pixels_per_class=32",
        *TINY_STUDENT)
BUNDLE_FILES = {"bundle.json", "cdm.safetensors", "noisy_classifier.safetensors", "cam_classifier.safetensors",
                "decoders.safetensors", "student.safetensors"}


def train_args(manifest: Path, out: Path, *extra: str, steps: int = 3) -> list[str]:
    return ["train", "--data", str(manifest), "--out", str(out), "--set", f"diffusion.steps={steps}", *TINY, *extra]


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` (itself included) with its mtime and size."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


def interrupted_run(manifest: Path, out: Path, monkeypatch, capsys) -> dict:
    """A run stopped (as by Ctrl-C) after its network stages; returns its CDM checkpoint's record."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_train_decoders", stop)
    assert main(["-q", *train_args(manifest, out, "--no-select")]) == 130
    monkeypatch.undo()
    assert "Run the same command again" in capsys.readouterr().err
    return json.loads((out.parent / f"{out.name}.checkpoints" / "cdm.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def finished(small_manifest: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "bundle"
    assert main(["-q", *train_args(small_manifest, out, "--no-select")]) == 0
    return out


def test_a_different_rerun_of_an_interrupted_run_is_refused_with_the_differences_and_changes_nothing(
        small_manifest, tmp_path, monkeypatch, capsys):
    out = tmp_path / "b"
    assert interrupted_run(small_manifest, out, monkeypatch, capsys)["step"] == 3
    other_data = tmp_path / "manifest.json"
    other_data.write_text(small_manifest.read_text(encoding="utf-8") + "\n")
    before = listing(tmp_path)
    assert main(["-q", *train_args(small_manifest, out, "--no-select", "--seed", "1", steps=9)]) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoints of a different training run" in err
    assert "setting diffusion.steps: checkpoints 3, this command 9" in err
    assert "seed: checkpoints 0, this command 1" in err
    assert "same command" in err and "new --out" in err
    assert main(["-q", *train_args(other_data, out, "--no-select")]) == 2
    assert "manifest content (sha256): checkpoints" in capsys.readouterr().err
    assert main(["-q", *train_args(small_manifest, out)]) == 2  # settings selection asked for this time
    assert "settings selection: checkpoints false, this command true" in capsys.readouterr().err
    assert listing(tmp_path) == before
    assert main(["-q", *train_args(small_manifest, out, "--no-select")]) == 0  # the same command finishes it
    assert set(os.listdir(out)) == BUNDLE_FILES


def test_a_finished_bundle_and_foreign_folders_are_refused_before_any_work(finished, small_manifest, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    for out, message in [(finished, "never rewrites one: choose another --out (`cldf tune`"),
                         (tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "b", "lies below"),
                         (tmp_path / "foreign", "other files in it")]:
        before = listing(out.parent)
        assert main(["-q", *train_args(small_manifest, out, "--no-select")]) == 2
        err = capsys.readouterr().err
        assert message in err and "--out" in err, err
        assert listing(out.parent) == before


def test_an_unknown_intensity_augmentation_is_refused_before_any_work(small_manifest, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["-q", *train_args(small_manifest, out, "--no-select", "--set", "cam_classifier.intensity=strong")]) == 2
    assert "setting cam_classifier.intensity is 'strong'; it must be one of ['narrow', 'wide']" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "bundle.checkpoints").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind the superuser")
def test_an_out_that_cannot_be_written_is_refused(small_manifest, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["-q", *train_args(small_manifest, locked / "b", "--no-select")]) == 2
    assert "cannot write into" in capsys.readouterr().err


def test_checkpoints_live_beside_the_bundle_and_go_once_it_is_complete(finished):
    assert set(os.listdir(finished)) == BUNDLE_FILES
    assert not (finished.parent / "bundle.checkpoints").exists() and not (finished.parent / "bundle.partial").exists()


def test_keep_checkpoints_keeps_them_beside_the_bundle_and_too_few_validation_patients_are_recorded(
        small_manifest, tmp_path, caplog):
    out = tmp_path / "kept"
    assert main(["-q", *train_args(small_manifest, out, "--keep-checkpoints")]) == 0  # 1 validation patient
    assert set(os.listdir(out)) == BUNDLE_FILES
    kept = tmp_path / "kept.checkpoints"
    assert {"run.json", "split.json", "cdm.json", "cdm.safetensors", "decoders.safetensors"} <= set(os.listdir(kept))
    skipped = json.loads((out / "bundle.json").read_text(encoding="utf-8"))["selection"]["skipped"]
    assert "has 1 patient(s) and needs at least 2" in skipped
    assert any(r.levelname == "WARNING" and r.getMessage() == skipped for r in caplog.records)


def test_a_run_an_older_version_started_resumes_from_its_checkpoints_inside_the_folder(
        small_manifest, tmp_path, monkeypatch, capsys):
    out = tmp_path / "b"
    cdm = interrupted_run(small_manifest, out, monkeypatch, capsys)
    legacy = out / ".checkpoints"  # where older versions kept them, over the bundle they were retraining
    out.mkdir()
    os.replace(tmp_path / "b.checkpoints", legacy)
    (legacy / "run.json").unlink()
    (out / "bundle.json").write_text("{}")
    os.utime(out / "bundle.json", (0, 0))
    assert main(["-q", *train_args(small_manifest, out, "--no-select")]) == 0
    assert set(os.listdir(out)) == BUNDLE_FILES and not (tmp_path / "b.checkpoints").exists()
    card = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    assert card["training"]["wall_clock_s"]["cdm"] == round(cdm["seconds"], 1)  # resumed, not retrained
    legacy.mkdir()  # an older version's finished bundle (its checkpoints older than it) is not rewritten either
    (legacy / "cdm.json").write_text("{}")
    os.utime(legacy / "cdm.json", (0, 0))
    assert main(["-q", *train_args(small_manifest, out, "--no-select")]) == 2
    assert "already holds a finished bundle" in capsys.readouterr().err


# --------------------------------------------------------------------------- signals to a `cldf train` process
class Child:
    """``python -m cldf train ...`` with its output collected as it comes (tqdm bars included)."""

    def __init__(self, args: list[str], every_s: float):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CLDF_CHECKPOINT_EVERY_S": str(every_s)}
        self.process = subprocess.Popen([sys.executable, "-m", "cldf", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=env)
        self.text = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.process.stdout.read1(4096):
            self.text += chunk.decode(errors="replace")

    def cdm_step(self) -> int:
        """The last CDM step its progress bar showed."""
        steps = re.findall(r"cdm:\s+\d+%\|[^|]*\|\s*(\d+)/", self.text)
        return int(steps[-1]) if steps else 0

    def wait_until(self, condition, timeout: float = 300.0) -> None:
        t0 = time.time()
        while not condition():
            assert self.process.poll() is None, f"ended early: {self.text[-2000:]}"
            assert time.time() - t0 < timeout, f"no progress: {self.text[-2000:]}"
            time.sleep(0.02)

    def wait(self, timeout: float = 300.0) -> int:
        rc = self.process.wait(timeout)
        self._reader.join()
        return rc


STEPS = 80  # CDM steps: a few seconds on a CPU


def resume_and_finish(args: list[str], saved: int, out: Path) -> None:
    again = Child(args, every_s=60)
    assert again.wait() == 0, again.text[-2000:]
    assert f"cdm: continuing from the checkpoint at step {saved} of {STEPS}" in again.text
    assert set(os.listdir(out)) == BUNDLE_FILES and not (out.parent / f"{out.name}.checkpoints").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_at_the_step_boundary_and_the_same_command_resumes_from_there(small_manifest, tmp_path, signum):
    out = tmp_path / "b"
    args = train_args(small_manifest, out, "--no-select", steps=STEPS)
    child = Child(args, every_s=3600)  # no periodic checkpoint: whatever is saved, the signal saved
    child.wait_until(lambda: child.cdm_step() >= 5)
    seen = child.cdm_step()
    child.process.send_signal(signum)
    assert child.wait() == 130
    assert "interrupted; the progress so far is saved in" in child.text and "Run the same command again" in child.text
    saved = json.loads((tmp_path / "b.checkpoints" / "cdm.json").read_text(encoding="utf-8"))["step"]
    assert seen <= saved < STEPS and not out.exists()
    resume_and_finish(args, saved, out)


def test_a_killed_run_loses_at_most_the_checkpoint_interval(small_manifest, tmp_path):
    """With an interval of 0 s every step is saved as it ends: a SIGKILL loses at most the step in progress."""
    out = tmp_path / "b"
    args = train_args(small_manifest, out, "--no-select", steps=STEPS)
    meta = tmp_path / "b.checkpoints" / "cdm.json"
    child = Child(args, every_s=0)
    child.wait_until(lambda: child.cdm_step() >= 5)
    seen = child.cdm_step()
    child.process.kill()
    assert child.wait() == -signal.SIGKILL
    saved = json.loads(meta.read_text(encoding="utf-8"))["step"]
    assert seen - 1 <= saved < STEPS  # the bar counts a step just before its checkpoint is written
    resume_and_finish(args, saved, out)


def test_the_post_processing_selection_resumes_after_the_last_finished_volume(tiny_bundle, small_manifest, tmp_path,
                                                                              monkeypatch):
    from cldf.bundle import load_bundle
    from cldf.manifest import load_manifest
    from cldf.segment import Segmenter
    from cldf.trainer import volume_select as select

    bundle, manifest = load_bundle(tiny_bundle), load_manifest(small_manifest)
    ids = [c.id for c in manifest.cases if c.split in ("val", "test")]
    run = (bundle, manifest, ids, [1], (0,), "cpu", False)
    real_volume, done = select._val_volume, []

    def stopped_after_one(seg, m, cid, *a, **k):
        if done:
            raise KeyboardInterrupt
        done.append(cid)
        return real_volume(seg, m, cid, *a, **k)

    monkeypatch.setattr(select, "_val_volume", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        select.select_postprocess(*run, cache=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{ids[0]}.safetensors"]
    monkeypatch.setattr(select, "_val_volume", real_volume)
    batches, real_maps = [], Segmenter.slice_maps
    monkeypatch.setattr(Segmenter, "slice_maps", lambda self, *a, **k: batches.append(1) or real_maps(self, *a, **k))
    resumed = select.select_postprocess(*run, cache=tmp_path / "cache")
    after_resume = len(batches)
    fresh = select.select_postprocess(*run)
    assert resumed == fresh  # the same choice and table as a run never interrupted
    assert 0 < after_resume < len(batches) - after_resume  # only the unfinished volume went through the networks


def test_the_settings_selection_resumes_after_the_last_finished_grid_point(tiny_bundle, small_manifest, tmp_path,
                                                                           monkeypatch):
    from cldf.bundle import load_bundle
    from cldf.decoder import PixelDecoder
    from cldf.manifest import load_manifest
    from cldf.trainer import select
    from cldf.trainer.slice_set import load_slice_set

    bundle, manifest = load_bundle(tiny_bundle), load_manifest(small_manifest)
    cfg = bundle.config.data
    train_ids = [c.id for c in manifest.cases if c.split == "train"]
    val_ids = [c.id for c in manifest.cases if c.split == "val"]
    data = load_slice_set(manifest, train_ids, cfg.channels, cfg.resolution, tuple(cfg.percentiles), [1],
                          cfg.positive_fraction, cfg.orientation)
    run = (bundle, data, manifest, val_ids, [1], (0,), "cpu", False)
    real_fit, fits = PixelDecoder.fit, []

    def counted(self, *a, **k):
        fits.append(1)
        if len(fits) == 2 and stop:
            raise KeyboardInterrupt
        return real_fit(self, *a, **k)

    monkeypatch.setattr(PixelDecoder, "fit", counted)
    stop, partial = True, tmp_path / "selection.partial.json"
    with pytest.raises(KeyboardInterrupt):
        select.select_settings(*run, partial=partial)
    assert len(json.loads(partial.read_text(encoding="utf-8"))) == 1  # one grid point finished and kept
    stop, fits[:] = False, []
    resumed = select.select_settings(*run, partial=partial)
    n_resumed, fits[:] = len(fits), []
    fresh = select.select_settings(*run)
    assert resumed[1] == fresh[1] and n_resumed == len(fits) - 1


@pytest.mark.parametrize("settings, message", [
    (["cam_classifier.sides=middle"], "setting cam_classifier.sides is 'middle'; it must be one of ['whole', 'left'"),
    (["cam_classifier.sides=left", "data.orientation=PLS"], "needs axial slices whose columns run left-right"),
    (["cam_classifier.sides=left"], "needs cam_classifier.flips = false"),
    (["noisy_classifier.sides=both"], "noisy_classifier.sides must stay 'whole'"),
    (["cam_classifier.sides=both", "cam_classifier.flips=false", "cam_classifier.left_labels=[1]"],
     "left_labels and right_labels go together"),
    (["cam_classifier.sides=both", "cam_classifier.flips=false", "cam_classifier.left_labels=[1]",
      "cam_classifier.right_labels=[2]"], "must together be the target's mask labels ([1])"),
])
def test_sides_that_do_not_fit_the_slices_or_the_target_are_refused_before_any_work(
        small_manifest, tmp_path, capsys, settings, message):
    out = tmp_path / "bundle"
    sets = [a for s in settings for a in ("--set", s)]
    assert main(["-q", *train_args(small_manifest, out, "--no-select", *sets)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "bundle.checkpoints").exists()

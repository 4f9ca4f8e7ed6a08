"""`cldf train` as the module's child process: real training on real scans, progress, cancel, resume."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from CLDFSegmentationLib.trainrun import TrainingRun, trainCommand
from conftest import TINY_STUDENT

TINY = ("--set", "data.resolution=32", "--set", "diffusion.steps=400", "--set", "noisy_classifier.steps=3",
        "--set", "cam_classifier.steps=3", "--set", "decoder.epochs=1", "--set", "decoder.pixels_per_class=32",
        "--decoder-seeds", "0", "--no-select", *TINY_STUDENT)


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def wait(run: TrainingRun, until, timeout: float = 600.0) -> None:
    t0 = time.time()
    while run.poll() and not until(run):
        time.sleep(0.1)
        assert time.time() - t0 < timeout, f"no progress: {run.lines[-3:]}"


def test_a_cancelled_training_keeps_its_steps_and_the_same_command_resumes_it(small_manifest, tmp_path):
    out = tmp_path / "bundle"
    args = trainCommand(small_manifest, out, ["FLAIR", "T1"], target="1", name="from-slicer", targetName="tumour",
                        device="cpu", extra=TINY)
    run = TrainingRun(args, sys.executable, child_env())
    run.start()
    wait(run, lambda r: r.stage == "cdm" and r.done >= 20)
    assert run.total == 400
    seen = run.done
    run.cancel()  # returns at once: the child saves its step and exits, which poll notices
    assert run.stopping
    wait(run, lambda r: False)
    assert not run.stopping and run.returncode == 130 and not (out / "bundle.json").exists()
    assert any("interrupted" in line for line in run.lines), run.lines[-5:]
    saved = json.loads((tmp_path / "bundle.checkpoints" / "cdm.json").read_text(encoding="utf-8"))["step"]
    assert seen <= saved < 400  # the steps done before Cancel are kept, not the last periodic checkpoint only
    again = TrainingRun(args, sys.executable, child_env())
    again.start()
    wait(again, lambda r: False)
    assert again.returncode == 0, again.error()
    card = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    assert card["name"] == "from-slicer" and card["channels"] == ["FLAIR", "T1"]
    assert any(line.startswith("bundle written to") for line in again.lines)


def test_a_cancelled_child_that_does_not_stop_is_killed_when_its_time_is_up(tmp_path):
    script = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('busy', flush=True); time.sleep(60)"
    run = TrainingRun(["train", "--out", str(tmp_path)], sys.executable, child_env())
    run.command = [sys.executable, "-c", script]  # a child that ignores Ctrl-C
    run.start()
    wait(run, lambda r: r.lines == ["busy"])
    run.cancel(timeout=0.5)
    wait(run, lambda r: False, timeout=30)
    assert run.returncode == -9


def test_a_failing_training_says_why(tmp_path):
    run = TrainingRun(trainCommand(tmp_path / "missing.json", tmp_path / "b", ["FLAIR"]), sys.executable, child_env())
    run.start()
    wait(run, lambda r: False, timeout=120)
    assert run.returncode == 2 and "dataset manifest not found" in run.error()


def test_the_command_needs_channels():
    with pytest.raises(ValueError, match="name the channels"):
        trainCommand("m.json", "out", [])

"""`torchrun` data-parallel training on the CPU (gloo), on real scans: two processes train what one does, a
two-process run killed mid-way resumes with one, and uneven batches are refused before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cldf.config import preset
from cldf.trainer.train import _check_batches
from conftest import TINY_STUDENT

TINY = ("--target", "1", "--channels", "FLAIR,T1", "--device", "cpu", "--decoder-seeds", "0", "--no-select",
        "--set", "data.resolution=32", "--set", "diffusion.batch_size=4", "--set", "noisy_classifier.batch_size=4",
        "--set", "cam_classifier.batch_size=4", "--set", "noisy_classifier.steps=3", "--set", "cam_classifier.steps=3",
        "--set", "decoder.epochs=1", "--set", "decoder.pixels_per_class=32", *TINY_STUDENT)
NETWORKS = ("cdm", "noisy_classifier", "cam_classifier")


def command(manifest: Path, out: Path, processes: int, steps: int, quiet: bool = True) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "cldf", *(["-q"] if quiet else []), "train", "--data", str(manifest), "--out", str(out),
            "--set", f"diffusion.steps={steps}", *TINY]


def run(args: list[str], every_s: float = 60.0, timeout: float = 600.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLDF_CHECKPOINT_EVERY_S": str(every_s)}
    return subprocess.run(args, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=timeout)


def weights(bundle: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / f"{name}.safetensors"))


def largest_difference(a: Path, b: Path) -> float:
    return max(float((x - weights(b, n)[k]).abs().max()) for n in NETWORKS for k, x in weights(a, n).items())


@pytest.fixture(scope="module")
def one_process(small_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "bundle"
    done = run(command(small_manifest, out, 1, steps=3))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_processes_under_torchrun_train_the_weights_of_one_with_the_same_global_batch(
        one_process, small_manifest, tmp_path):
    out = tmp_path / "bundle"
    done = run(command(small_manifest, out, 2, steps=3))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bundle written to") == 1  # process 0 alone writes and reports
    assert json.loads((out / "bundle.json").read_text(encoding="utf-8"))["training"]["processes"] == 2
    assert largest_difference(one_process, out) < 1e-5


def test_a_two_process_run_killed_mid_way_resumes_with_one_process(small_manifest, tmp_path):
    steps = 300
    out = tmp_path / "bundle"
    meta = tmp_path / "bundle.checkpoints" / "cdm.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLDF_CHECKPOINT_EVERY_S": "0"}
    child = subprocess.Popen(command(small_manifest, out, 2, steps), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    t0 = time.time()
    while not (meta.is_file() and json.loads(meta.read_text(encoding="utf-8") or "{}").get("step", 0) >= 5):
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)  # as a scheduler stops a job: torchrun passes it on to both processes
    assert child.wait(120) != 0
    saved = json.loads(meta.read_text(encoding="utf-8"))["step"]
    assert 5 <= saved < steps and not out.exists()

    resumed = run(command(small_manifest, out, 1, steps, quiet=False))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"cdm: continuing from the checkpoint at step {saved} of {steps}" in resumed.stderr
    alone = tmp_path / "alone"
    assert run(command(small_manifest, alone, 1, steps)).returncode == 0
    # the same batches in the same order: only the floating-point order of the gradient sums differs, and that
    # drift grows with the steps (under 1e-5 after 3, about 2e-3 after 300; another seed differs by far more)
    assert largest_difference(alone, out) < 1e-2


def test_batches_that_do_not_split_over_the_processes_are_refused_with_what_to_do():
    cfg = preset("cpu")
    cfg.diffusion.batch_size = 6
    _check_batches(cfg, 2)
    with pytest.raises(ValueError, match=r"diffusion.batch_size = 6 cannot be split evenly over 4 processes"):
        _check_batches(cfg, 4)

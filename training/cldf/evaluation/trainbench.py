"""`cldf bench --train`: training throughput per stage, peak memory against cohort size, slice-cache build time.

Every number comes from real `cldf train` runs on a real manifest, each in its own process
(``python -m cldf train``, or ``torchrun`` for several processes), with a fresh slice cache:

- throughput: slices per second of each network stage and of the decoders' seed collection, at
  64 x 64 (the ``cpu`` preset) and 256 x 256 (the ``paper`` preset's networks), with 1 and 2
  processes; each run gets a ``--time-budget`` so that it ends, and the rate is steps x batch over
  the stage's seconds as recorded in the bundle and its checkpoints;
- memory: the peak resident memory of the whole `cldf train` (every stage, selection included)
  with the same settings and steps on a cohort of ``small`` and of ``large`` cases, made by listing
  the manifest's cases again under new ids;
- the slice cache: seconds to build it for each cohort, and to reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import preset
from ..manifest import load_manifest, split_cases, stored_orientation
from ..trainer.slicecache import cached_slice_set
from .bench import cpu_name

# Steps large enough that the time budget, not the step count, ends each throughput run.
MANY = 1_000_000
NETWORK_STAGES = {"cdm": "diffusion", "noisy_classifier": "noisy_classifier", "cam_classifier": "cam_classifier"}
# Settings of the memory runs: every stage, a few steps each (the same on both cohorts).
MEMORY_SETTINGS = ("--set", "diffusion.steps=100", "--set", "noisy_classifier.steps=50",
                   "--set", "cam_classifier.steps=50", "--set", "ame_cam.enabled=true", "--set", "ame_cam.steps=50",
                   "--set", "ame_cam.eval_every=25", "--set", "ame_cam.aggregator_steps=20",
                   "--set", "decoder.epochs=1")


@dataclass
class Setup:
    """One throughput configuration: a preset at its resolution, a batch size, a number of processes."""

    preset: str
    batch: int
    processes: int
    budget_min: float

    @property
    def resolution(self) -> int:
        return preset(self.preset).data.resolution

    def settings(self) -> list[str]:
        out = []
        for section in NETWORK_STAGES.values():
            out += ["--set", f"{section}.steps={MANY}", "--set", f"{section}.batch_size={self.batch}"]
        return out


def cohort_manifest(manifest: Path, cases: int, out: Path) -> Path:
    """A manifest of ``cases`` cases: the given ones listed again under new ids as often as needed."""
    raw = json.loads(Path(manifest).read_text(encoding="utf-8"))
    root = Path(manifest).parent
    base = raw["cases"]

    def absolute(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else (root / p).resolve())

    listed = []
    for i in range(cases):
        case = base[i % len(base)]
        listed.append({"id": f"{case['id']}~{i // len(base)}", "mask": absolute(case["mask"]),
                       "channels": {k: absolute(v) for k, v in case["channels"].items()}})
    out.write_text(json.dumps({"name": f"{raw.get('name', 'cohort')}-x{cases}", "cases": listed}), encoding="utf-8")
    return out


def run_child(args: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """Run a command; returns its exit code, wall-clock seconds and peak resident memory (MiB, largest process)."""
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        process = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.time() - t0, usage.ru_maxrss / 1024


def train_command(manifest: Path, out: Path, channels: str, target: str, processes: int, extra: list[str]) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "cldf", "-q", "train", "--data", str(manifest), "--out", str(out), "--channels", channels,
            "--target", target, "--decoder-seeds", "0", "--no-refine-selection", "--keep-checkpoints", *extra]


def _env(cache: Path, threads: int) -> dict[str, str]:
    return {**os.environ, "CLDF_CACHE": str(cache), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def throughput(setup: Setup, manifest: Path, channels: str, target: str, work: Path, cores: int) -> dict:
    """Slices per second of each stage of one time-budgeted run (the cache built beforehand, not counted)."""
    out = work / f"{setup.preset}-{setup.processes}p"
    cmd = train_command(manifest, out, channels, target, setup.processes,
                        ["--preset", setup.preset, "--no-select", "--time-budget", str(setup.budget_min),
                         *setup.settings()])
    rc, wall, peak = run_child(cmd, _env(work / "cache", max(1, cores // setup.processes)), out.with_suffix(".log"))
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {out.with_suffix('.log')}")
    card = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    ckdir = out.parent / f"{out.name}.checkpoints"
    rates = {}
    for stage in NETWORK_STAGES:
        meta = json.loads((ckdir / f"{stage}.json").read_text(encoding="utf-8"))
        rates[stage] = meta["step"] * setup.batch / meta["seconds"]
    decoders = card["training"]["decoders"]
    visited = decoders.get("positive_slices_visited", card["training"]["data_card"]["positive_slices"])
    rates["decoders (seeds, features, fits)"] = visited / card["training"]["wall_clock_s"]["decoders"]
    return {"preset": setup.preset, "resolution": setup.resolution, "batch": setup.batch,
            "processes": setup.processes, "threads_per_process": max(1, cores // setup.processes),
            "slices_per_s": {k: round(v, 2) for k, v in rates.items()}, "wall_s": round(wall, 1),
            "peak_rss_mib": round(peak, 1), "command": " ".join(Path(c).name if c == sys.executable else c for c in cmd)}


def cache_times(manifest: Path, channels: str, target: str, root: Path) -> dict:
    """Seconds to build the training split's slice cache, and to open it again unchanged."""
    m = load_manifest(manifest)
    cfg = preset("cpu")
    ids = split_cases(m, cfg.data.split_fractions, 0)["train"]
    labels = [int(v) for v in target.split(",")]
    orientation = stored_orientation(m.case(ids[0]), channels.split(",")[0])  # as `cldf train` cuts them
    args = (m, ids, channels.split(","), cfg.data.resolution, tuple(cfg.data.percentiles), labels,
            cfg.data.positive_fraction, orientation)
    t0 = time.time()
    built = cached_slice_set(*args, root=root, progress=False)
    t1 = time.time()
    cached_slice_set(*args, root=root, progress=False)
    t2 = time.time()
    return {"cases": len(ids), "slices": len(built), "build_s": round(t1 - t0, 1), "reuse_s": round(t2 - t1, 2)}


def memory(manifest: Path, cases: int, channels: str, target: str, work: Path, cores: int) -> dict:
    """Peak memory of a whole `cldf train` (selection included) on a cohort of ``cases`` cases."""
    cohort = cohort_manifest(manifest, cases, work / f"cohort-{cases}.json")
    cache = work / f"cache-{cases}"
    timing = cache_times(cohort, channels, target, cache)
    out = work / f"memory-{cases}"
    cmd = train_command(cohort, out, channels, target, 1, list(MEMORY_SETTINGS))
    rc, wall, peak = run_child(cmd, _env(cache, cores), out.with_suffix(".log"))
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {out.with_suffix('.log')}")
    card = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    return {"cases": cases, "training_slices": card["training"]["data_card"]["training_slices"],
            "positive_slices": card["training"]["data_card"]["positive_slices"],
            "validation_patients_for_selection": len(card["selection"].get("validation_cases", [])),
            "peak_rss_mib": round(peak, 1), "wall_s": round(wall, 1), "cache": timing}


def run_train_bench(manifest: Path, channels: str, target: str, out: Path | None, cohorts: tuple[int, int] = (20, 400),
                    setups: list[Setup] | None = None, work: Path | None = None,
                    parts: tuple[str, ...] = ("throughput", "memory")) -> dict:
    """The measurements of ``parts``; writes ``out`` (Markdown) and JSON beside it, keeping the other part's
    results already there (so each part can run when the machine is otherwise idle)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    setups = setups if setups is not None else [
        Setup("cpu", 16, 1, 2.0), Setup("cpu", 16, 2, 2.0), Setup("paper", 4, 1, 3.0), Setup("paper", 4, 2, 3.0)]
    previous = Path(out).with_suffix(".json") if out is not None else None
    report = json.loads(previous.read_text(encoding="utf-8")) if previous is not None and previous.is_file() else {}
    report |= {"machine": {"cpu": cpu_name(), "cores": cores, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "manifest": str(manifest)}
    with tempfile.TemporaryDirectory(prefix="cldf-train-bench-", dir=work) as tmp:
        tmp = Path(tmp)
        if "throughput" in parts:
            small = cohort_manifest(manifest, cohorts[0], tmp / "throughput.json")
            report["throughput_cases"] = cohorts[0]
            report["throughput"] = [throughput(s, small, channels, target, tmp, cores) for s in setups]
        if "memory" in parts:
            report["memory"] = [memory(manifest, n, channels, target, tmp, cores) for n in cohorts]
            small_peak, large_peak = (m["peak_rss_mib"] for m in report["memory"])
            report["memory_ratio"] = round(large_peak / small_peak, 3)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        out.write_text(markdown(report), encoding="utf-8")
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Training throughput and memory", "",
             f"`cldf bench --train` on {report['manifest']}: {m['cpu']}, {m['cores']} cores"
             f"{', ' + m['gpu'] if m['gpu'] else ', no GPU'}, torch {m['torch']}. One run per row, each in its own "
             "process(es); the slice cache was built before the throughput runs.", ""]
    return "\n".join(lines + _throughput_lines(report) + _memory_lines(report))


def _throughput_lines(report: dict) -> list[str]:
    if not report.get("throughput"):
        return ["## Slices per second", "", "Not measured yet: `cldf bench --train --parts throughput` "
                "(on an otherwise idle machine).", ""]
    stages = list(report["throughput"][0]["slices_per_s"])
    lines = [f"## Slices per second ({report['throughput_cases']}-case cohort)", "",
             "Each run is stopped by `--time-budget`; a rate is steps x batch over the stage's recorded seconds "
             "(the decoders: positive slices visited over the stage's seconds, maps and features included).", "",
             "| preset | slice | batch | processes x threads | " + " | ".join(stages) + " | peak RSS MiB (largest process) |",
             "|---" * (5 + len(stages)) + "|"]
    for r in report["throughput"]:
        lines.append(f"| {r['preset']} | {r['resolution']} | {r['batch']} | {r['processes']} x {r['threads_per_process']} | "
                     + " | ".join(f"{r['slices_per_s'][s]:.2f}" for s in stages) + f" | {r['peak_rss_mib']:.0f} |")
    return lines + [""]


def _memory_lines(report: dict) -> list[str]:
    if not report.get("memory"):
        return ["## Peak memory against cohort size", "", "Not measured yet: `cldf bench --train --parts memory`.", ""]
    lines = ["## Peak memory against cohort size", "",
             "The whole `cldf train` (every stage, settings selection included), the same settings and steps "
             "on both cohorts; the larger lists the manifest's cases again under new ids.", "",
             "| cases | training slices | positive slices | selection patients | peak RSS MiB | wall s | "
             "cache build s | cache reuse s |", "|---|---|---|---|---|---|---|---|"]
    for r in report["memory"]:
        lines.append(f"| {r['cases']} | {r['training_slices']} | {r['positive_slices']} | "
                     f"{r['validation_patients_for_selection']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} | "
                     f"{r['cache']['build_s']} | {r['cache']['reuse_s']} |")
    return lines + ["", f"Peak memory of the larger cohort over the smaller: {report['memory_ratio']:.3f}.", ""]

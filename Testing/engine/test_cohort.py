"""`cldf segment --data`: one folder per case, summary.csv, resumable after a kill, split into parts."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

import cldf.cohort as cohort
from cldf.cli import main
from cldf.outputs import MARKER


def _run(bundle, manifest, out, *extra) -> int:
    return main(["-q", "segment", "--bundle", str(bundle), "--data", str(manifest), "--out", str(out),
                 "--device", "cpu", *extra])


def _complete(out) -> set[str]:
    return {p.parent.name for p in out.glob(f"*/{MARKER}")}


def _ten_times(manifest, tmp_path):
    """The manifest's cases ten times over, under new ids, as a manifest in tmp_path."""
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    root = manifest.parent
    doc["cases"] = [{**c, "id": f"{c['id']}-{k}", "channels": {n: str(root / v) for n, v in c["channels"].items()},
                     **({"mask": str(root / c["mask"])} if c.get("mask") else {})}
                    for k in range(10) for c in doc["cases"]]
    many = tmp_path / "many.json"
    many.write_text(json.dumps(doc), encoding="utf-8")
    return many


def test_a_killed_cohort_run_resumes_and_writes_only_the_rest(tiny_bundle, small_manifest, tmp_path, monkeypatch):
    out = tmp_path / "cohort"
    cmd = [sys.executable, "-m", "cldf", "-q", "segment", "--bundle", str(tiny_bundle), "--data", str(small_manifest),
           "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _complete(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _complete(out)
    assert 1 <= len(before) < 4, "the run was killed after its first case and before its last"
    written, real = [], cohort._segment_case
    monkeypatch.setattr(cohort, "_segment_case", lambda seg, b, case, *a: written.append(case.id) or real(seg, b, case, *a))
    assert _run(tiny_bundle, small_manifest, out) == 0
    assert set(written) == _complete(out) - before and len(_complete(out)) == 4
    rows = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
    assert [r["case"] for r in rows] == sorted(_complete(out))
    assert all(int(r["slices"]) > 0 and float(r["mask_ml"]) >= 0 and float(r["seconds"]) > 0 for r in rows)


def test_ctrl_c_in_a_cohort_run_says_that_running_it_again_resumes(tiny_bundle, small_manifest, tmp_path):
    out = tmp_path / "cohort"
    many = _ten_times(small_manifest, tmp_path)  # so that the run cannot end before the interruption reaches it
    cmd = [sys.executable, "-m", "cldf", "-q", "segment", "--bundle", str(tiny_bundle), "--data", str(many),
           "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _complete(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted; nothing half-written was kept. Run the same command again: the cases already written are " \
           "kept and skipped." in err and "cldf train" not in err and "Traceback" not in err


def test_parts_together_equal_one_run_byte_for_byte(tiny_bundle, small_manifest, tmp_path):
    assert _run(tiny_bundle, small_manifest, tmp_path / "one") == 0
    assert _run(tiny_bundle, small_manifest, tmp_path / "parts", "--part", "1/2") == 0
    assert len(_complete(tmp_path / "parts")) == 2
    assert _run(tiny_bundle, small_manifest, tmp_path / "parts", "--part", "2/2") == 0
    one, parts = _complete(tmp_path / "one"), _complete(tmp_path / "parts")
    assert one == parts and len(one) == 4
    for case in one:
        for name in ("mask.nii.gz", "seeds.nii.gz", "cam.nii.gz", "slices.csv"):
            assert (tmp_path / "one" / case / name).read_bytes() == (tmp_path / "parts" / case / name).read_bytes()
    keys = ("case", "slices", "positive_slices", "mask_ml")
    summary = [[{k: r[k] for k in keys} for r in csv.DictReader((tmp_path / d / "summary.csv").open(encoding="utf-8"))]
               for d in ("one", "parts")]
    assert summary[0] == summary[1]


def test_the_part_comes_from_torchrun_or_is_refused_when_malformed(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert cohort.Part.parse(None) == cohort.Part(2, 3)
    assert cohort.Part.parse("3/3") == cohort.Part(3, 3)
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(ValueError, match="--part takes K/N"):
            cohort.Part.parse(bad)


def test_one_bad_case_is_reported_and_the_others_are_written(tiny_bundle, small_manifest, tmp_path, capsys):
    import json

    raw = json.loads(small_manifest.read_text(encoding="utf-8"))
    raw["cases"][1]["channels"]["T1"] = str(tmp_path / "missing.nii.gz")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(raw), encoding="utf-8")
    assert _run(tiny_bundle, manifest, tmp_path / "o") == 2
    assert raw["cases"][1]["id"] in capsys.readouterr().err
    assert len(_complete(tmp_path / "o")) == 3

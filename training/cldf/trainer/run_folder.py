"""A training run's folders: the bundle folder it writes, the checkpoint folder beside it, and the record of
what defines the run, so that a re-run that differs is refused instead of mixing two runs' checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .. import atomic
from ..config import CLDFConfig
from .stages import SELECT_PATIENTS, TrainRequest


def beside(out: Path, suffix: str) -> Path:
    """``<out>.<suffix>``: a folder beside the bundle folder, named after it."""
    return out.parent / f"{out.name}.{suffix}"


def checkpoint_dir(out: Path) -> Path:
    """A run's checkpoint folder: ``<out>.checkpoints`` beside the bundle folder, or ``<out>/.checkpoints``
    where an older version started the run (and the new folder does not exist)."""
    out = Path(os.path.abspath(out))
    new, old = beside(out, "checkpoints"), out / ".checkpoints"
    return old if old.is_dir() and not new.exists() else new


def check_out(out: Path, ckdir: Path) -> None:
    """Refuse an ``out`` that training must not write into, before anything is written."""
    base = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if base != out and not base.is_dir():
        raise ValueError(f"--out {out} lies below {base}, which is a file: choose a folder for the bundle")
    if base == out and not out.is_dir():
        raise ValueError(f"--out {out} is a file: choose a folder for the bundle")
    for where in (out.parent if out.parent.exists() else base, ckdir if ckdir.exists() else None):
        if where is not None and not os.access(where, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write into {where}: choose an --out where you can create folders")
    legacy = ckdir.parent == out  # a run an older version started, its checkpoints inside the bundle folder
    if (out / "bundle.json").is_file() and not (legacy and _newer_than(ckdir, out / "bundle.json")):
        raise ValueError(f"{out} already holds a finished bundle (bundle.json), and `cldf train` never rewrites one: "
                         "choose another --out (`cldf tune` and `cldf ablate` change a bundle on purpose)")
    if out.is_dir() and not legacy and any(out.iterdir()):
        raise ValueError(f"--out {out} is a folder with other files in it, neither a bundle nor a training run: "
                         "choose a new or empty folder")


def _newer_than(ckdir: Path, path: Path) -> bool:
    """Whether a checkpoint was saved after ``path`` (an older bundle the run retrains, not the run's own)."""
    return any(p.stat().st_mtime > path.stat().st_mtime for p in ckdir.iterdir())


def run_fingerprint(req: TrainRequest) -> dict:
    """What defines a run (recorded in its checkpoint folder): a re-run resumes only when all of it matches."""
    return json.loads(json.dumps({
        "manifest_sha256": hashlib.sha256(Path(req.manifest).read_bytes()).hexdigest(),
        "channels": list(req.config.data.channels),
        "target_labels": req.target_labels,
        "seed": req.seed,
        "decoder_seeds": list(req.decoder_seeds),
        "select": req.select,
        "select_refine": req.select_refine,
        "select_patients": req.select_patients,
        "config": req.config.to_dict(),
    }))


def run_differences(recorded: dict, current: dict) -> list[str]:
    """``"NAME: checkpoints A, this command B"`` for each item of two `run_fingerprint` records that differs."""
    def flat(fp: dict) -> dict:
        items = {k: v for k, v in fp.items() if k != "config"}
        for section, values in fp.get("config", {}).items():
            items |= {f"setting {section}.{k}": v for k, v in values.items() if f"{section}.{k}" != "data.channels"}
        return items

    def show(d: dict, k: str) -> str:
        return json.dumps(d[k]) if k in d else "(not recorded)"

    a, b = flat(recorded), flat(current)
    names = {"manifest_sha256": "manifest content (sha256)", "target_labels": "target labels",
             "decoder_seeds": "decoder seeds", "select": "settings selection", "select_refine": "refinement selection"}
    return [f"{names.get(k, k)}: checkpoints {show(a, k)}, this command {show(b, k)}"
            for k in {**b, **a} if k not in a or k not in b or a[k] != b[k]]


def check_run(ckdir: Path, fingerprint: dict, splits: dict[str, list[str]]) -> None:
    """Refuse to resume checkpoints of a different run (other data, settings, seeds)."""
    run, split = ckdir / "run.json", ckdir / "split.json"
    recorded = {"select_patients": SELECT_PATIENTS, **json.loads(run.read_text())} if run.is_file() else None
    if recorded is not None:  # a settings section added since the run was recorded: it ran with the defaults
        recorded["config"] = {**json.loads(json.dumps(CLDFConfig().to_dict())), **recorded.get("config", {})}
    diffs = run_differences(recorded, fingerprint) if recorded else []  # (runs recorded before a setting existed: its default)
    if not diffs and split.is_file() and json.loads(split.read_text()) != splits:
        diffs = ["patient split: differs (other data or seed?)"]
    if diffs:
        raise ValueError(f"{ckdir} holds the checkpoints of a different training run:\n  " + "\n  ".join(diffs)
                         + f"\nResume it with the same command as before, or train this one into a new --out "
                         f"(or delete {ckdir} to start over).")


def record_run(ckdir: Path, fingerprint: dict, splits: dict[str, list[str]]) -> None:
    """Create the checkpoint folder and record the run in it (a run an older version started: from now on)."""
    ckdir.mkdir(parents=True, exist_ok=True)
    for name, doc in (("run.json", fingerprint), ("split.json", splits)):
        if not (ckdir / name).is_file():
            atomic.write_json(ckdir / name, doc)


def install(partial: Path, out: Path, ckdir: Path, keep: bool) -> None:
    """Move the complete bundle to ``out`` (replacing an empty folder, or the older bundle an older version's
    run retrains) and the checkpoints out of it: kept beside it with ``keep``, else removed."""
    if keep and ckdir.parent == out:
        ckdir = Path(shutil.move(ckdir, beside(out, "checkpoints")))
    atomic.replace_folder(partial, out)
    if not keep and ckdir.exists():
        shutil.rmtree(ckdir)

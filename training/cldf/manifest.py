"""Dataset manifests (docs/training.md, "Your own data") and the patient-level train / validation / test split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from .images import InputError, read_image
from .orientation import orientation_of

MIN_TRAIN_PATIENTS = 2  # one patient's slices teach a classifier that patient, not the target


@dataclass
class Case:
    id: str
    channels: dict[str, Path]
    mask: Path | None = None
    slice_labels: Path | None = None
    split: str | None = None


@dataclass
class Manifest:
    path: Path
    name: str
    cases: list[Case]

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise InputError(f"case '{case_id}' is not in {self.path}")


def load_manifest(path: str | Path) -> Manifest:
    """Read a dataset manifest (format in docs/training.md, "Your own data")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset manifest not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("cases"), list) or not raw["cases"]:
        raise InputError(f"{path} has no 'cases' list; see docs/training.md ('Your own data') for the manifest format")
    root = path.parent
    cases, seen = [], set()
    for i, c in enumerate(raw["cases"]):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("channels"), dict):
            raise InputError(f"case #{i} in {path} needs an 'id' and a 'channels' mapping")
        if str(c["id"]) in seen:
            raise InputError(f"case id '{c['id']}' appears twice in {path}; give every case its own id")
        seen.add(str(c["id"]))
        cases.append(
            Case(
                id=str(c["id"]),
                channels={k: root / v for k, v in c["channels"].items()},
                mask=root / c["mask"] if c.get("mask") else None,
                slice_labels=root / c["slice_labels"] if c.get("slice_labels") else None,
                split=c.get("split"),
            )
        )
    return Manifest(path=path, name=str(raw.get("name", path.parent.name)), cases=cases)


def check_channels(manifest: Manifest, case_ids: list[str], channels: list[str]) -> None:
    """Every case named holds every channel asked for, as a file or folder that is there: said before any work."""
    problems = []
    for cid in case_ids:
        case = manifest.case(cid)
        missing = [ch for ch in channels if ch not in case.channels]
        if missing:
            problems.append(f"case '{cid}' has no channel {', '.join(repr(m) for m in missing)} "
                            f"(it has {', '.join(repr(k) for k in case.channels) or 'none'})")
        problems += [f"case '{cid}', channel '{ch}': {case.channels[ch]} is not there"
                     for ch in channels if ch in case.channels and not Path(case.channels[ch]).exists()]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"{manifest.path}: {shown}. Training reads the channels {channels} of every training and "
                         "validation case: fix these entries, or leave those cases out of the manifest")


def stored_orientation(case: Case, channel: str) -> str:
    """The orientation code of a case's channel as stored (read from the header only, for files)."""
    path = Path(case.channels[channel])
    if path.is_dir() or not path.is_file():
        return orientation_of(read_image(path, channel))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return orientation_of(read_image(path, channel))  # read_image says what is wrong with it
    return orientation_of(reader)


def split_cases(manifest: Manifest, fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Deterministic patient-level split: explicit ``split`` fields win, the rest by a seeded hash."""
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    free = []
    for c in manifest.cases:
        if c.split:
            if c.split not in splits:
                raise InputError(f"case '{c.id}': split must be one of {list(splits)}, not '{c.split}'")
            splits[c.split].append(c.id)
        else:
            free.append(c.id)
    free.sort(key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_train = round(fractions[0] * len(free))
    n_val = round(fractions[1] * len(free))
    splits["train"] += free[:n_train]
    splits["val"] += free[n_train : n_train + n_val]
    splits["test"] += free[n_train + n_val :]
    return {k: sorted(v) for k, v in splits.items()}


def check_training_split(splits: dict[str, list[str]], manifest: Manifest) -> None:
    """Enough training patients, said before any work (the slice labels are checked once read)."""
    train = splits["train"]
    if len(train) >= MIN_TRAIN_PATIENTS:
        return
    held = f"{len(train)} patient(s)" + (f" ({', '.join(train)})" if train else "")
    raise InputError(f"{manifest.path}: the training split holds {held} of the manifest's {len(manifest.cases)}; "
                     f"training needs at least {MIN_TRAIN_PATIENTS} patients with slices labelled positive and "
                     "negative (and 2 or more validation patients to choose its settings): add patients to the "
                     "manifest; unless a case's \"split\" says otherwise, 60 % of them train, 15 % validate and "
                     "25 % test")

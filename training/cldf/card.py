"""A bundle's card (``bundle.json``) read and checked without torch: format version, weight list, seal.

`bundle.read_card` adds the weight files' hashes on top of `parse_card`; the
Slicer module lists bundles with `card_summary` before its dependencies are
installed, with the same checks and the same messages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .defaults import SEGMENTER_CHOICES, TARGET_COLOR, TARGET_NAME
from .terminology import SegmentCode

FORMAT_VERSION = 2  # 2: bundle.json carries a seal over its settings
LOW_VALIDATION_DICE = 0.3  # a bundle whose shipped segmenter scored below this 3D Dice on validation is said to be weak
SEALED = ("format_version", "name", "task", "channels", "config", "files", "untrained_cdm")


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message says why and what to do."""


def seal(doc: dict[str, Any]) -> str:
    """sha256 of what defines a bundle's behaviour: settings, task, channels, weight hashes."""
    sealed = {k: doc.get(k) for k in SEALED}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_card(bundle_dir: str | Path) -> dict[str, Any]:
    """``bundle.json`` checked for format version, weight list and seal; the weight files are not read."""
    root = Path(bundle_dir)
    path = root / "bundle.json"
    if not root.is_dir():
        raise FileNotFoundError(f"bundle directory not found: {root}")
    if not path.is_file():
        raise BundleError(f"{root} is not a CLDF bundle: it has no bundle.json")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupted (not valid JSON: {e}); rebuild or re-download the bundle") from e
    if not isinstance(card, dict):
        raise BundleError(f"{path} is corrupted (not a JSON object); rebuild or re-download the bundle")
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {version!r}; this cldf reads version {FORMAT_VERSION}. "
            "Update CLDFSegmentation or rebuild the bundle with this version"
        )
    files = card.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{path} is corrupted ('files' must map each weight file to its sha256)")
    if card.get("seal") != seal(card):
        raise BundleError(
            f"{path} was edited after the bundle was made: its settings, task, channels or weight hashes no longer "
            "match its seal. Refusing to use it; restore the original bundle.json (segment-time choices are options "
            "of `cldf segment` and the Slicer module, not edits of the card)"
        )
    segment_code(card, path)
    return card


def segment_code(card: dict[str, Any], path: Path | str = "bundle.json") -> SegmentCode | None:
    """The card's ``task.code`` checked (`terminology.SegmentCode`); None when it records none."""
    task = card.get("task") or {}
    if "code" not in task:
        return None
    try:
        return SegmentCode.from_card(task["code"])
    except ValueError as e:
        raise BundleError(f"{path}: {e}; correct it with `cldf card --code`") from None


@dataclass(frozen=True)
class ValidationScore:
    """How the bundle's own segmenter did on its validation patients, as its card records it."""

    segmenter: str
    dice_3d: float
    patients: int

    @property
    def low(self) -> bool:
        return self.dice_3d < LOW_VALIDATION_DICE

    def says(self) -> str:
        return f"3D Dice {self.dice_3d:.2f} on {self.patients} validation patients ({self.segmenter})"

    def warning(self, name: str) -> str:
        return (f"bundle '{name}' scored a 3D Dice of {self.dice_3d:.2f} on its {self.patients} validation patients "
                f"(below {LOW_VALIDATION_DICE}): its masks are unreliable; train it on more patients or for longer")


@dataclass(frozen=True)
class CardSummary:
    """What a bundle list shows: the bundle's name, its channels in input order, its target, and how each choice of
    segmenter ("bundle", "cldf", "student") scored on its validation patients (None: not recorded)."""

    path: Path
    name: str
    channels: tuple[str, ...]
    target: str
    color: tuple[int, int, int]
    validation: dict[str, ValidationScore | None] = field(default_factory=dict)
    code: SegmentCode | None = None  # the target's standard codes (`terminology`), when the card records them

    def says(self, segmenter: str = "bundle") -> str:
        """The panel's line on a segmenter's validation score, a warning when it is low or missing."""
        score = self.validation.get(segmenter)
        if score is None:
            return "Warning: no validation score is recorded; how well it segments is unknown."
        return f"Warning: {score.warning(self.name)}." if score.low else f"Validation: {score.says()}."


def validation_score(card: dict[str, Any], segmenter: str | None = None) -> ValidationScore | None:
    """``segmenter``'s (default: the bundle's) row of the student's validation table, else, for the pipeline, the
    chosen rule's row of its own selection table."""
    student = card.get("student") or {}
    settings = (card.get("config") or {}).get("student") or {}
    segmenter = segmenter or settings.get("segmenter", "cldf")
    name = "student+sam" if segmenter == "student" and settings.get("refine") == "sam" else segmenter
    rule = settings.get("min_component_fraction") if segmenter == "student" else None
    threshold = settings.get("threshold", 0.5) if segmenter == "student" else None
    for row in student.get("table") or []:
        if row.get("segmenter") == name and (rule is None or row.get("min_component_fraction") == rule) and \
                (threshold is None or row.get("threshold", 0.5) == threshold):
            return ValidationScore(name, float(row["dice_3d"]), len(student.get("validation_cases") or []))
    chosen_rule = ((card.get("selection") or {}).get("postprocess")) or {}
    for row in chosen_rule.get("table") or []:
        if all(row.get("settings", {}).get(k) == v for k, v in chosen_rule.get("chosen", {}).items()
               if k in row.get("settings", {})):
            return ValidationScore("cldf", float(row["val_dice_3d"]), len(chosen_rule.get("validation_cases") or []))
    return None


def card_summary(bundle_dir: str | Path) -> CardSummary:
    """Name, channels and target of a bundle (`parse_card`'s checks; weights are verified when it is loaded)."""
    root = Path(bundle_dir)
    card = parse_card(root)
    task = card.get("task") or {}
    channels = card.get("channels")
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
        raise BundleError(f"{root / 'bundle.json'} is corrupted ('channels' must list the channel names)")
    color = task.get("color", TARGET_COLOR)
    scores = {choice: validation_score(card, None if choice == "bundle" else choice) for choice in SEGMENTER_CHOICES}
    return CardSummary(root, str(card.get("name", root.name)), tuple(channels), str(task.get("target", TARGET_NAME)),
                       (int(color[0]), int(color[1]), int(color[2])), scores, segment_code(card, root / "bundle.json"))

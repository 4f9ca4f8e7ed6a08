"""The model bundles shipped with the module (``Resources/Models/<name>/``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cldf.defaults import TARGET_COLOR, TARGET_NAME  # plain constants: no torch

MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"


@dataclass(frozen=True)
class BundleInfo:
    """What the selector shows before anything heavy is loaded (read from bundle.json only)."""

    path: Path
    name: str
    channels: tuple[str, ...]
    targetName: str
    color: tuple[int, int, int]


def readBundleInfo(path: str | Path) -> BundleInfo:
    """Name, channels and target of a bundle; weights are verified later, when it is loaded to run."""
    path = Path(path)
    card = path / "bundle.json"
    if not card.is_file():
        raise ValueError(f"{path} is not a CLDF model bundle: it has no bundle.json")
    try:
        doc = json.loads(card.read_text())
        task = doc.get("task", {})
        return BundleInfo(path, str(doc.get("name", path.name)), tuple(doc["channels"]),
                          str(task.get("target", TARGET_NAME)), tuple(task.get("color", TARGET_COLOR)))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{card} is not a valid bundle card ({e}); rebuild or re-download the bundle") from e


def shippedBundles(modelsDir: Path = MODELS_DIR) -> list[BundleInfo]:
    """Bundles found under the module's Resources/Models, sorted by name."""
    if not modelsDir.is_dir():
        return []
    return [readBundleInfo(p) for p in sorted(modelsDir.iterdir()) if (p / "bundle.json").is_file()]

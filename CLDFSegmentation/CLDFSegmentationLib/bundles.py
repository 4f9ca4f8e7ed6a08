"""Bundle cards as the panel needs them: read with the engine's checks, once per bundle and version of its card.

The engine (`cldf.card`) parses and checks ``bundle.json`` without torch, so the
bundle list shows before the dependencies are installed; the weights are
verified when a run loads the bundle, on the run's worker thread.
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"

_cards: dict[str, tuple[tuple[int, int], object]] = {}  # path -> ((mtime_ns, size) of its bundle.json, summary)


def bundleCard(path: str | os.PathLike):
    """The bundle's `cldf.card.CardSummary` (name, channels, target, colour): parsed when first asked for, again
    only when its bundle.json changes. Raises ``FileNotFoundError`` / ``ValueError`` saying what is wrong."""
    from cldf.card import card_summary

    key = str(path)
    try:
        stat = os.stat(Path(path) / "bundle.json")
    except OSError:
        _cards.pop(key, None)
        return card_summary(path)  # raises the engine's message for a missing folder or card
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _cards.get(key)
    if cached is None or cached[0] != version:
        cached = _cards[key] = (version, card_summary(path))
    return cached[1]


def shippedBundles(modelsDir: Path = MODELS_DIR) -> list:
    """Cards of the bundles under the module's Resources/Models, sorted by name."""
    if not modelsDir.is_dir():
        return []
    return [bundleCard(p) for p in sorted(modelsDir.iterdir()) if (p / "bundle.json").is_file()]

"""Changing settings by name: ``--set SECTION.NAME=VALUE`` on the command line, a row of the selection grid.

Every change is type-checked when it is made (`CLDFConfig.set`), so a wrong value is refused before any work.
"""

from __future__ import annotations

import json
from typing import Any

from .constraints import check_config
from .sections import CLDFConfig


def parse_override(item: str) -> tuple[str, Any]:
    """``SECTION.NAME=VALUE`` -> ``(key, value)``; the value is read as JSON, else kept as a string."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"--set takes SECTION.NAME=VALUE (e.g. diffusion.steps=8000), not '{item}'")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def apply_settings(config: CLDFConfig, settings: dict[str, Any]) -> CLDFConfig:
    """A copy of ``config`` with each ``section.name`` setting changed (type-checked)."""
    out = CLDFConfig.from_dict(config.to_dict())
    for key, value in settings.items():
        out.set(key, value)
    check_config(out)  # once all are set: settings that must agree may change together
    return out


def apply_overrides(config: CLDFConfig, items: list[str]) -> CLDFConfig:
    """A copy of ``config`` with ``--set`` items applied in order."""
    return apply_settings(config, dict(parse_override(item) for item in items))

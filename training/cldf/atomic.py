"""Writing so that a reader, or a run stopped half-way, finds the old file or the new one, never part of either.

Every file the engine writes for a user (bundles, results, checkpoints, reports) goes through `atomic_path`:
the content is written to a temporary name beside the target and renamed onto it, which is atomic on one
file system. Plain constants and the standard library only: the Slicer module uses it before its
dependencies are installed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` that replaces it when the block ends without an error.

    The temporary name ends with ``path``'s own name, so writers that choose the format by the suffix
    (``.nii.gz``, ``.png``) write the right one. On an error the temporary file is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{uuid.uuid4().hex[:12]}.tmp-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, doc: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(doc, indent=indent) + ("\n" if indent is not None else ""))


def replace_folder(complete: Path, target: Path) -> None:
    """Move the folder ``complete`` to ``target``, replacing what is there; ``target`` is never missing
    while an older one exists (the old one is renamed aside first, and back if the move fails)."""
    if not target.exists():
        os.replace(complete, target)
        return
    aside = target.with_name(f".{uuid.uuid4().hex[:12]}.old-{target.name}")
    os.replace(target, aside)
    try:
        os.replace(complete, target)
    except OSError:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)

"""Tensors kept on disk while a training stage needs them: memory holds the one being used.

The pixel decoders' seed features (a ``(P_i, D)`` block per positive slice) and the selection's
per-slice diffusion features grow with the cohort; each goes into a `TensorStore` file, and
reading item ``i`` reads it alone. `PixelDecoder.fit` takes a store as it takes a list.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


class TensorStore:
    """An append-only list of float32 tensors in a file; `close` (or leaving the ``with`` block) deletes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._items: list[tuple[int, tuple[int, ...]]] = []  # (offset, shape)
        self._end = 0

    def append(self, t: torch.Tensor) -> None:
        data = t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        if os.pwrite(self._fd, data, self._end) != len(data):
            raise OSError(f"could not write {len(data)} bytes to {self.path}: is the disk full?")
        self._items.append((self._end, tuple(t.shape)))
        self._end += len(data)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        offset, shape = self._items[i]
        data = os.pread(self._fd, int(np.prod(shape)) * 4, offset)
        return torch.from_numpy(np.frombuffer(data, np.float32).reshape(shape).copy())

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "TensorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

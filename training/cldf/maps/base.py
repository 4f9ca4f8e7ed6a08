"""Forward hooks that are always removed, and explicit per-slice normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ActivationRecorder:
    """Record the outputs of some modules during a forward pass.

    A context manager: hooks are registered on entry and removed on exit, so a
    model is never left carrying them. A module returning a tuple contributes
    its first element (MONAI's down blocks return ``(h, residuals)``).
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "ActivationRecorder":
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            self.outputs[i] = output[0] if isinstance(output, tuple) else output  # type: ignore[index]

        return record


def normalise_per_slice(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each ``(H, W)`` map of a ``(B, H, W)`` batch to [0, 1]; a flat map becomes 0."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-12), torch.zeros_like(maps))

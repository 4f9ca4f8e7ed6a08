"""Where the networks run: device choice, bf16 autocast on CUDA, slices per step."""

from __future__ import annotations

import contextlib

import torch

from .defaults import BATCH_SIZE, DEVICES


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not '{name}'")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_for(resolution: int, base: int = BATCH_SIZE) -> int:
    """Slices per step at a resolution: ``base`` at 64 x 64, fewer for larger slices (memory grows with the area)."""
    return max(1, base * 64 * 64 // (resolution * resolution))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"

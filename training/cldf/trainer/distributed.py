"""Data-parallel training under ``torchrun``: each process one share of every batch, gradients averaged.

``torchrun --nproc_per_node=N -m cldf train ...`` (with ``--nnodes``/``--rdzv-endpoint`` for several
machines) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; `start` then joins the process group,
NCCL on GPUs and gloo on CPUs. The network stages whose loss is a mean over independent slices (the
diffusion model and both slice classifiers, the bulk of the cost) run under
`torch.nn.parallel.DistributedDataParallel`; process 0 alone writes the slice cache, the checkpoints
and the bundle, and runs the stages after them (AME-CAM, whose networks normalise over the batch,
the selection and the decoders). Every global batch is the one a single process
draws (`batches`), so a run may resume with another number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def from_env() -> Ranks:
    """The ranks torchrun gave this process (one process when launched without it)."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group when launched by torchrun; each process on a GPU takes ``cuda:LOCAL_RANK``."""
    ranks = from_env()
    if not ranks.active:
        return ranks, device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def finish(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """``model`` under DistributedDataParallel when there are several processes (gradients averaged)."""
    if not ranks.active:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every process when it is true on one (a stop asked of one process stops all at the same step)."""
    if not ranks.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


@contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Process 0 runs the block first (e.g. builds the slice cache); the others then run it (and reuse it)."""
    if not ranks.main:
        barrier(ranks)
    yield
    if ranks.main:
        barrier(ranks)

"""Training batches: slices streamed through a `torch.utils.data.DataLoader`, drawn per step.

Every step's global batch, and every random number of that step (flips, intensity changes,
noise, timesteps), is drawn from ``(seed, step)`` alone. So a resumed run, and a run split over
N processes (`distributed`), sees exactly what one uninterrupted process does: each process loads
its contiguous share of the global batch (`share`) and keeps its share of every draw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .slice_set import SliceSet

Draw = Callable[[torch.Generator], torch.Tensor]  # a step's generator -> the global batch's slice indices


def step_generator(seed: int, step: int) -> torch.Generator:
    """Per-step randomness from (seed, step): a resumed run draws exactly what the uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def share(n: int, rank: int = 0, world: int = 1) -> slice:
    """Process ``rank``'s contiguous part of a global batch of ``n``."""
    if n % world:
        raise ValueError(f"a batch of {n} slices cannot be split evenly over {world} processes: "
                         f"choose a batch size divisible by {world}, or another number of processes")
    k = n // world
    return slice(rank * k, (rank + 1) * k)


class SliceDataset(Dataset):
    """One training slice and its slice label per item (read from the slice cache when it is disk-backed)."""

    def __init__(self, data: SliceSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.images[i], self.data.labels[i]


class StepBatches(Sampler[list[int]]):
    """For each step in ``[start, stop)``, this process's share of the global batch ``draw`` picks."""

    def __init__(self, draw: Draw, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.draw, self.seed, self.start, self.stop, self.rank, self.world = draw, seed, start, stop, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            idx = self.draw(step_generator(self.seed, step))
            yield idx[share(len(idx), self.rank, self.world)].tolist()


def step_loader(data: SliceSet, draw: Draw, seed: int, start: int, stop: int, device: torch.device,
                rank: int = 0, world: int = 1, workers: int | None = None) -> DataLoader:
    """Batches of ``(images, labels)`` for steps ``start..stop-1``: worker processes and pinned memory on CUDA."""
    cuda = device.type == "cuda"
    workers = (4 if cuda else 0) if workers is None else workers
    return DataLoader(SliceDataset(data), batch_sampler=StepBatches(draw, seed, start, stop, rank, world),
                      num_workers=workers, pin_memory=cuda,
                      generator=torch.Generator().manual_seed(seed))  # not the global generator: model inits stay as they were


class StepDraws:
    """The random numbers of one step, drawn for the whole global batch and cut to this process's share."""

    def __init__(self, seed: int, step: int, draw: Draw, rank: int = 0, world: int = 1):
        self.g = step_generator(seed, step)
        self.idx = draw(self.g)  # advances the generator exactly as `StepBatches` did
        self.part = share(len(self.idx), rank, world)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(len(self.idx), *shape, generator=self.g)[self.part]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(len(self.idx), *shape, generator=self.g)[self.part]

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, (len(self.idx), *shape), generator=self.g)[self.part]


def flip(x: torch.Tensor, d: StepDraws, enabled: bool = True) -> torch.Tensor:
    """Random left-right flips (the only augmentation of the diffusion model).

    The coin is drawn even when ``enabled`` is false, so turning flips off changes no other draw of the step.
    """
    flips = (d.rand() < 0.5) & enabled
    x = x.clone()
    x[flips] = x[flips].flip(-1)
    return x


# Half-ranges of the per-channel intensity augmentation: (log gamma, scale, shift) on slices in [-1, 1].
# "wide" also covers scans from other sites: another background level, contrast or windowing.
INTENSITY = {"narrow": (0.0, 0.2, 0.1), "wide": (0.4, 0.4, 0.5)}


def check_intensity(name: str) -> None:
    if name not in INTENSITY:
        raise ValueError(f"unknown intensity augmentation '{name}'; choose one of {sorted(INTENSITY)}")


def augment(x: torch.Tensor, d: StepDraws, intensity: str = "narrow", flips: bool = True) -> torch.Tensor:
    """Flips (unless ``flips`` is false), per-channel intensity changes (`INTENSITY`), shifts of up to 4 pixels.

    ``"narrow"``: scale 0.8-1.2 and shift +-0.1; ``"wide"``: a gamma of 0.67-1.5 first, then scale
    0.6-1.4 and shift +-0.5. The name is checked once, before training (`check_intensity`).
    """
    x = intensity_change(flip(x, d, flips), d, intensity)
    shifts = d.randint(-4, 5, 2)
    return torch.stack([xi.roll(tuple(s.tolist()), dims=(-2, -1)) for xi, s in zip(x, shifts)]).clamp(-1.0, 1.0)


def intensity_change(x: torch.Tensor, d: StepDraws, intensity: str = "narrow") -> torch.Tensor:
    """Per-channel gamma, scale and shift of ``(B, C, H, W)`` slices in [-1, 1] (`INTENSITY`), not clipped."""
    log_gamma, scale, shift = INTENSITY[intensity]
    c = x.shape[1]
    if log_gamma:
        gamma = torch.exp(2 * log_gamma * d.rand(c, 1, 1) - log_gamma)
        x = ((x + 1) / 2).clamp(0, 1) ** gamma * 2 - 1
    return x * (1 - scale + 2 * scale * d.rand(c, 1, 1)) + (2 * shift * d.rand(c, 1, 1) - shift)

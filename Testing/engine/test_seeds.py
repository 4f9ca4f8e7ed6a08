"""`keep_seeded_components`: of a slice's mask, only the connected parts that hold a foreground seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cldf.seeds import keep_seeded_components


def picture(rows: str) -> torch.Tensor:
    """A boolean ``(H, W)`` tensor drawn with ``#`` (True) and ``.`` (False), one string per row."""
    return torch.tensor([[c == "#" for c in row] for row in rows.split()])


MASK = picture("""
    ##....#
    ##....#
    ...#...
    ....#..
    ......#
""")  # three parts: top left, the right column's top, and a diagonal run (8-connected)
TOP_LEFT = picture("""
    ##.....
    ##.....
    .......
    .......
    .......
""")
DIAGONAL = picture("""
    .......
    .......
    ...#...
    ....#..
    .......
""")


def seeds_at(*points: tuple[int, int]) -> torch.Tensor:
    seeds = torch.zeros_like(MASK)
    for y, x in points:
        seeds[y, x] = True
    return seeds


@pytest.mark.parametrize("seeds, kept", [
    (seeds_at((1, 1)), TOP_LEFT),
    (seeds_at((2, 3)), DIAGONAL),  # the part goes on through its diagonal neighbour
    (seeds_at((0, 0), (3, 4)), TOP_LEFT | DIAGONAL),
    (seeds_at((4, 0)), torch.zeros_like(MASK)),  # a seed outside the mask keeps nothing
])
def test_only_the_parts_holding_a_foreground_seed_are_kept(seeds, kept):
    got = keep_seeded_components(MASK, seeds)
    assert got.dtype == torch.bool and torch.equal(got, kept)


def test_the_single_pixel_at_the_edge_is_its_own_part():
    """(4, 6) touches neither the diagonal run nor the right column's top: seeding it keeps it alone."""
    assert torch.equal(keep_seeded_components(MASK, seeds_at((4, 6))), seeds_at((4, 6)))


def test_an_empty_mask_stays_empty():
    empty = torch.zeros(5, 7, dtype=torch.bool)
    assert not keep_seeded_components(empty, seeds_at((1, 1))).any()


def test_the_mask_given_is_not_changed():
    before = MASK.clone()
    keep_seeded_components(MASK, seeds_at((1, 1)))
    assert torch.equal(MASK, before)


def test_seeding_every_part_keeps_the_whole_mask():
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(rng.random((32, 32)) < 0.3)
    assert torch.equal(keep_seeded_components(mask, mask.clone()), mask)

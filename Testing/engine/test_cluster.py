"""Inference clustering (CLDF, Sec. 2.5): seeded K-means and the rules that pick the foreground clusters.

Every slice here is a small synthetic embedding map made of regions whose embeddings are fixed unit
vectors, so the right mask can be stated region by region.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cldf import cluster
from cldf.cluster import choose_clusters, cluster_slice, kmeans
from cldf.config import ClusterConfig
from cldf.seeds import BACKGROUND, FOREGROUND

A = (1.0, 0.0)
B = (math.cos(math.pi / 6), math.sin(math.pi / 6))  # 30 degrees from A: nearer A than C
C = (0.0, 1.0)
SIZE = 8


def embeddings(columns: list[tuple[float, float]]) -> torch.Tensor:
    """``(2, SIZE, SIZE)`` embeddings whose column ``x`` is ``columns[x]`` on every row."""
    e = torch.tensor(columns, dtype=torch.float32).T  # (2, SIZE)
    return e[:, None, :].expand(2, SIZE, SIZE).contiguous()


def columns_mask(*xs: int) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[:, list(xs)] = True
    return mask


def seed_map(foreground: list[tuple[int, int]], background: list[tuple[int, int]] = ()) -> torch.Tensor:
    seeds = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
    for y, x in foreground:
        seeds[y, x] = FOREGROUND
    for y, x in background:
        seeds[y, x] = BACKGROUND
    return seeds


EVERYWHERE = torch.ones(SIZE, SIZE, dtype=torch.bool)
HALVES = embeddings([A] * 4 + [C] * 4)
THIRDS = embeddings([A] * 3 + [B] * 3 + [C] * 2)


def run(emb, seeds, body=EVERYWHERE, prototype=A, **cfg):
    return cluster_slice(emb, seeds, body, torch.tensor(prototype), ClusterConfig(**cfg))


# ------------------------------------------------------------------ kmeans
@pytest.mark.parametrize("k", [0, 1])
def test_kmeans_refuses_fewer_than_two_clusters(k):
    with pytest.raises(ValueError, match="k >= 2"):
        kmeans(np.zeros((10, 2)), k, seed=0)


@pytest.mark.parametrize("pixels", [0, 1, 2])
def test_kmeans_on_no_more_pixels_than_clusters_gives_one_label_and_no_centroids(pixels):
    labels, centers = kmeans(np.ones((pixels, 2)), 2, seed=0)
    assert centers is None and labels.tolist() == [0] * pixels


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_kmeans_separates_two_blobs_and_finds_their_means(seed):
    rng = np.random.default_rng(seed)
    left = rng.normal((-5.0, 0.0), 0.1, size=(30, 2))
    right = rng.normal((5.0, 1.0), 0.1, size=(20, 2))
    labels, centers = kmeans(np.concatenate([left, right]).astype(np.float32), 2, seed)
    assert labels.shape == (50,) and centers.shape == (2, 2)
    assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1 and labels[0] != labels[30]
    np.testing.assert_allclose(centers[labels[0]], left.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(centers[labels[30]], right.mean(axis=0), atol=1e-6)


def test_kmeans_with_the_same_seed_gives_the_same_labels():
    points = np.random.default_rng(3).normal(size=(200, 4))  # no cluster structure: the seed decides
    first, centers = kmeans(points, 5, seed=11)
    again, centers_again = kmeans(points, 5, seed=11)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(centers, centers_again)


# ------------------------------------------------------------------ choosing clusters
CENTERS = np.array([A, B, C])


@pytest.mark.parametrize("rule, foreground, background, chosen", [
    ("nearest", A, C, [0]),
    ("nearest", C, A, [2]),
    ("closer_than_background", A, C, [0, 1]),  # B is nearer the foreground reference than the background one
    ("closer_than_background", C, A, [2]),  # B is nearer the background reference now
    ("closer_than_background", A, None, [0]),  # a slice without background seeds: the nearest
])
def test_the_foreground_clusters_each_rule_chooses(rule, foreground, background, chosen):
    got = choose_clusters(CENTERS, np.array(foreground), None if background is None else np.array(background), rule)
    assert sorted(got.tolist()) == chosen


def test_closer_than_background_falls_back_to_the_nearest_when_no_cluster_is_nearer_the_foreground():
    centers = np.array([(0.0, 1.0), (0.1, 1.0)])  # both nearer the background reference (0, 1)
    got = choose_clusters(centers, np.array([1.0, 0.0]), np.array([0.0, 1.0]), "closer_than_background")
    assert got.tolist() == [1]


def test_an_unknown_rule_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown cluster rule 'farthest'.*nearest.*closer_than_background"):
        choose_clusters(CENTERS, np.array(A), np.array(C), "farthest")


# ------------------------------------------------------------------ one slice
@pytest.mark.parametrize("side, columns", [(0, range(4)), (7, range(4, 8))])
def test_the_paper_rule_keeps_the_cluster_of_the_foreground_seeds(side, columns):
    """Whichever half the foreground seeds are in, that half is the mask (not a K-means label order)."""
    other = 7 - side
    mask, _ = run(HALVES, seed_map([(2, side), (5, side)], [(1, other), (6, other)]))
    assert torch.equal(mask, columns_mask(*columns))


@pytest.mark.parametrize("rule, columns", [("nearest", range(3)), ("closer_than_background", range(6))])
def test_each_rule_with_three_clusters(rule, columns):
    """A seeded, B nearer A than C, C where the background seeds are: the paper keeps A, the other rule A and B."""
    mask, _ = run(THIRDS, seed_map([(3, 0), (4, 1)], [(3, 7), (4, 6)]), k=3, rule=rule)
    assert torch.equal(mask, columns_mask(*columns))


def test_a_slice_without_foreground_seeds_is_clustered_towards_the_prototype():
    mask, similarity = run(HALVES, seed_map([], [(0, 0)]), prototype=C)
    assert torch.equal(mask, columns_mask(4, 5, 6, 7))
    assert similarity == pytest.approx(1.0)


def test_the_similarity_is_that_of_the_masks_mean_embedding_to_the_prototype():
    _, same = run(THIRDS, seed_map([(0, 0)]), prototype=A, k=3)
    _, turned = run(THIRDS, seed_map([(0, 0)]), prototype=B, k=3)
    assert same == pytest.approx(1.0) and turned == pytest.approx(math.cos(math.pi / 6))


def test_within_body_never_puts_pixels_outside_the_body_in_the_mask():
    """The two columns outside the body look like the seeded region; only clustering in the body leaves them out."""
    emb = embeddings([A] * 3 + [C] * 3 + [A] * 2)
    body = columns_mask(*range(6))
    seeds = seed_map([(2, 1)], [(2, 4)])
    everywhere, _ = run(emb, seeds, body)
    inside, _ = run(emb, seeds, body, within_body=True)
    assert torch.equal(everywhere, columns_mask(0, 1, 2, 6, 7))
    assert torch.equal(inside, columns_mask(0, 1, 2))


def test_a_body_of_no_more_pixels_than_clusters_gives_an_empty_mask():
    body = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    body[0, :2] = True
    mask, similarity = run(HALVES, seed_map([(0, 0)]), body, within_body=True)
    assert not mask.any() and math.isnan(similarity)


@pytest.mark.parametrize("seeded_components, columns", [(False, (0, 1, 5, 6)), (True, (0, 1))])
def test_seeded_components_drops_the_parts_of_the_cluster_no_seed_touches(seeded_components, columns):
    emb = embeddings([A, A, C, C, C, A, A, C])
    mask, _ = run(emb, seed_map([(4, 0)], [(4, 3)]), seeded_components=seeded_components)
    assert torch.equal(mask, columns_mask(*columns))


def test_seeded_components_keeps_the_cluster_when_the_slice_has_no_foreground_seed():
    emb = embeddings([A, A, C, C, C, A, A, C])
    mask, _ = run(emb, seed_map([], [(4, 3)]), seeded_components=True)
    assert torch.equal(mask, columns_mask(0, 1, 5, 6))


def test_re_deciding_with_a_cache_runs_kmeans_once_and_gives_what_a_fresh_run_gives(monkeypatch):
    calls = []
    real = cluster.kmeans
    monkeypatch.setattr(cluster, "kmeans", lambda *a: calls.append(a[1:]) or real(*a))
    seeds, prototype = seed_map([(3, 0)], [(3, 7)]), torch.tensor(A)
    cache: dict = {}
    for rule in ("nearest", "closer_than_background", "nearest"):
        cfg = ClusterConfig(k=3, rule=rule)
        cached, _ = cluster_slice(THIRDS, seeds, EVERYWHERE, prototype, cfg, cache, key=4)
        fresh, _ = cluster_slice(THIRDS, seeds, EVERYWHERE, prototype, cfg)
        assert torch.equal(cached, fresh)
    assert calls.count((3, 0)) == 1 + 3  # one for the cache, one per fresh run
    cluster_slice(THIRDS, seeds, EVERYWHERE, prototype, ClusterConfig(k=2), cache, key=4)
    assert calls[-1] == (2, 0), "another k is another K-means"

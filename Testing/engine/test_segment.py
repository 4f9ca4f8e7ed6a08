"""The stepwise segmentation job the CLI and the Slicer module drive."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from cldf import cluster
from cldf.bundle import load_bundle
from cldf.device import resolve_device
from cldf.segment import Segmenter


@pytest.fixture(scope="module")
def segmenter(tiny_bundle):
    return Segmenter(load_bundle(tiny_bundle), "cpu", batch_size=4)


def test_steps_report_monotonic_progress_and_fill_maps_as_they_go(segmenter, case_paths):
    job = segmenter.start({"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]})
    seen = [job.progress]
    assert job.step()
    assert job.result.cam[:4].any() and not job.result.cam[4:].any()
    while job.step():
        seen.append(job.progress)
    seen.append(job.progress)
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1] == (job.total, job.total)
    assert not job.step()


def test_cancel_stops_at_once(segmenter, case_paths):
    job = segmenter.start({"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]})
    job.step()
    job.cancel()
    assert not job.step() and job.progress == (4, job.total)
    assert not job.result.mask[4:].any()


def test_slices_judged_negative_get_an_empty_mask(tiny_bundle, case_paths):
    """With the gate at the median presence, some slices are judged negative that get a mask without the gate."""
    inputs = {"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}
    ungated_segmenter = Segmenter(load_bundle(tiny_bundle), "cpu", batch_size=4)
    ungated_segmenter.cfg.cluster.presence_threshold = 0.0
    ungated = ungated_segmenter.start(inputs).run(progress=False)
    gated_segmenter = Segmenter(load_bundle(tiny_bundle), "cpu", batch_size=4)
    threshold = float(np.median(ungated.presence))
    gated_segmenter.cfg.cluster.presence_threshold = threshold
    result = gated_segmenter.start(inputs).run(progress=False)
    np.testing.assert_array_equal(result.presence, ungated.presence)  # the gate does not change the presence
    negative = result.presence < threshold
    assert negative.any() and not negative.all(), f"presences {result.presence} do not straddle {threshold}"
    assert ungated.mask[negative].any(), "without the gate these slices get a mask: emptying them is the gate's doing"
    assert not result.mask[negative].any()
    assert not result.seeds[negative].any()
    assert result.mask[~negative].any()
    assert set(np.unique(result.mask)) <= {0, 1}


def test_device_choices_are_checked():
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"


def test_unknown_decoder_seed_is_refused(segmenter, case_paths):
    with pytest.raises(ValueError, match="no decoder with seed 7"):
        segmenter.start({"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}, decoder_seed=7)


@contextlib.contextmanager
def networks_refused(monkeypatch):
    """Any network's forward pass inside fails the test."""
    def refuse(module, *args, **kwargs):
        raise AssertionError(f"{type(module).__name__} ran")

    with monkeypatch.context() as m:
        m.setattr(torch.nn.Module, "__call__", refuse)
        yield


def counting_kmeans(monkeypatch) -> list:
    """Each K-means the clustering runs from now on, as (slice pixels, k)."""
    calls, real = [], cluster.kmeans
    monkeypatch.setattr(cluster, "kmeans", lambda e, k, seed: calls.append((len(e), k)) or real(e, k, seed))
    return calls


def test_masks_are_re_decided_from_the_cache_without_the_networks(tumour_case, brain_bundle, monkeypatch):
    from dataclasses import replace

    from cldf.redecide import Redecider

    seg = Segmenter(load_bundle(brain_bundle), "cpu", refine="none")
    inputs = {"FLAIR": tumour_case["FLAIR"], "T1": tumour_case["T1"]}
    result = seg.start(inputs, keep_cache=True).run(progress=False)
    cfg = seg.cfg
    redecider = Redecider(seg, result)
    np.testing.assert_array_equal(redecider.mask(cfg.cluster, cfg.postprocess), result.mask)  # same settings, same mask
    lower = replace(cfg.cluster, presence_threshold=cfg.cluster.presence_threshold / 4)
    gated = result.presence >= lower.presence_threshold
    newly = gated & (result.presence < cfg.cluster.presence_threshold)
    assert newly.any(), f"a lower gate must let more slices through: presences {result.presence}"
    clustered = counting_kmeans(monkeypatch)
    with networks_refused(monkeypatch):
        wider = redecider.mask(lower, cfg.postprocess)
    assert len(clustered) == newly.sum(), "K-means runs only on the slices the run's gate passed over"
    with networks_refused(monkeypatch):
        np.testing.assert_array_equal(redecider.mask(lower, cfg.postprocess), wider)
    assert len(clustered) == newly.sum(), "asked again, nothing is clustered again"
    assert not wider[~gated].any()
    rerun = Segmenter(load_bundle(brain_bundle), "cpu", refine="none")
    rerun.cfg.cluster = lower
    np.testing.assert_array_equal(wider, rerun.start(inputs).run(progress=False).mask)  # as a new run would give
    k3 = redecider.mask(replace(cfg.cluster, k=3, rule="closer_than_background"), cfg.postprocess)
    assert k3.shape == result.mask.shape and not np.array_equal(k3, result.mask)


def test_a_result_without_a_cache_cannot_be_re_decided(segmenter, case_paths):
    from cldf.redecide import Redecider

    result = segmenter.start({"FLAIR": case_paths["FLAIR"], "T1": case_paths["T1"]}).run(progress=False)
    assert result.cache is None
    with pytest.raises(ValueError, match="keep_cache=True"):
        Redecider(segmenter, result)

"""The slice gate's threshold, chosen on validation slices by balanced accuracy (`select.choose_gate`)."""

from __future__ import annotations

import pytest
import torch

from cldf.trainer.select import choose_gate


def presences(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def row(rows: list[dict], threshold: float) -> dict:
    return next(r for r in rows if r["presence_threshold"] == threshold)


def test_the_threshold_that_separates_present_from_absent_is_chosen():
    threshold, rows = choose_gate(presences(0.35, 0.4, 0.9), presences(0.1, 0.25))
    assert threshold == 0.3
    assert row(rows, 0.3) == {"presence_threshold": 0.3, "sensitivity": 1.0, "specificity": 1.0,
                              "balanced_accuracy": 1.0}


def test_every_candidate_gets_its_sensitivity_specificity_and_balanced_accuracy():
    threshold, rows = choose_gate(presences(0.04, 0.15, 0.6, 0.8), presences(0.01, 0.03, 0.12, 0.7))
    thresholds = [r["presence_threshold"] for r in rows]
    assert thresholds == sorted(thresholds, reverse=True) and len(set(thresholds)) == len(rows) > 1
    half = row(rows, 0.5)  # 2 of 4 present slices pass it, 3 of 4 absent ones stay below it
    assert (half["sensitivity"], half["specificity"], half["balanced_accuracy"]) == pytest.approx((0.5, 0.75, 0.625))
    tenth = row(rows, 0.1)
    assert (tenth["sensitivity"], tenth["specificity"], tenth["balanced_accuracy"]) == pytest.approx((0.75, 0.5, 0.625))
    best = max(r["balanced_accuracy"] for r in rows)
    assert row(rows, threshold)["balanced_accuracy"] == best


def test_a_presence_equal_to_the_threshold_counts_as_present():
    _, rows = choose_gate(presences(0.2), presences(0.2))
    assert row(rows, 0.2)["sensitivity"] == 1.0 and row(rows, 0.2)["specificity"] == 0.0


def test_ties_keep_the_higher_threshold():
    """Every candidate separates these perfectly: the strictest gate wins."""
    threshold, rows = choose_gate(presences(0.95, 0.99), presences(0.001, 0.002))
    assert all(r["balanced_accuracy"] == 1.0 for r in rows)
    assert threshold == max(r["presence_threshold"] for r in rows)


def test_without_absent_slices_the_gate_lets_every_present_slice_through():
    threshold, rows = choose_gate(presences(0.25, 0.6), presences())
    assert all(r["specificity"] == 0.0 for r in rows)
    assert threshold == 0.2 and row(rows, 0.2)["sensitivity"] == 1.0


def test_without_present_slices_the_strictest_gate_is_chosen():
    threshold, rows = choose_gate(presences(), presences(0.3, 0.6))
    assert all(r["sensitivity"] == 0.0 for r in rows)
    assert threshold == max(r["presence_threshold"] for r in rows)

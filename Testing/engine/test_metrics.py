"""One Dice for every caller: the rule for empty masks, slices and volumes, arrays and tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cldf.metrics import dice, iou, slice_dice, target_slice_dice


def test_two_empty_masks_agree_and_one_empty_mask_scores_zero():
    empty, some = np.zeros((4, 4), bool), np.eye(4, dtype=bool)
    assert dice(empty, empty) == iou(empty, empty) == 1.0
    assert dice(empty, some) == dice(some, empty) == iou(some, empty) == 0.0


def test_dice_and_iou_of_overlapping_masks():
    a, b = np.zeros((1, 6, 6), bool), np.zeros((1, 6, 6), bool)
    a[0, :2] = True  # 12 voxels
    b[0, 1:3] = True  # 12 voxels, 6 shared
    assert dice(a, b) == pytest.approx(2 * 6 / 24) and iou(a, b) == pytest.approx(6 / 18)


def test_tensors_and_integer_labels_count_as_masks():
    a = torch.tensor([[0, 2], [1, 0]])
    assert dice(a, a > 0) == 1.0 and dice(a.numpy(), np.array([[0, 0], [1, 0]])) == pytest.approx(2 / 3)


def test_slice_dice_scores_each_slice_as_dice_does():
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 8, 8)) > 0.6, rng.random((5, 8, 8)) > 0.6
    a[2] = b[2] = False  # an empty pair
    expected = [2 * (x & y).sum() / (x.sum() + y.sum()) if (x | y).any() else 1.0 for x, y in zip(a, b)]
    assert slice_dice(a, b).tolist() == expected and [dice(x, y) for x, y in zip(a, b)] == expected
    assert expected[2] == 1.0 and 0 < expected[0] < 1


def test_target_slice_dice_counts_every_slice_holding_target_and_no_other():
    truth = np.zeros((4, 4, 4), bool)
    truth[1, 0, 0] = truth[3] = True
    pred = np.zeros_like(truth)
    pred[0] = pred[3] = True  # a false positive on a slice without target is not counted
    assert target_slice_dice(pred, truth) == [0.0, 1.0]
    assert target_slice_dice(pred, np.zeros_like(truth)) == []

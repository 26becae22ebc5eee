"""Metrics against hand-computed values (scikit-learn under the hood, checked by hand here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from abc_pipeline.errors import InputError
from abc_pipeline.metrics import classification_metrics, segmentation_metrics


def test_classification_metrics_by_hand() -> None:
    # truth 0,0,0,1,1,2 ; predictions (argmax) 0,0,1,1,1,0 ; class 3 absent from both
    y = np.array([0, 0, 0, 1, 1, 2])
    proba = np.array(
        [
            [0.7, 0.2, 0.1, 0.0],
            [0.6, 0.3, 0.1, 0.0],
            [0.3, 0.6, 0.1, 0.0],
            [0.1, 0.8, 0.1, 0.0],
            [0.2, 0.5, 0.3, 0.0],
            [0.5, 0.1, 0.4, 0.0],
        ]
    )
    m = classification_metrics(y, proba, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # F1: a: P=2/3 R=2/3 -> 2/3 ; b: P=2/3 R=1 -> 0.8 ; c: 0 ; d: absent -> NaN, left out of the mean
    assert m["f1"]["a"] == pytest.approx(2 / 3)
    assert m["f1"]["b"] == pytest.approx(0.8)
    assert m["f1"]["c"] == 0.0
    assert math.isnan(m["f1"]["d"])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    # AUC one-vs-rest. a: positives 0.7,0.6,0.3 vs negatives 0.1,0.2,0.5 -> 8/9 pairs ranked right.
    assert m["auc_per_class"]["a"] == pytest.approx(8 / 9)
    # b: positives 0.8,0.5 vs 0.2,0.3,0.6,0.1 -> (4 + 3) / 8 ; c: positive 0.4 vs 0.1,0.1,0.1,0.1,0.3 -> 1
    assert m["auc_per_class"]["b"] == pytest.approx(7 / 8)
    assert m["auc_per_class"]["c"] == pytest.approx(1.0)
    assert math.isnan(m["auc_per_class"]["d"])
    assert m["auc"] == pytest.approx((8 / 9 + 7 / 8 + 1) / 3)


def test_classification_metrics_bad_shape() -> None:
    with pytest.raises(InputError, match=r"\(N, K\)"):
        classification_metrics(np.array([0, 1]), np.ones((2, 3)), ["a", "b"])


def test_segmentation_metrics_by_hand() -> None:
    truth = np.array([[0, 0, 1, 1], [0, 2, 2, -1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]])  # the last voxel is ignored (no cells)
    m = segmentation_metrics(truth, pred, ["r0", "r1", "r2", "r3"])
    # r0: |T|=3 |P|=3 overlap 2 -> Dice 4/6, IoU 2/4 ; r1: |T|=2 |P|=3 overlap 2 -> Dice 4/5, IoU 2/3
    # r2: |T|=2 |P|=1 overlap 1 -> Dice 2/3, IoU 1/2 ; r3 absent -> NaN
    assert m["dice"]["r0"] == pytest.approx(2 / 3)
    assert m["iou"]["r0"] == pytest.approx(1 / 2)
    assert m["dice"]["r1"] == pytest.approx(4 / 5)
    assert m["iou"]["r1"] == pytest.approx(2 / 3)
    assert m["dice"]["r2"] == pytest.approx(2 / 3)
    assert math.isnan(m["dice"]["r3"])
    assert m["mean_dice"] == pytest.approx((2 / 3 + 4 / 5 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(5 / 7)
    # A relabelled copy is a perfect partition: ARI = NMI = 1 while Dice = 0.
    same = segmentation_metrics(truth, np.where(truth >= 0, (truth + 1) % 3, -1), ["r0", "r1", "r2"])
    assert same["ari"] == pytest.approx(1.0) and same["nmi"] == pytest.approx(1.0)
    assert same["mean_dice"] == 0.0


def test_segmentation_metrics_no_labelled_voxels() -> None:
    with pytest.raises(InputError, match="no labelled voxels"):
        segmentation_metrics(np.full((2, 2), -1), np.zeros((2, 2), int), ["a"])

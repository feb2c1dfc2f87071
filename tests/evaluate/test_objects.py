"""Object-level matching on hand-built masks whose outcome is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from workbench.evaluate.objects import ObjectMatcher, chip_objects, greedy_match, label_components, object_metrics
from workbench.functional import MetricInputError


def _row(table, iou_threshold: float, size_bin: str = "all"):
    match = table[(table.iou_threshold == iou_threshold) & (table.size_bin == size_bin)]
    assert len(match) == 1
    return match.iloc[0]


def test_perfect_match() -> None:
    label = np.zeros((12, 12), dtype=np.uint8)
    label[2:6, 3:8] = 1
    prob = np.where(label == 1, 0.9, 0.1)
    table = object_metrics(prob, label, threshold=0.5)
    for t in (0.5, 0.3, 0.1):
        row = _row(table, t)
        assert (row.n_pred, row.n_gt, row.tp_pred, row.tp_gt, row.fp, row.fn) == (1, 1, 1, 1, 0, 0)
        assert row.precision == row.recall == row.f1 == 1.0
        assert row.sq == 1.0 and row.pq == 1.0


def test_prediction_over_two_gt_objects_matches_only_one() -> None:
    label = np.zeros((10, 12), dtype=np.uint8)
    label[2:6, 1:5] = 1  # 16 px
    label[2:6, 6:10] = 1  # 16 px, one column apart
    prob = np.zeros((10, 12))
    prob[2:6, 1:10] = 0.8  # one blob of 36 px covering both: IoU 16/36 with each
    table = object_metrics(prob, label)
    relaxed = _row(table, 0.3)
    assert (relaxed.n_pred, relaxed.n_gt, relaxed.tp_gt, relaxed.fp, relaxed.fn) == (1, 2, 1, 0, 1)
    assert relaxed.sq == pytest.approx(16 / 36)
    strict = _row(table, 0.5)
    assert (strict.tp_gt, strict.fp, strict.fn) == (0, 1, 2)
    assert strict.f1 == 0.0


def test_two_predictions_on_one_gt_the_more_confident_one_matches() -> None:
    label = np.zeros((8, 12), dtype=np.uint8)
    label[2:6, 0:9] = 1  # 36 px
    prob = np.zeros((8, 12))
    prob[2:6, 0:3] = 0.95  # small blob, 12 px, IoU 1/3, most confident
    prob[2:6, 4:9] = 0.70  # large blob, 20 px, IoU 5/9
    table = object_metrics(prob, label, size_bins=[0, 16, 100])
    # at 0.3 both are eligible: the confident small blob takes the GT object, the large one is a FP
    assert (_row(table, 0.3).tp_pred, _row(table, 0.3).fp) == (1, 1)
    assert _row(table, 0.3, "[0, 16)").tp_pred == 1
    assert _row(table, 0.3, "[16, 100)").tp_pred == 0
    # at 0.5 only the large blob is eligible, so it matches although it is visited second
    assert _row(table, 0.5, "[0, 16)").tp_pred == 0
    assert _row(table, 0.5, "[16, 100)").tp_pred == 1
    # recall by GT size: the one 36-px object sits in the second bin
    assert _row(table, 0.5, "[16, 100)").n_gt == 1 and _row(table, 0.5, "[0, 16)").n_gt == 0


def test_iou_exactly_at_threshold_matches_and_just_below_does_not() -> None:
    label = np.zeros((12, 12), dtype=np.uint8)
    label[1:11, 1:11] = 1  # 100 px
    at = np.zeros((12, 12))
    at[1:6, 1:11] = 0.9  # 50 px inside: IoU 0.50
    below = at.copy()
    below[5, 10] = 0.0  # 49 px: IoU 0.49
    assert _row(object_metrics(at, label), 0.5).tp_gt == 1
    assert _row(object_metrics(below, label), 0.5).tp_gt == 0
    assert _row(object_metrics(below, label), 0.3).tp_gt == 1


def test_connectivity_decides_whether_diagonal_pixels_are_one_object() -> None:
    label = np.zeros((6, 6), dtype=np.uint8)
    label[1, 1] = label[2, 2] = label[3, 3] = 1
    prob = label * 0.9
    assert _row(object_metrics(prob, label, connectivity=8), 0.5).n_gt == 1
    assert _row(object_metrics(prob, label, connectivity=4), 0.5).n_gt == 3
    with pytest.raises(MetricInputError, match="connectivity"):
        label_components(label > 0, connectivity=6)


def test_ignored_and_nodata_pixels() -> None:
    label = np.zeros((10, 10), dtype=np.uint8)
    label[0:3, 0:3] = 255
    label[5:8, 5:8] = 1
    prob = np.zeros((10, 10))
    prob[0:3, 0:3] = 0.9  # prediction only on ignored pixels: dropped
    prob[5:8, 5:8] = 0.9
    valid = np.ones((10, 10), dtype=bool)
    row = _row(object_metrics(prob, label, valid), 0.5)
    assert (row.n_pred, row.n_gt, row.tp_gt) == (1, 1, 1)
    valid[5:8, 5:8] = False  # nodata: neither object exists
    row = _row(object_metrics(prob, label, valid), 0.5)
    assert (row.n_pred, row.n_gt) == (0, 0)
    assert np.isnan(row.precision) and np.isnan(row.recall)


def test_pairwise_iou_matches_component_by_component_computation() -> None:
    rng = np.random.default_rng(0)
    label = (ndimage.uniform_filter(rng.random((40, 40)), 5) > 0.55).astype(np.uint8)
    prob = ndimage.uniform_filter(rng.random((40, 40)), 5)
    objects = chip_objects(prob, label, np.ones((40, 40), bool), threshold=0.52)
    pred_ids, n_pred = ndimage.label(prob >= 0.52, structure=np.ones((3, 3)))
    gt_ids, n_gt = ndimage.label(label == 1, structure=np.ones((3, 3)))
    assert objects.iou.shape == (n_pred, n_gt) and n_pred > 1 and n_gt > 1
    for i in range(n_pred):
        a = pred_ids == i + 1
        assert objects.pred_score[i] == pytest.approx(prob[a].mean())
        for j in range(n_gt):
            b = gt_ids == j + 1
            assert objects.iou[i, j] == pytest.approx((a & b).sum() / (a | b).sum())


def test_greedy_match_takes_best_unmatched_gt() -> None:
    iou = np.array([[0.6, 0.4], [0.7, 0.2]])
    # prediction 1 is more confident: it takes GT 0; prediction 0 falls back to GT 1 (0.4 >= 0.3)
    np.testing.assert_array_equal(greedy_match(iou, np.array([0.5, 0.9]), 0.3), [1, 0])
    np.testing.assert_array_equal(greedy_match(iou, np.array([0.5, 0.9]), 0.5), [-1, 0])
    np.testing.assert_array_equal(greedy_match(np.zeros((2, 0)), np.array([0.5, 0.9]), 0.5), [-1, -1])


def test_matcher_accumulates_over_chips_and_batches() -> None:
    rng = np.random.default_rng(1)
    label = (ndimage.uniform_filter(rng.random((3, 30, 30)), (1, 4, 4)) > 0.55).astype(np.uint8)
    prob = np.clip(label * 0.6 + rng.random((3, 30, 30)) * 0.5, 0, 1)
    batched = ObjectMatcher(size_bins=[0, 10, np.inf]).update(prob, label).result()
    one_by_one = ObjectMatcher(size_bins=[0, 10, np.inf])
    for b in range(3):
        one_by_one.update(prob[b], label[b])
    assert one_by_one.n_chips == 3
    singles = [object_metrics(prob[b], label[b], size_bins=[0, 10, np.inf]) for b in range(3)]
    for column in ("n_pred", "n_gt", "tp_pred", "tp_gt", "fp", "fn"):
        np.testing.assert_array_equal(batched[column], one_by_one.result()[column])
        np.testing.assert_array_equal(batched[column], sum(s[column] for s in singles))
    assert _row(batched, 0.1).n_gt > 3 and _row(batched, 0.1).tp_gt > 0
    for t in (0.5, 0.3, 0.1):
        everything = _row(batched, t)
        assert everything.n_gt == _row(batched, t, "[0, 10)").n_gt + _row(batched, t, "[10, inf)").n_gt
        assert everything.f1 == pytest.approx(
            2 * everything.tp_gt / (2 * everything.tp_gt + everything.fp + everything.fn)
        )


def test_matcher_rejects_bad_settings() -> None:
    with pytest.raises(MetricInputError, match="iou_thresholds"):
        ObjectMatcher(iou_thresholds=[0.0])
    with pytest.raises(MetricInputError, match="size_bins"):
        ObjectMatcher(size_bins=[10, 5])
    with pytest.raises(MetricInputError, match="shape"):
        ObjectMatcher().update(np.zeros((4, 4)), np.zeros((5, 5), dtype=np.uint8))

"""The counts-to-metrics core (`workbench.functional`) against scikit-learn and torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)
from torchmetrics.classification import (
    BinaryJaccardIndex,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MulticlassPrecision,
    MulticlassRecall,
)

from workbench.functional import (
    MetricInputError,
    accuracy,
    confusion_counts,
    iou_score,
    metrics_from_counts,
    pixel_accuracy,
    precision,
    recall,
    safe_divide,
    score,
    segmentation_summary,
)
from workbench.functional import (
    f1_score as wb_f1,
)


def _random_batch(rng: np.random.Generator, num_classes: int = 2, shape: tuple[int, ...] = (4, 32, 32)):
    """Random labels with ignored (255) and nodata pixels, predictions correlated with labels."""
    label = rng.integers(0, num_classes, size=shape).astype(np.int64)
    pred = np.where(rng.random(shape) < 0.7, label, rng.integers(0, num_classes, size=shape))
    label[rng.random(shape) < 0.05] = 255
    valid = rng.random(shape) > 0.1
    return pred, label, valid


def _usable(label: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return valid & (label != 255)


# --------------------------------------------------------------------------- confusion counts and reductions


def test_confusion_counts_match_sklearn_confusion_matrix_per_image() -> None:
    rng = np.random.default_rng(0)
    pred, label, valid = _random_batch(rng, num_classes=3)
    tp, fp, fn, tn = confusion_counts(pred, label, num_classes=3, valid=valid)
    assert tp.shape == (4, 3)
    for b in range(4):
        keep = _usable(label[b], valid[b])
        cm = confusion_matrix(label[b][keep], pred[b][keep], labels=[0, 1, 2])
        np.testing.assert_array_equal(tp[b], np.diag(cm))
        np.testing.assert_array_equal(fp[b], cm.sum(axis=0) - np.diag(cm))
        np.testing.assert_array_equal(fn[b], cm.sum(axis=1) - np.diag(cm))
        np.testing.assert_array_equal(tp[b] + fp[b] + fn[b] + tn[b], keep.sum())


def test_micro_binary_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    pred, label, valid = _random_batch(rng)
    counts = confusion_counts(pred, label, num_classes=2, valid=valid)
    keep = _usable(label, valid)
    y, p = label[keep], pred[keep]
    assert score("iou", *counts, reduction="per-class")[1] == pytest.approx(jaccard_score(y, p))
    assert score("f1", *counts, reduction="per-class")[1] == pytest.approx(f1_score(y, p))
    assert score("precision", *counts, reduction="per-class")[1] == pytest.approx(precision_score(y, p))
    assert score("recall", *counts, reduction="per-class")[1] == pytest.approx(recall_score(y, p))
    assert score("accuracy", *counts, reduction="per-class")[1] == pytest.approx(accuracy_score(y, p))
    assert score("iou", *counts, reduction="per-class")[0] == pytest.approx(jaccard_score(y, p, pos_label=0))
    summary = segmentation_summary(*counts, class_names=["background", "target"])
    assert summary["iou"] == pytest.approx(jaccard_score(y, p))
    assert summary["iou/background"] == pytest.approx(jaccard_score(y, p, pos_label=0))
    assert summary["pixel_accuracy"] == pytest.approx(accuracy_score(y, p))


def test_per_image_mean_skips_images_where_metric_is_undefined() -> None:
    rng = np.random.default_rng(2)
    pred, label, valid = _random_batch(rng)
    label[0] = np.where(label[0] == 255, 255, 0)  # image 0: no positives ...
    pred[0] = 0  # ... and none predicted: IoU is 0/0
    tp, fp, fn, tn = confusion_counts(pred, label, num_classes=2, valid=valid)
    assert tp[0, 1] + fp[0, 1] + fn[0, 1] == 0
    expected = []
    for b in range(1, 4):
        keep = _usable(label[b], valid[b])
        expected.append(jaccard_score(label[b][keep], pred[b][keep]))
    assert score("iou", tp, fp, fn, tn, "per-class-imagewise")[1] == pytest.approx(np.mean(expected))
    # on image 0 alone, IoU, precision and recall of the positive class are 0/0 = NaN;
    # accuracy is defined (every pixel is right)
    first = (tp[:1], fp[:1], fn[:1], tn[:1])
    for metric in ("iou", "precision", "recall"):
        assert np.isnan(score(metric, *first, reduction="per-class-imagewise")[1])
        assert np.isnan(score(metric, *first, reduction="per-class")[1])
    assert score("accuracy", *first, reduction="per-class-imagewise")[1] == 1.0


def test_miou_and_accuracy_match_torchmetrics_including_absent_class() -> None:
    rng = np.random.default_rng(3)
    pred, label, valid = _random_batch(rng, num_classes=4)
    # class 3 neither present nor predicted anywhere: it must be left out of the mean
    label[label == 3] = 0
    pred[pred == 3] = 1
    target = np.where(valid, label, 255)
    jaccard = MulticlassJaccardIndex(num_classes=4, average="macro", ignore_index=255)
    accuracy = MulticlassAccuracy(num_classes=4, average="micro", ignore_index=255)
    expected_miou = float(jaccard(torch.from_numpy(pred), torch.from_numpy(target)))
    expected_acc = float(accuracy(torch.from_numpy(pred), torch.from_numpy(target)))
    counts = confusion_counts(
        torch.from_numpy(pred), torch.from_numpy(label), num_classes=4, valid=torch.from_numpy(valid)
    )
    summary = segmentation_summary(*counts)
    assert summary["miou"] == pytest.approx(expected_miou, abs=1e-6)
    assert summary["pixel_accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    assert np.isnan(summary["iou/3"])
    per_class = MulticlassJaccardIndex(num_classes=4, average="none", ignore_index=255)
    expected_per_class = per_class(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
    np.testing.assert_allclose(score("iou", *counts, reduction="per-class")[:3], expected_per_class[:3], rtol=1e-6)


def test_pixel_accuracy_per_image_is_mean_of_image_accuracies() -> None:
    rng = np.random.default_rng(4)
    pred, label, valid = _random_batch(rng, num_classes=3)
    counts = confusion_counts(pred, label, num_classes=3, valid=valid)
    expected = np.mean(
        [accuracy_score(label[b][_usable(label[b], valid[b])], pred[b][_usable(label[b], valid[b])]) for b in range(4)]
    )
    assert pixel_accuracy(*counts, reduction="micro-imagewise") == pytest.approx(expected)


def test_confusion_counts_rejects_bad_input() -> None:
    label = np.zeros((2, 4, 4), dtype=np.int64)
    with pytest.raises(MetricInputError, match="label holds class 2"):
        confusion_counts(np.zeros_like(label), np.full_like(label, 2), num_classes=2)
    with pytest.raises(MetricInputError, match="shape"):
        confusion_counts(np.zeros((2, 4, 5), dtype=np.int64), label, num_classes=2)
    with pytest.raises(MetricInputError, match="pred values"):
        confusion_counts(np.full_like(label, 5), label, num_classes=2)
    with pytest.raises(MetricInputError, match="threshold first"):
        confusion_counts(np.zeros(label.shape, dtype=np.float32), label, num_classes=2)
    with pytest.raises(MetricInputError, match="unknown metric"):
        score("dice", *confusion_counts(label, label, num_classes=2))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- binary masks


def test_binary_counts_match_sklearn_confusion_matrix_with_ignored_pixels() -> None:
    rng = np.random.default_rng(10)
    pred, label, valid = _random_batch(rng)
    mask = pred.astype(bool)
    tp, fp, fn, tn = confusion_counts(mask, label, valid=valid)
    assert tp.shape == (4, 1)
    for b in range(4):
        keep = _usable(label[b], valid[b])
        (tn_ref, fp_ref), (fn_ref, tp_ref) = confusion_matrix(label[b][keep], pred[b][keep], labels=[0, 1])
        assert (tp[b, 0], fp[b, 0], fn[b, 0], tn[b, 0]) == (tp_ref, fp_ref, fn_ref, tn_ref)
    # the binary counts equal the positive class of the two-class counts
    two = confusion_counts(pred, label, num_classes=2, valid=valid)
    for one, both in zip((tp, fp, fn, tn), two, strict=True):
        np.testing.assert_array_equal(one[:, 0], both[:, 1])
    pooled = confusion_counts(mask, label, valid=valid, per_image=False)
    assert [int(c[0]) for c in pooled] == [int(c.sum()) for c in (tp, fp, fn, tn)]


def test_binary_target_is_positive_for_every_nonzero_class_but_the_ignore_label() -> None:
    target = np.array([[0, 1, 2, 255]], dtype=np.uint8)
    pred = np.array([[True, True, False, True]])
    tp, fp, fn, tn = confusion_counts(pred, target, per_image=False)
    assert (int(tp[0]), int(fp[0]), int(fn[0]), int(tn[0])) == (1, 1, 1, 0)


def test_binary_metrics_match_sklearn_and_torchmetrics() -> None:
    rng = np.random.default_rng(11)
    pred, label, valid = _random_batch(rng, shape=(3, 40, 40))
    counts = confusion_counts(pred.astype(bool), label, valid=valid)
    keep = _usable(label, valid)
    y, p = label[keep], pred[keep]
    assert iou_score(*counts, reduction="micro") == pytest.approx(jaccard_score(y, p))
    assert wb_f1(*counts, reduction="micro") == pytest.approx(f1_score(y, p))
    assert precision(*counts, reduction="micro") == pytest.approx(precision_score(y, p))
    assert recall(*counts, reduction="micro") == pytest.approx(recall_score(y, p))
    assert accuracy(*counts, reduction="micro") == pytest.approx(accuracy_score(y, p))
    target = torch.from_numpy(np.where(valid, label, 255))
    expected = float(BinaryJaccardIndex(ignore_index=255)(torch.from_numpy(pred), target))
    assert iou_score(*counts, reduction="micro") == pytest.approx(expected, abs=1e-6)
    per_image = [jaccard_score(label[b][keep[b]], pred[b][keep[b]]) for b in range(3)]
    assert iou_score(*counts, reduction="micro-imagewise") == pytest.approx(np.mean(per_image))
    np.testing.assert_allclose(iou_score(*counts)[:, 0], per_image)


# --------------------------------------------------------------------------- micro and macro over classes


def test_micro_and_macro_reductions_match_sklearn_and_torchmetrics() -> None:
    rng = np.random.default_rng(12)
    pred, label, valid = _random_batch(rng, num_classes=3)
    counts = confusion_counts(pred, label, num_classes=3, valid=valid)
    keep = _usable(label, valid)
    y, p = label[keep], pred[keep]
    classes = [0, 1, 2]
    for metric, reference in (
        ("iou", jaccard_score),
        ("f1", f1_score),
        ("precision", precision_score),
        ("recall", recall_score),
    ):
        for average in ("micro", "macro"):
            expected = reference(y, p, labels=classes, average=average)
            assert score(metric, *counts, reduction=average) == pytest.approx(expected), (metric, average)
        np.testing.assert_allclose(
            score(metric, *counts, reduction="per-class"), reference(y, p, labels=classes, average=None)
        )
    target = torch.from_numpy(np.where(valid, label, 255))
    prediction = torch.from_numpy(pred)
    for metric, reference in (
        ("iou", MulticlassJaccardIndex),
        ("f1", MulticlassF1Score),
        ("precision", MulticlassPrecision),
        ("recall", MulticlassRecall),
    ):
        for average in ("micro", "macro"):
            expected = float(reference(num_classes=3, average=average, ignore_index=255)(prediction, target))
            assert score(metric, *counts, reduction=average) == pytest.approx(expected, abs=1e-6), (metric, average)


def test_imagewise_reductions_average_images_after_pooling_or_averaging_classes() -> None:
    rng = np.random.default_rng(13)
    pred, label, valid = _random_batch(rng, num_classes=3)
    counts = confusion_counts(pred, label, num_classes=3, valid=valid)
    micro, macro = [], []
    for b in range(4):
        keep = _usable(label[b], valid[b])
        micro.append(jaccard_score(label[b][keep], pred[b][keep], labels=[0, 1, 2], average="micro"))
        macro.append(jaccard_score(label[b][keep], pred[b][keep], labels=[0, 1, 2], average="macro"))
    assert iou_score(*counts, reduction="micro-imagewise") == pytest.approx(np.mean(micro))
    assert iou_score(*counts, reduction="macro-imagewise") == pytest.approx(np.mean(macro))


def test_absent_class_is_undefined_and_left_out_of_the_macro_mean() -> None:
    rng = np.random.default_rng(14)
    pred, label, valid = _random_batch(rng, num_classes=3)
    label[label == 2] = 0
    pred[pred == 2] = 1  # class 2 neither labelled nor predicted anywhere
    counts = confusion_counts(pred, label, num_classes=3, valid=valid)
    per_class = iou_score(*counts, reduction="per-class")
    assert np.isnan(per_class[2]) and np.isfinite(per_class[:2]).all()
    for metric in ("iou", "f1", "precision", "recall"):
        assert np.isnan(score(metric, *counts, reduction="per-class")[2])  # type: ignore[arg-type]
    assert iou_score(*counts, reduction="macro") == pytest.approx(per_class[:2].mean())
    target = torch.from_numpy(np.where(valid, label, 255))
    expected = float(
        MulticlassJaccardIndex(num_classes=3, average="macro", ignore_index=255)(torch.from_numpy(pred), target)
    )
    assert iou_score(*counts, reduction="macro") == pytest.approx(expected, abs=1e-6)
    # a mean over nothing is NaN, without a warning
    empty = np.zeros((1, 3), dtype=np.int64)
    assert np.isnan(iou_score(empty, empty, empty, empty, reduction="macro"))


def test_ignored_and_invalid_pixels_are_not_counted() -> None:
    label = np.array([[[1, 1, 255, 0]]], dtype=np.uint8)
    pred = np.array([[[1, 0, 1, 1]]], dtype=np.uint8)
    valid = np.array([[[True, True, True, False]]])
    tp, fp, fn, tn = confusion_counts(pred, label, valid=valid, per_image=False)
    assert (int(tp[0]), int(fp[0]), int(fn[0]), int(tn[0])) == (1, 0, 1, 0)
    tp, fp, fn, tn = confusion_counts(pred, label, ignore_index=1, per_image=False)
    assert (int(tp[0]), int(fp[0]), int(fn[0]), int(tn[0])) == (1, 1, 0, 0)  # label 255 is positive here


# --------------------------------------------------------------------------- zero division and smoothing


def test_zero_division_policy_and_smoothing() -> None:
    zero = np.zeros(1)
    assert np.isnan(iou_score(0, 0, 0, 5))
    assert iou_score(0, 0, 0, 5, zero_division=1.0) == 1.0
    assert precision(0, 0, 3, 0, zero_division=0.0) == 0.0
    assert iou_score(2, 1, 1, 0, smooth=1.0) == pytest.approx(3 / 5)
    assert iou_score(zero, zero, zero, zero, smooth=1.0)[0] == 1.0
    assert safe_divide(1, 0, zero_division=-1.0) == -1.0
    values = metrics_from_counts(3, 1, 2, 4)
    assert values == pytest.approx({"iou": 0.5, "f1": 6 / 9, "precision": 0.75, "recall": 0.6, "accuracy": 0.7})
    empty = metrics_from_counts(0, 0, 0, 7, metrics=("iou", "accuracy"))
    assert set(empty) == {"iou", "accuracy"} and math.isnan(empty["iou"]) and empty["accuracy"] == 1.0
    with pytest.raises(MetricInputError, match="unknown reduction"):
        iou_score(1, 0, 0, 0, reduction="weighted")  # type: ignore[arg-type]


def test_segmentation_summary_imagewise_and_pixel_accuracy() -> None:
    rng = np.random.default_rng(15)
    pred, label, valid = _random_batch(rng)
    counts = confusion_counts(pred, label, num_classes=2, valid=valid)
    summary = segmentation_summary(*counts, class_names=["background", "water"], imagewise=True)
    expected = []
    for b in range(4):
        keep = _usable(label[b], valid[b])
        expected.append(f1_score(label[b][keep], pred[b][keep]))
    assert summary["f1"] == pytest.approx(np.mean(expected))
    assert summary["pixel_accuracy"] == pixel_accuracy(*counts, reduction="micro-imagewise")

"""Multiclass metrics, confusion tables and softmax calibration against scikit-learn / torchmetrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from workbench.arrays import softmax
from workbench.evaluate.calibration import (
    class_probabilities,
    fit_class_temperature,
    multiclass_ece,
    predict_classes,
)
from workbench.evaluate.multiclass import chip_confusions, split_scores
from workbench.functional import confusion_matrix, multiclass_summary
from workbench.infer.chips import load_predictions, save_predictions

NAMES = ["background", "lake", "snow", "rock"]


def _labels(seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, size=(3, 16, 16)).astype(np.uint8)  # class 3 (rock) never labelled
    label[0, :2] = 255  # ignored
    pred = np.where(rng.random(label.shape) < 0.7, label % 3, rng.integers(0, 3, label.shape)).astype(np.uint8)
    valid = rng.random(label.shape) > 0.1
    return label, pred, valid


def test_confusion_and_summary_match_sklearn_and_torchmetrics_with_ignored_and_absent():
    from torchmetrics.classification import MulticlassJaccardIndex

    label, pred, valid = _labels()
    cm = confusion_matrix(pred, label, 4, valid=valid)
    keep = valid & (label != 255)
    y, p = label[keep], pred[keep]
    np.testing.assert_array_equal(cm, sk_confusion(y, p, labels=[0, 1, 2, 3]))
    summary = multiclass_summary(cm, NAMES)
    assert summary["absent_classes"] == ["rock"]
    assert all(math.isnan(summary[f"{m}.rock"]) for m in ("iou", "f1", "precision", "recall"))
    present = [0, 1, 2]
    for metric, fn in (
        ("iou", jaccard_score),
        ("f1", f1_score),
        ("precision", precision_score),
        ("recall", recall_score),
    ):
        expected = fn(y, p, labels=present, average=None)
        got = [summary[f"{metric}.{NAMES[c]}"] for c in present]
        np.testing.assert_allclose(got, expected)
    assert summary["miou"] == pytest.approx(jaccard_score(y, p, labels=present, average="macro"))
    assert summary["miou_no_background"] == pytest.approx(jaccard_score(y, p, labels=[1, 2], average="macro"))
    assert summary["overall_accuracy"] == pytest.approx((y == p).mean())
    # torchmetrics drops the absent class from its macro mean (zero_division NaN-like behaviour)
    target = torch.from_numpy(np.where(keep, label, 255).astype(np.int64))
    tm = MulticlassJaccardIndex(num_classes=4, average="macro", ignore_index=255)
    assert summary["miou"] == pytest.approx(float(tm(torch.from_numpy(pred.astype(np.int64)), target)), abs=1e-6)


def test_class_probabilities_and_decisions():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 4, 4))
    np.testing.assert_allclose(class_probabilities(logits, {"temperature": 2.0}), softmax(logits / 2.0))
    vector = class_probabilities(logits[0], {"temperature": [1.0, 2.0, 4.0]})
    np.testing.assert_allclose(vector, softmax(logits[0] / np.array([1.0, 2.0, 4.0])[:, None, None], axis=0))
    assert (predict_classes(logits) == logits.argmax(1)).all()
    prob = class_probabilities(logits)
    decided = predict_classes(logits, {"temperature": 1.0, "class_thresholds": {"c2": 0.2}}, ["c0", "c1", "c2"])
    np.testing.assert_array_equal(decided, np.where(prob[:, 2] >= 0.2, 2, logits.argmax(1)))


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(2)
    n, k, true_t = 40000, 4, 2.5
    clean = rng.normal(size=(n, k)) * 3.0  # the calibrated logits
    labels = np.array([rng.choice(k, p=row) for row in softmax(clean, axis=1)])
    overconfident = clean * true_t  # a model reporting logits T times too large
    t = fit_class_temperature(overconfident, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    vector = fit_class_temperature(overconfident, labels, per_class=True)
    assert len(vector) == k and all(v == pytest.approx(true_t, rel=0.15) for v in vector)
    before = multiclass_ece(softmax(overconfident, axis=1), labels)
    after = multiclass_ece(softmax(overconfident / t, axis=1), labels)
    assert after < before / 3 and after < 0.02
    assert multiclass_ece(softmax(overconfident / t, axis=1), labels, kind="classwise") < 0.02


def test_split_tables_sum_per_region_and_year(tmp_path: Path):
    from conftest import load_fakes

    from workbench.data.ingest import ingest
    from workbench.data.sources.npz import UKIS_MULTICLASS_MAP
    from workbench.data.store import read_catalog

    fakes = load_fakes()
    fakes.make_npz(tmp_path / "raw", size=64)
    ingest(
        "ukis-csmask", tmp_path / "raw", tmp_path / "store", chip_size=32, progress=False, class_map=UKIS_MULTICLASS_MAP
    )
    catalog = read_catalog(tmp_path / "store")
    catalog["region"] = ["a", "a", "b", "b"]
    rng = np.random.default_rng(3)
    save_predictions(tmp_path, "val", np.arange(4), rng.normal(size=(4, 3, 32, 32)))
    names = ["clear", "cloud", "shadow"]
    table, matrices = chip_confusions(tmp_path / "store", catalog, load_predictions(tmp_path, "val"), names)
    metrics, tables = split_scores(table, matrices, names)
    assert matrices.shape == (4, 3, 3) and int(matrices.sum()) == 4 * 32 * 32
    confusion = tables["confusion"]
    by_region = tables["confusion_region"].groupby(["label", "predicted"])["count"].sum()
    pd.testing.assert_series_equal(
        by_region, confusion.set_index(["label", "predicted"])["count"].sort_index(), check_names=False
    )
    row_sums = confusion.groupby("label")["normalized"].sum()
    np.testing.assert_allclose(row_sums.to_numpy(), 1.0)
    assert table["label_pixels.shadow"].sum() == 2 * 8 * 32  # rows 0..7 of the two top chips are shadow
    classes = tables["class_metrics"]
    assert set(classes["group"]) == {"all", "region", "year"}
    assert metrics["miou"] == pytest.approx(classes[classes["group"] == "all"]["iou"].mean())

"""The one-pass evaluation report, checked against scikit-learn, hand counts and analytic formulas."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score
from torch import nn

from workbench.evaluate.calibration import Calibration, fit_temperature
from workbench.evaluate.scoring import (
    LogitHistogram,
    PixelSample,
    ReportInputError,
    calibration_quality,
    evaluate_predictions,
    object_metrics,
    object_table,
    pooled_summary,
    prevalence_metrics,
    prevalence_table,
    tta_comparison,
)
from workbench.figures import plot_pr_curves_with_baseline, plot_reliability_grid


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def calibrated_pixels(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true log-odds s; the stored logit is temperature * s (so the right T is known)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(-1.0, 2.0, n)
    label = (rng.random(n) < sigmoid(s)).astype(np.uint8)
    return (temperature * s).astype(np.float16).astype(np.float32), label


def chips_from_arrays(logits: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None) -> list:
    valid = np.ones(labels.shape, dtype=bool) if valid is None else valid
    return [(i, labels[i], valid[i], logits[i]) for i in range(len(labels))]


def catalog_for(n: int, regions: list[str] | None = None, years: list[int] | None = None) -> pd.DataFrame:
    regions = regions or ["a"] * n
    years = years or [2020] * n
    return pd.DataFrame({"chip_id": [f"c{i}" for i in range(n)], "region": regions, "year": years})


# --------------------------------------------------------------------------- logit histogram


def test_temperature_from_the_histogram_recovers_the_true_temperature() -> None:
    logits, labels = calibrated_pixels(200_000, temperature=2.5)
    hist = LogitHistogram().update(logits, labels)
    fitted = hist.fit_temperature()
    assert fitted == pytest.approx(fit_temperature(logits, labels), rel=1e-5)  # same data, pixel by pixel
    assert fitted == pytest.approx(2.5, rel=0.03)


def test_calibrated_threshold_histogram_matches_direct_counts() -> None:
    logits, labels = calibrated_pixels(50_000, temperature=0.7, seed=1)
    temperature = 1.7
    sweep = LogitHistogram().update(logits, labels).threshold_histogram(temperature, bins=1000).sweep([0.2, 0.5, 0.8])
    prob = sigmoid(logits.astype(np.float64) / temperature)
    for row in sweep.itertuples():
        predicted = prob >= row.threshold
        assert row.tp == int((predicted & (labels == 1)).sum())
        assert row.fp == int((predicted & (labels == 0)).sum())
        assert row.fn == int((~predicted & (labels == 1)).sum())


def test_histogram_skips_ignored_and_nodata_pixels_and_rejects_nan_logits() -> None:
    logits = np.array([[1.0, -1.0, np.nan, 2.0]], dtype=np.float32)
    label = np.array([[1, 0, 1, 255]], dtype=np.uint8)
    valid = np.array([[True, True, False, True]])
    hist = LogitHistogram().update(logits, label, valid)
    assert (hist.n_pixels, hist.n_positive) == (2, 1)
    with pytest.raises(ReportInputError, match="NaN"):
        LogitHistogram().update(logits, label).support()
    with pytest.raises(ReportInputError, match="shape"):
        LogitHistogram().update(logits[:, :2], label)


def test_pixel_sample_is_bounded_and_keeps_everything_below_capacity() -> None:
    rng = np.random.default_rng(3)
    small = PixelSample(capacity=100, seed=0).update(np.arange(50, dtype=np.float32), np.zeros(50, np.uint8))
    assert sorted(small.logits.tolist()) == list(range(50))
    sample = PixelSample(capacity=2000, seed=0)
    labels = (rng.random((40, 1000)) < 0.3).astype(np.uint8)
    for chip in labels:
        sample.update(rng.normal(size=1000), chip)
    assert sample.logits.size == sample.targets.size == 2000
    assert sample.targets.mean() == pytest.approx(labels.mean(), abs=0.04)  # binomial sd ~0.01


# --------------------------------------------------------------------------- calibration scores


def test_calibration_quality_against_hand_values() -> None:
    # 10 pixels at probability 0.8 (8 positive) and 10 at 0.3 (3 positive): calibrated at T = 1;
    # with 2 bins, equal-width and equal-mass bins both hold exactly one group
    logits = np.r_[[math.log(0.8 / 0.2)] * 10, [math.log(0.3 / 0.7)] * 10]
    targets = np.r_[[1] * 8, [0] * 2, [1] * 3, [0] * 7].astype(np.float32)
    scores, tables = calibration_quality(logits, targets, temperature=2.0, bins=2)
    high, low = 1 / (1 + math.sqrt(0.2 / 0.8)), 1 / (1 + math.sqrt(0.7 / 0.3))  # sigmoid(logit(p) / 2)
    for suffix in ("", "_mass"):
        assert scores[f"ece{suffix}_before"] == pytest.approx(0.0, abs=1e-12)
        assert scores[f"ece{suffix}_after"] == pytest.approx(0.5 * abs(high - 0.8) + 0.5 * abs(low - 0.3))
        assert scores[f"mce{suffix}_after"] == pytest.approx(max(abs(high - 0.8), abs(low - 0.3)))
    assert scores["brier_before"] == pytest.approx((8 * 0.2**2 + 2 * 0.8**2 + 3 * 0.7**2 + 7 * 0.3**2) / 20)
    expected_after = (8 * (1 - high) ** 2 + 2 * high**2 + 3 * (1 - low) ** 2 + 7 * low**2) / 20
    assert scores["brier_after"] == pytest.approx(expected_after)
    assert set(tables) == {"uniform/before", "uniform/after", "quantile/before", "quantile/after"}
    assert tables["quantile/after"]["count"].tolist() == [10, 10]


def test_temperature_scaling_lowers_ece_on_miscalibrated_logits() -> None:
    logits, labels = calibrated_pixels(100_000, temperature=3.0, seed=4)
    temperature = LogitHistogram().update(logits, labels).fit_temperature()
    scores, tables = calibration_quality(logits, labels.astype(np.float32), temperature)
    assert scores["ece_after"] < 0.01 < scores["ece_before"]
    assert scores["ece_mass_after"] < scores["ece_mass_before"]
    assert scores["brier_after"] < scores["brier_before"]
    fig = plot_reliability_grid({"val": tables})
    assert len(fig.axes) == 2


# --------------------------------------------------------------------------- pooled, per-chip and per-group scores


def test_pooled_summary_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    labels = (rng.random((6, 16, 16)) < 0.25).astype(np.uint8)
    logits = (rng.normal(size=labels.shape) + 2.0 * (labels - 0.5)).astype(np.float32)
    valid = rng.random(labels.shape) > 0.1
    labels[0, :2] = 255
    evaluation = evaluate_predictions(
        chips_from_arrays(logits, labels, valid), catalog_for(6), Calibration(temperature=1.5, threshold=0.4)
    )
    summary = pooled_summary(evaluation.per_chip)
    keep = valid & (labels != 255)
    truth = labels[keep]
    pred = (sigmoid(logits[keep] / 1.5) >= 0.4).astype(np.uint8)
    assert summary["iou"] == pytest.approx(jaccard_score(truth, pred))
    assert summary["miou"] == pytest.approx(jaccard_score(truth, pred, average="macro"))
    assert summary["f1"] == pytest.approx(f1_score(truth, pred))
    assert summary["precision"] == pytest.approx(precision_score(truth, pred))
    assert summary["recall"] == pytest.approx(recall_score(truth, pred))
    assert summary["pixel_accuracy"] == pytest.approx((truth == pred).mean())
    per_chip_iou = [jaccard_score(labels[i][keep[i]], (sigmoid(logits[i][keep[i]] / 1.5) >= 0.4)) for i in range(6)]
    assert summary["mean_chip_iou"] == pytest.approx(np.mean(per_chip_iou))


def test_region_thresholds_are_applied_per_chip() -> None:
    logits = np.zeros((2, 4, 4), np.float32)
    logits[:, :, :2] = math.log(0.35 / 0.65)  # probability 0.35 on the left half, 0.5 on the right
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[:, :, :2] = 1
    calibration = Calibration(temperature=1.0, threshold=0.45, per_region={"low": 0.3})
    table = evaluate_predictions(
        chips_from_arrays(logits, labels), catalog_for(2, ["low", "high"]), calibration
    ).per_chip
    assert table["threshold"].tolist() == [0.3, 0.45]
    assert table[["tp", "fp", "fn"]].values.tolist() == [[8, 8, 0], [0, 8, 8]]


def test_uncalibrated_pass_keeps_group_histograms_only() -> None:
    logits, labels = np.zeros((3, 4, 4), np.float32), np.ones((3, 4, 4), np.uint8)
    evaluation = evaluate_predictions(chips_from_arrays(logits, labels), catalog_for(3, ["a", "b", "a"]))
    assert not evaluation.calibrated and evaluation.per_chip.empty
    assert {k: h.n_pixels for k, h in evaluation.groups.items()} == {"a": 32, "b": 16}
    with pytest.raises(ReportInputError, match="outside the catalog"):
        evaluate_predictions(chips_from_arrays(logits, labels), catalog_for(2))


# --------------------------------------------------------------------------- prevalence


def prevalence_chips(n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive chips: 10 lake pixels (8 scored 0.9), 90 background (9 scored 0.9); negative chips: 10 of 100 at 0.9."""
    pos_chip = np.r_[[0.9] * 8, [0.1] * 2, [0.9] * 9, [0.1] * 81]
    pos_label = np.r_[[1] * 10, [0] * 90]
    neg_chip, neg_label = np.r_[[0.9] * 10, [0.1] * 90], np.zeros(100)
    probs = np.stack([pos_chip] * n_pos + [neg_chip] * n_neg)[:, None, :]
    labels = np.stack([pos_label] * n_pos + [neg_label] * n_neg).astype(np.uint8)[:, None, :]
    return probs.astype(np.float32), labels, np.r_[[True] * n_pos, [False] * n_neg]


@pytest.mark.parametrize("ratio", [200, 500, 1000])
def test_prevalence_precision_follows_the_analytic_formula(ratio: int) -> None:
    from workbench.evaluate.metrics import per_chip_histograms

    probs, labels, is_positive = prevalence_chips(n_pos=4, n_neg=6)
    pos, neg = per_chip_histograms(probs, labels, bins=100)
    table, curves = prevalence_table(pos, neg, is_positive, [ratio], threshold=0.5)
    tpr, fpr = 0.8, 0.1  # the same in every chip by construction
    pi = 10 / (10 + 90 + 100 * ratio)  # lake pixels per positive chip over all pixels per positive chip's share
    expected = tpr * pi / (tpr * pi + fpr * (1 - pi))
    row = table.iloc[0]
    assert row["prevalence"] == f"1:{ratio}"
    assert row["pixel_prevalence"] == pytest.approx(pi) and row["no_skill_ap"] == pytest.approx(pi)
    assert row["precision"] == pytest.approx(expected)
    assert row["recall"] == pytest.approx(tpr)
    assert curves[f"1:{ratio}"]["prevalence"] == pytest.approx(pi)
    metrics = prevalence_metrics(table)
    assert metrics[f"test.precision_{ratio}"] == pytest.approx(expected)
    assert metrics[f"test.pr_auc_{ratio}"] == pytest.approx(row["pr_auc"])


def test_no_skill_average_precision_equals_the_prevalence() -> None:
    from workbench.evaluate.metrics import per_chip_histograms

    rng = np.random.default_rng(6)
    labels = np.zeros((40, 1, 2000), np.uint8)
    labels[:20, 0, :100] = 1  # 20 positive chips with 5 % lake pixels, 20 negative chips
    probs = rng.random(labels.shape).astype(np.float32)  # scores carry no information
    pos, neg = per_chip_histograms(probs, labels, bins=100)
    is_positive = np.asarray(labels.any(axis=(1, 2)))
    table, curves = prevalence_table(pos, neg, is_positive, [200, 1000])
    np.testing.assert_allclose(table["pr_auc"], table["pixel_prevalence"], rtol=0.1)
    fig = plot_pr_curves_with_baseline(curves, "t")
    assert fig.axes


def test_prevalence_needs_positive_and_negative_chips() -> None:
    from workbench.functional import MetricInputError

    _, _, is_positive = prevalence_chips(n_pos=3, n_neg=0)
    with pytest.raises(MetricInputError, match="negative"):
        prevalence_table(np.ones((3, 10)), np.ones((3, 10)), is_positive)


# --------------------------------------------------------------------------- objects


def test_object_table_counts_matched_and_missed_objects_by_size() -> None:
    labels = np.zeros((1, 20, 20), np.uint8)
    labels[0, 2:6, 2:6] = 1  # 16-pixel lake, found exactly
    labels[0, 12:14, 12:14] = 1  # 4-pixel pond, missed
    logits = np.full((1, 20, 20), -5.0, np.float32)
    logits[0, 2:6, 2:6] = 5.0
    logits[0, 15:18, 2:5] = 5.0  # 9-pixel false detection
    evaluation = evaluate_predictions(
        chips_from_arrays(logits, labels), catalog_for(1), Calibration(temperature=1.0, threshold=0.5)
    )
    assert evaluation.objects is not None
    table = object_table(evaluation.objects)
    overall = table[table["size_bin"] == "all"]
    assert overall["iou_threshold"].tolist() == [0.5, 0.3, 0.1]
    assert (overall["precision"] == 0.5).all() and (overall["recall"] == 0.5).all() and (overall["f1"] == 0.5).all()
    small = table[(table["size_bin"] == "[0, 10)") & (table["iou_threshold"] == 0.5)].iloc[0]
    medium = table[(table["size_bin"] == "[10, 100)") & (table["iou_threshold"] == 0.5)].iloc[0]
    assert (small["n_gt"], small["tp_gt"], small["n_pred"], small["tp_pred"]) == (1, 0, 1, 0)
    assert (medium["n_gt"], medium["tp_gt"], medium["n_pred"], medium["tp_pred"]) == (1, 1, 1, 1)
    assert object_metrics(table)["test.object_f1_0.3"] == 0.5


# --------------------------------------------------------------------------- test-time augmentation


class FirstChannel(nn.Module):
    """Pointwise: commutes with every flip and rotation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * 3.0


class ColumnRamp(nn.Module):
    """Logit grows from left to right whatever the input: odd under a horizontal flip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        ramp = 10.0 * (torch.arange(width, dtype=torch.float32) - (width - 1) / 2)
        return ramp.expand(x.shape[0], 1, x.shape[-2], width).clone()


def tta_dataset(n: int = 5, size: int = 8) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(7)
    items = []
    for _ in range(n):
        image = torch.from_numpy(rng.normal(size=(2, size, size)).astype(np.float32))
        label = torch.zeros(size, size, dtype=torch.int64)
        label[:, size // 2 :] = 1  # right half is lake
        items.append({"image": image, "label": label, "valid": torch.ones(size, size, dtype=torch.bool)})
    return items


def test_tta_comparison_is_equal_across_modes_for_an_equivariant_model() -> None:
    table = tta_comparison(FirstChannel(), tta_dataset(), batch_size=2)  # type: ignore[arg-type]
    assert table["mode"].tolist() == ["none", "minimal", "standard", "full"]
    assert table["passes"].tolist() == [1, 2, 4, 8]
    np.testing.assert_allclose(table["iou"], table["iou"].iloc[0])
    assert (table["seconds"] > 0).all() and (table["n_chips"] == 5).all()


def test_tta_comparison_against_hand_values_for_a_ramp_model() -> None:
    # none: lake exactly where the ramp is positive (IoU 1); every other mode averages the ramp
    # with its mirror images to 0, i.e. probability 0.5 >= threshold everywhere (IoU = lake share 0.5)
    table = tta_comparison(ColumnRamp(), tta_dataset(), threshold=0.5, max_chips=3)  # type: ignore[arg-type]
    assert table["iou"].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5])
    assert table["recall"].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert (table["n_chips"] == 3).all()
    with pytest.raises(ReportInputError, match="unknown TTA"):
        tta_comparison(ColumnRamp(), tta_dataset(), modes=["none", "d8"])  # type: ignore[arg-type]

"""Temperature scaling, calibration error, threshold choice and the calibration file."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss

from workbench.evaluate.calibration import (
    Calibration,
    CalibrationError,
    apply_temperature,
    brier,
    choose_threshold,
    choose_thresholds_by_group,
    ece,
    fit_temperature,
    mce,
    reliability_table,
)
from workbench.evaluate.metrics import ThresholdHistogram
from workbench.figures import plot_pr_curves, plot_reliability
from workbench.run import CALIBRATION_FILE


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("t_true", [2.0, 0.5])
def test_fit_temperature_recovers_the_scaling_of_logits(t_true: float) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, size=200_000)
    labels = (rng.random(z.size) < _sigmoid(z)).astype(np.int64)
    logits = t_true * z
    # ignored and nodata pixels carry misleading logits that must not count
    labels[:1000] = 255
    logits[:1000] = 50.0
    valid = np.ones(z.size, dtype=bool)
    valid[1000:2000] = False
    logits[1000:2000] = -50.0
    t_fit = fit_temperature(torch.from_numpy(logits).float(), labels, valid=valid)
    assert t_fit == pytest.approx(t_true, rel=0.03)


def test_fit_temperature_is_exact_for_soft_targets() -> None:
    # the cross-entropy against soft targets y = sigmoid(z) is minimal where sigmoid(logit / T) = y
    z = np.linspace(-4, 4, 2001)
    assert fit_temperature(1.7 * z, _sigmoid(z)) == pytest.approx(1.7, rel=1e-4)


def test_fit_temperature_weights_count_as_repetitions() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, 300)
    labels = rng.integers(0, 2, 300)
    weights = rng.integers(1, 4, 300)
    repeated = fit_temperature(np.repeat(logits, weights), np.repeat(labels, weights))
    assert fit_temperature(logits, labels, weights=weights.astype(float)) == pytest.approx(repeated, rel=1e-5)


def test_fit_temperature_rejects_empty_and_mismatched_input() -> None:
    with pytest.raises(CalibrationError, match="no valid"):
        fit_temperature(np.zeros(4), np.full(4, 255))
    with pytest.raises(CalibrationError, match="label has 3"):
        fit_temperature(np.zeros(4), np.zeros(3, dtype=np.int64))
    with pytest.raises(CalibrationError, match="temperature"):
        apply_temperature(np.zeros(3), 0.0)


# --------------------------------------------------------------------------- calibration error


def _reference_ece(prob: np.ndarray, label: np.ndarray, bins: int) -> tuple[float, float]:
    """Direct equal-width ECE and MCE with an explicit loop over bins."""
    edges = np.linspace(0, 1, bins + 1)
    total, worst = 0.0, 0.0
    for b in range(bins):
        upper_ok = prob <= edges[b + 1] if b == bins - 1 else prob < edges[b + 1]
        in_bin = (prob >= edges[b]) & upper_ok
        if in_bin.any():
            gap = abs(prob[in_bin].mean() - label[in_bin].mean())
            total += in_bin.sum() / prob.size * gap
            worst = max(worst, gap)
    return total, worst


def _miscalibrated(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    true_p = rng.random(n)
    label = (rng.random(n) < true_p).astype(np.int64)
    return true_p**2, label  # under-confident about positives


def test_ece_and_mce_match_a_direct_implementation() -> None:
    rng = np.random.default_rng(2)
    prob, label = _miscalibrated(rng, 20_000)
    prob[:10] = 1.0  # the top edge belongs to the last bin
    expected_ece, expected_mce = _reference_ece(prob, label, 15)
    assert ece(prob, label, bins=15) == pytest.approx(expected_ece, rel=1e-10)
    assert mce(prob, label, bins=15) == pytest.approx(expected_mce, rel=1e-10)


def test_calibrated_probabilities_have_small_ece() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(200_000)
    label = (rng.random(p.size) < p).astype(np.int64)
    assert ece(p, label) < 0.01
    assert ece(p**2, label) > 0.1


def test_equal_mass_bins_have_equal_counts() -> None:
    rng = np.random.default_rng(4)
    prob = rng.beta(0.3, 5.0, 15_000)  # most mass near zero, as at low prevalence
    label = (rng.random(prob.size) < prob).astype(np.int64)
    table = reliability_table(prob, label, bins=15, strategy="quantile")
    assert (table["count"] == 1000).all()
    assert (table["lower"].to_numpy()[1:] >= table["upper"].to_numpy()[:-1]).all()
    uniform = reliability_table(prob, label, bins=15)
    assert uniform["count"].sum() == prob.size and uniform["count"].iloc[0] > 5000
    # equal-mass ECE equals the direct formula over those bins
    order = np.argsort(prob, kind="stable")
    gaps = [abs(prob[i].mean() - label[i].mean()) for i in np.array_split(order, 15)]
    assert ece(prob, label, strategy="quantile") == pytest.approx(np.mean(gaps))


def test_brier_matches_sklearn_and_ignores_unlabelled_pixels() -> None:
    rng = np.random.default_rng(5)
    prob = rng.random((2, 30, 30))
    label = (rng.random(prob.shape) < prob).astype(np.uint8)
    valid = rng.random(prob.shape) > 0.2
    label[:, :3] = 255
    keep = valid & (label != 255)
    assert brier(prob, label, valid) == pytest.approx(brier_score_loss(label[keep], prob[keep]))
    table = reliability_table(prob, label, valid=valid)
    assert table["count"].sum() == keep.sum()


def test_calibration_error_rejects_non_probabilities() -> None:
    with pytest.raises(CalibrationError, match=r"\[0, 1\]"):
        ece(np.array([0.2, 1.4]), np.array([0, 1]))
    with pytest.raises(CalibrationError, match="strategy"):
        ece(np.array([0.2, 0.4]), np.array([0, 1]), strategy="kmeans")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- thresholds


def _histogram(rng: np.random.Generator, n: int = 40_000, shift: float = 0.0) -> tuple[ThresholdHistogram, np.ndarray]:
    bins = 1000
    score = (rng.integers(0, bins, n) + 0.5) / bins
    label = (rng.random(n) < np.clip(score + shift, 0, 1) ** 3).astype(np.uint8)
    hist = ThresholdHistogram(bins=bins).update(score.reshape(1, 1, -1), label.reshape(1, 1, -1))
    return hist, np.stack([score, label])


def _direct(data: np.ndarray, t: float) -> dict[str, float]:
    score, label = data[0], data[1] == 1
    pred = score >= t
    tp, fp, fn = np.sum(pred & label), np.sum(pred & ~label), np.sum(~pred & label)
    return {
        "iou": tp / (tp + fp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "precision": tp / (tp + fp) if tp + fp else math.nan,
    }


def test_best_iou_and_best_f1_are_the_direct_maxima() -> None:
    rng = np.random.default_rng(6)
    hist, data = _histogram(rng)
    grid = np.linspace(0.01, 0.99, 99)
    for rule, metric in (("best_iou", "iou"), ("best_f1", "f1")):
        values = [_direct(data, t)[metric] for t in grid]
        choice = choose_threshold(hist, rule=rule)  # type: ignore[arg-type]
        assert choice["threshold"] == pytest.approx(grid[int(np.argmax(values))])
        assert choice[metric] == pytest.approx(max(values))
        assert choice["reached"] and choice["rule"] == rule


def test_target_precision_takes_the_lowest_threshold_reaching_it() -> None:
    rng = np.random.default_rng(7)
    hist, data = _histogram(rng)
    grid = np.linspace(0.01, 0.99, 99)
    precision = np.array([_direct(data, t)["precision"] for t in grid])
    expected = grid[np.flatnonzero(precision >= 0.6)[0]]
    choice = choose_threshold(hist, rule="target_precision", target_precision=0.6)
    assert choice["threshold"] == pytest.approx(expected)
    assert choice["precision"] >= 0.6 and choice["reached"]
    assert _direct(data, expected - 0.01)["precision"] < 0.6
    unreachable = choose_threshold(hist, rule="target_precision", target_precision=0.999)
    assert not unreachable["reached"]
    assert unreachable["precision"] == pytest.approx(np.nanmax(precision))


def test_fixed_rule_and_unknown_rule() -> None:
    hist, data = _histogram(np.random.default_rng(8))
    choice = choose_threshold(hist, rule="fixed", fixed_threshold=0.3)
    assert choice["threshold"] == 0.3 and choice["iou"] == pytest.approx(_direct(data, 0.3)["iou"])
    with pytest.raises(CalibrationError, match="unknown threshold rule"):
        choose_threshold(hist, rule="median")  # type: ignore[arg-type]


def test_thresholds_by_group_are_chosen_per_group() -> None:
    rng = np.random.default_rng(9)
    north, _ = _histogram(rng, shift=0.0)
    south, _ = _histogram(rng, shift=0.3)
    chosen = choose_thresholds_by_group({"north": north, "south": south}, rule="target_precision", target_precision=0.7)
    assert chosen["north"] == choose_threshold(north, rule="target_precision", target_precision=0.7)
    assert chosen["south"]["threshold"] < chosen["north"]["threshold"]  # positives more frequent in the south


# --------------------------------------------------------------------------- record and figures


def test_calibration_round_trips_through_json(tmp_path) -> None:
    record = Calibration(
        temperature=1.8,
        threshold=0.42,
        rule="target_precision",
        target_precision=0.8,
        per_region={"yukon": 0.5},
        ece_before=0.12,
        ece_after=0.02,
        brier_before=0.05,
    )
    path = record.save(tmp_path)
    assert path == tmp_path / CALIBRATION_FILE
    assert json.loads(path.read_text().replace("NaN", "null"))["temperature"] == 1.8
    loaded = Calibration.load(tmp_path)
    assert loaded.per_region == {"yukon": 0.5} and loaded.threshold_for("yukon") == 0.5
    assert loaded.threshold_for("alaska") == 0.42
    assert math.isnan(loaded.brier_after)
    assert loaded.probabilities(np.array([1.8]))[0] == pytest.approx(_sigmoid(np.array([1.0]))[0])


def test_calibration_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"calibration\.json"):
        Calibration.load(tmp_path)
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"temperature": 1.0, "treshold": 0.5}))
    with pytest.raises(CalibrationError, match=r"calibration.json.*treshold"):
        Calibration.load(bad)
    bad.write_text(json.dumps({"temperature": -1.0, "threshold": 0.5}))
    with pytest.raises(CalibrationError, match="temperature must be > 0"):
        Calibration.load(bad)


def test_plots_draw_one_line_per_input() -> None:
    rng = np.random.default_rng(10)
    prob, label = _miscalibrated(rng, 5000)
    tables = {"before": reliability_table(prob, label), "after": reliability_table(np.sqrt(prob), label)}
    fig = plot_reliability(tables)
    assert len(fig.axes[0].lines) == 3  # diagonal plus two curves
    plt.close(fig)
    hist, _ = _histogram(rng)
    precision, recall, _ = hist.pr_curve()
    fig = plot_pr_curves({"val": (precision, recall), "test": (precision, recall)})
    assert len(fig.axes[0].lines) == 2
    plt.close(fig)
    _, ax = plt.subplots()
    assert plot_reliability(tables, ax=ax) is ax.figure
    plt.close(ax.figure)

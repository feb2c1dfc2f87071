"""Across-seed summaries: mean, std, IQM and its bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.evaluate.summary import (
    SummaryInputError,
    bootstrap_iqm_ci,
    format_mean_std,
    format_summary,
    iqm,
    seed_summary,
)


def test_iqm_of_a_known_array_by_hand() -> None:
    # sorted: 1 2 | 3 4 5 6 | 10 100 -> the middle half is 3, 4, 5, 6
    assert iqm([10, 1, 2, 3, 100, 4, 5, 6]) == pytest.approx(4.5)
    # with three seeds floor(3 / 4) = 0 values are cut: the plain mean
    assert iqm([0.70, 0.72, 0.80]) == pytest.approx(0.74)


def test_seed_summary_mean_and_std_match_numpy() -> None:
    runs = [{"iou": 0.71, "f1": 0.80}, {"iou": 0.74, "f1": 0.83}, {"iou": 0.72, "f1": 0.79}, {"iou": 0.69}]
    table = seed_summary(runs)
    iou = np.array([0.71, 0.74, 0.72, 0.69])
    assert table.loc["iou", "mean"] == pytest.approx(iou.mean())
    assert table.loc["iou", "std"] == pytest.approx(iou.std(ddof=1))
    assert table.loc["iou", "n"] == 4
    assert table.loc["f1", "n"] == 3  # missing in the last run
    assert table.loc["f1", "std"] == pytest.approx(np.std([0.80, 0.83, 0.79], ddof=1))
    assert table.loc["iou", "iqm"] == pytest.approx((0.71 + 0.72) / 2)
    assert list(table.index) == ["iou", "f1"]


def test_bootstrap_interval_brackets_the_iqm_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(0.7, 0.02, 10)
    low, high = bootstrap_iqm_ci(values, seed=3)
    assert low < iqm(values) < high
    assert (low, high) == bootstrap_iqm_ci(values, seed=3)
    assert bootstrap_iqm_ci(values, seed=4) != (low, high)
    # the interval lies inside the range of the data and narrows as confidence falls
    assert values.min() <= low and high <= values.max()
    narrow = bootstrap_iqm_ci(values, confidence=0.5, seed=3)
    assert low <= narrow[0] and narrow[1] <= high
    assert bootstrap_iqm_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_single_run_and_empty_input() -> None:
    table = seed_summary([{"iou": 0.7}])
    assert table.loc["iou", "n"] == 1 and np.isnan(table["std"].to_numpy()[0])
    with pytest.raises(SummaryInputError, match="empty"):
        seed_summary([])
    nan_run = seed_summary([{"iou": 0.7}, {"iou": float("nan")}, {"iou": 0.8}])
    assert nan_run.loc["iou", "n"] == 2 and nan_run.loc["iou", "mean"] == pytest.approx(0.75)


def test_formatting() -> None:
    assert format_mean_std(0.72345, 0.0121) == "0.723 ± 0.012"
    assert format_mean_std(0.5, float("nan")) == "0.500 ± n/a"
    assert format_mean_std(12.3456, 0.5, digits=1) == "12.3 ± 0.5"
    table = seed_summary([{"iou": 0.70}, {"iou": 0.72}])
    assert format_summary(table)["iou"] == f"0.710 ± {np.std([0.70, 0.72], ddof=1):.3f}"

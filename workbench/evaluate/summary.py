"""Summaries across training seeds: mean ± std and a bootstrapped interquartile mean.

The interquartile mean (IQM) is the mean of the middle 50 % of the values, i.e.
``scipy.stats.trim_mean(values, 0.25)``: floor(n / 4) values are cut from each end (so with
fewer than four seeds it is the plain mean). Its 95 % confidence interval is the percentile
interval of the IQM over bootstrap resamples of the seeds (as in rliable), from a seeded RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import trim_mean


class SummaryInputError(ValueError):
    """The per-seed metrics cannot be summarised."""


def iqm(values: Sequence[float] | np.ndarray, axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: the mean after cutting floor(n / 4) values from each end."""
    return trim_mean(np.asarray(values, dtype=np.float64), 0.25, axis=axis)


def bootstrap_iqm_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the IQM, resampling the values with replacement."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise SummaryInputError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    samples = data[rng.integers(0, data.size, size=(n_boot, data.size))]
    estimates = iqm(samples, axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def seed_summary(
    metrics_per_seed: Sequence[Mapping[str, float]], n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """One row per metric: mean, std (ddof=1), n, iqm, iqm_low, iqm_high.

    Each element of `metrics_per_seed` is one run's metrics. A metric missing or NaN in a run is
    left out for that run only (n counts the runs that have it); std is NaN with fewer than two.
    """
    if not metrics_per_seed:
        raise SummaryInputError("no runs to summarise: metrics_per_seed is empty")
    names: list[str] = []
    for run in metrics_per_seed:
        names.extend(k for k in run if k not in names)
    rows = []
    for name in names:
        values = np.array([float(run[name]) for run in metrics_per_seed if name in run], dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = bootstrap_iqm_ci(values, n_boot, confidence, seed)
        rows.append(
            {
                "metric": name,
                "mean": float(values.mean()) if values.size else float("nan"),
                "std": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                "n": int(values.size),
                "iqm": float(iqm(values)) if values.size else float("nan"),
                "iqm_low": low,
                "iqm_high": high,
            }
        )
    return pd.DataFrame(rows).set_index("metric")


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """'0.723 ± 0.012'; a missing std (single run) is shown as 'n/a'."""
    spread = f"{std:.{digits}f}" if std is not None and math.isfinite(std) else "n/a"
    return f"{mean:.{digits}f} ± {spread}"


def format_summary(summary: pd.DataFrame, digits: int = 3) -> pd.Series:
    """'mean ± std' strings for each metric of a `seed_summary` table."""
    return pd.Series(
        [format_mean_std(m, s, digits) for m, s in zip(summary["mean"], summary["std"])],
        index=summary.index,
        name="mean ± std",
    )

"""Calibration and ranking figures: reliability diagrams and precision-recall curves.

These draw on `matplotlib.figure.Figure` objects (never registered with pyplot, so a notebook shows each
figure once, where it is displayed) or on axes handed in, from the tables of
`workbench.evaluate.calibration.reliability_table` and the curves of `workbench.evaluate.scoring.pr_curve_record`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike


def plot_reliability(tables: Mapping[str, pd.DataFrame], ax: Axes | None = None) -> Figure:
    """Reliability diagram: observed frequency against mean probability per bin, one line per table."""
    if ax is None:
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
    else:
        fig = ax.figure  # type: ignore[assignment]
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for name, table in tables.items():
        filled = table[table["count"] > 0]
        ax.plot(filled["confidence"], filled["frequency"], marker="o", markersize=3, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive frequency")
    ax.set_title("Reliability")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_pr_curves(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], ax: Axes | None = None) -> Figure:
    """Precision-recall curves; `curves` maps a name to (precision, recall)."""
    if ax is None:
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
    else:
        fig = ax.figure  # type: ignore[assignment]
    for name, (precision, recall) in curves.items():
        ax.step(np.asarray(recall), np.asarray(precision), where="post", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_reliability_grid(tables: Mapping[str, Mapping[str, pd.DataFrame]]) -> Figure:
    """Reliability diagrams: one row per split, equal-width and equal-mass bins side by side, before/after."""
    fig = Figure(figsize=(9, 4.3 * len(tables)))
    axes = fig.subplots(len(tables), 2, squeeze=False)
    for row, (split, split_tables) in enumerate(tables.items()):
        for col, (strategy, title) in enumerate((("uniform", "equal-width bins"), ("quantile", "equal-mass bins"))):
            ax = axes[row, col]
            pair = {
                "before (T = 1)": split_tables[f"{strategy}/before"],
                "after": split_tables[f"{strategy}/after"],
            }
            plot_reliability(pair, ax=ax)
            ax.set_title(f"{split}: {title}")
    fig.tight_layout()
    return fig


def plot_pr_curves_with_baseline(
    curves: Mapping[str, Mapping[str, Any]], title: str, log_precision: bool = False
) -> Figure:
    """PR curves (from `pr_curve_record`) with each curve's no-skill line (precision = prevalence) dashed.

    `log_precision` puts precision on a log axis, which keeps curves at prevalences of 1e-3 visible.
    """
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for name, curve in curves.items():
        (line,) = ax.step(curve["recall"], curve["precision"], where="post", label=f"{name} (AP {curve['pr_auc']:.3g})")
        ax.axhline(curve["prevalence"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.plot([], [], color="0.4", linestyle="--", linewidth=0.8, label="no skill (= prevalence)")
    ax.set_xlim(0, 1)
    if log_precision:
        floor = min((c["prevalence"] for c in curves.values() if c["prevalence"] > 0), default=1e-4)
        ax.set_yscale("log")
        ax.set_ylim(floor / 3, 1.05)
    else:
        ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def plot_per_chip_distribution(
    values: Mapping[str, ArrayLike], column: str = "iou", marked: ArrayLike | None = None, bins: int = 20
) -> Figure:
    """Histogram of a per-chip score (e.g. IoU) for one or more tables; `marked` values (the worst chips
    shown elsewhere) are drawn as ticks under the axis, NaN (no positive pixel anywhere) left out."""
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, raw in values.items():
        data = np.asarray(raw, dtype=np.float64)
        data = data[np.isfinite(data)]
        median = float(np.median(data)) if data.size else float("nan")
        ax.hist(
            data, bins=list(edges), histtype="step", linewidth=1.5, label=f"{name} (n={data.size}, median {median:.3f})"
        )
    if marked is not None:
        ticks = np.asarray(marked, dtype=np.float64)
        ticks = ticks[np.isfinite(ticks)]
        ax.plot(ticks, np.zeros_like(ticks), "|", color="crimson", markersize=14, label="worst chips shown")
    shown = "IoU" if column == "iou" else column
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"per-chip {shown}")
    ax.set_ylabel("chips")
    ax.set_title(f"Per-chip {shown} distribution")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig

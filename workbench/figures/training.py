"""Training figures: loss and IoU curves per epoch, and the gallery of validation predictions (and its chips)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from workbench.arrays import IGNORE_INDEX
from workbench.figures.base import FigureInputError, rgb_composite
from workbench.train.log import epoch_table


def _curve_columns(columns: Sequence[str], word: str) -> list[str]:
    return [column for column in columns if word in column.lower() and not column.endswith("_step")]


def training_curves(metrics_csv_path: str | Path) -> Figure:
    """Loss and IoU per epoch from a Lightning CSVLogger `metrics.csv`, one value per epoch as `epoch_table` reads it.

    Columns whose name holds "loss" or "iou" are drawn, except Lightning's per-step ``*_step`` columns.
    """
    per_epoch = epoch_table(metrics_csv_path)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_iou = fig.subplots(1, 2)
    for ax, word, name in ((ax_loss, "loss", "Loss"), (ax_iou, "iou", "IoU")):
        columns = _curve_columns(list(per_epoch.columns), word)
        for column in columns:
            series = per_epoch[column].dropna()
            ax.plot(series.index.to_numpy(), series.to_numpy(dtype=float), marker="o", ms=3, label=column)
        if columns:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.set_title(f"{name} per epoch")
    return fig


def pick_gallery_chips(per_chip: pd.DataFrame, n: int = 6) -> list[int]:
    """Store indices of up to `n` chips to show: labelled chips spread from worst to best IoU, then false alarms.

    `per_chip` is the per-chip table of a split (store_index, label_pixels, predicted_pixels, iou).
    """
    if per_chip.empty or n < 1:
        return []
    labelled = per_chip[per_chip["label_pixels"] > 0].sort_values("iou", na_position="first")
    n_labelled = min(len(labelled), max(n - n // 3, 1))
    spread: list[int] = []
    if n_labelled:
        spread = np.unique(np.linspace(0, len(labelled) - 1, n_labelled).round().astype(int)).tolist()
    chosen = [int(v) for v in labelled.iloc[spread]["store_index"]]
    empty = per_chip[per_chip["label_pixels"] == 0].sort_values("predicted_pixels", ascending=False)
    chosen += [int(v) for v in empty["store_index"].head(n - len(chosen))]
    rest = per_chip[~per_chip["store_index"].isin(chosen)]
    chosen += [int(v) for v in rest["store_index"].head(n - len(chosen))]
    return chosen


def prediction_gallery(
    chips: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    band_names: Sequence[str],
    rgb: tuple[str, str, str],
    threshold: float = 0.5,
) -> Figure:
    """One row per chip: RGB | label | predicted probability (with the `threshold` contour).

    Each chip is (title, raw image (C, H, W), label (H, W), valid (H, W), probability (H, W)).
    """
    if not chips:
        raise FigureInputError("no chips to show in the prediction gallery")
    fig = Figure(figsize=(9, 3 * len(chips)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(chips), 3))
    for row, (title, image, label, valid, prob) in zip(axes, chips, strict=True):
        valid = np.asarray(valid, dtype=bool)
        row[0].imshow(rgb_composite(image, band_names, rgb, valid=valid), interpolation="nearest")
        row[0].set_title(f"{title}\nRGB ({'/'.join(rgb)})", fontsize=8)
        shown = np.where(label == IGNORE_INDEX, 0.5, (label > 0).astype(float))
        row[1].imshow(np.where(valid, shown, np.nan), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        row[1].set_title(f"label: {float((label[valid] > 0).mean()) if valid.any() else 0.0:.1%} positive", fontsize=8)
        image_prob = row[2].imshow(np.where(valid, prob, np.nan), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        if (prob >= threshold).any() and (prob < threshold).any():
            row[2].contour(prob, levels=[threshold], colors="cyan", linewidths=0.8)
        row[2].set_title(f"prediction probability (contour {threshold:g})", fontsize=8)
        fig.colorbar(image_prob, ax=row[2], fraction=0.046)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig

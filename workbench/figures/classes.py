"""Multiclass figures: the confusion matrix, per-class reliability diagrams and the class-coloured four-panel.

Classes are given as parallel lists of names and colours ("#rrggbb", `workbench.params.resolve_classes`),
so the label and the prediction of every figure use the same colour for the same class, with a legend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from workbench.arrays import IGNORE_INDEX
from workbench.figures.base import IGNORE_GREY, INVALID_GREY, FigureInputError, chip_planes, rgb_composite


def _check_classes(names: Sequence[str], colors: Sequence[str]) -> None:
    if len(names) != len(colors) or not names:
        raise FigureInputError(f"{len(names)} class names but {len(colors)} colours; give one colour per class")


def class_rgb(label: np.ndarray, colors: Sequence[str], valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) image of a class map in the class colours; ignore pixels light grey, invalid pixels grey.

    A value that is neither a class nor `IGNORE_INDEX` is an error naming the value.
    """
    label = np.asarray(label)
    palette = np.array([to_rgb(color) for color in colors])
    known = (label < len(colors)) | (label == IGNORE_INDEX)
    if not known.all():
        bad = sorted({int(v) for v in np.unique(label[~known])})
        raise FigureInputError(f"class map holds values {bad} outside 0..{len(colors) - 1} and {IGNORE_INDEX}")
    out = np.empty((*label.shape, 3))
    out[:] = to_rgb(IGNORE_GREY)
    labelled = label != IGNORE_INDEX
    out[labelled] = palette[label[labelled].astype(np.int64)]
    if valid is not None:
        out[~np.asarray(valid, dtype=bool)] = to_rgb(INVALID_GREY)
    return out


def class_legend_handles(names: Sequence[str], colors: Sequence[str], extras: bool = True) -> list[Patch]:
    """Legend patches, one per class in its colour (and ignore / nodata when `extras`)."""
    _check_classes(names, colors)
    handles = [
        Patch(facecolor=color, edgecolor="0.3", label=f"{k} {name}")
        for k, (name, color) in enumerate(zip(names, colors))
    ]
    if extras:
        handles += [
            Patch(facecolor=IGNORE_GREY, edgecolor="0.3", label="no label"),
            Patch(facecolor=INVALID_GREY, edgecolor="0.3", label="nodata"),
        ]
    return handles


def class_legend(names: Sequence[str], colors: Sequence[str]) -> Figure:
    """A small figure holding only the class legend (notebook 01 shows it before any map)."""
    fig = Figure(figsize=(2.2 + 0.1 * max(len(n) for n in names), 0.35 * (len(names) + 2) + 0.3))
    fig.legend(handles=class_legend_handles(names, colors), loc="center", frameon=False, title="classes")
    return fig


def _matrix_axes(ax: Axes, matrix: np.ndarray, texts: list[str], names: Sequence[str], title: str, vmax: float) -> None:
    shown = np.nan_to_num(matrix, nan=0.0)
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax if vmax > 0 else 1)
    size = len(names)
    for row in range(size):
        for col in range(size):
            dark = shown[row, col] > 0.6 * vmax
            ax.text(
                col,
                row,
                texts[row * size + col],
                ha="center",
                va="center",
                color="white" if dark else "black",
                fontsize="small",
            )
    ax.set_xticks(range(size), list(names), rotation=45, ha="right")
    ax.set_yticks(range(size), list(names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("label class")
    ax.set_title(title)


def confusion_figure(counts: Any, names: Sequence[str], title: str = "") -> Figure:
    """The confusion matrix of pixel counts (rows: label class, columns: predicted class) and row-normalised.

    The left panel writes each count, the right one each row share (recall on the diagonal); a class with
    no labelled pixel has an empty row, written "–" rather than 0.
    """
    matrix = np.asarray(counts, dtype=np.float64)
    size = len(names)
    if matrix.shape != (size, size):
        raise FigureInputError(
            f"confusion counts have shape {matrix.shape}, expected ({size}, {size}) for {size} classes"
        )
    totals = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, matrix / np.where(totals > 0, totals, 1), np.nan)
    fig = Figure(figsize=(4.2 * 2 + 0.8, 4.0 + 0.15 * size), layout="constrained")
    left, right = fig.subplots(1, 2)
    _matrix_axes(left, matrix, [f"{int(v):,}" for v in matrix.reshape(-1)], names, "pixel counts", float(matrix.max()))
    share_texts = ["–" if math.isnan(v) else f"{v:.2f}" for v in shares.reshape(-1)]
    _matrix_axes(right, shares, share_texts, names, "share of the label class (rows sum to 1)", 1.0)
    if title:
        fig.suptitle(title)
    return fig


def class_reliability_tables(
    probs: Any,
    label: Any,
    names: Sequence[str],
    valid: Any = None,
    bins: int = 15,
    strategy: str = "uniform",
) -> dict[str, pd.DataFrame]:
    """One-vs-rest reliability table of each class: class k's probability against "the label is k".

    `probs` (N, C, H, W) or (C, H, W) calibrated class probabilities, `label` (N, H, W) or (H, W) class ids
    (`IGNORE_INDEX` = unlabelled). Tables come from `workbench.evaluate.calibration.reliability_table`.
    """
    from workbench.evaluate.calibration import reliability_table

    probs = np.asarray(probs)
    label = np.asarray(label)
    if probs.ndim == label.ndim + 1 and probs.ndim == 3:
        probs, label = probs[None], label[None]
        valid = None if valid is None else np.asarray(valid)[None]
    if probs.ndim != 4 or probs.shape[1] != len(names) or probs.shape[:1] + probs.shape[2:] != label.shape:
        raise FigureInputError(
            f"probabilities {probs.shape} and labels {label.shape} must be (N, C, H, W) and (N, H, W) "
            f"with C = {len(names)} classes"
        )
    tables = {}
    for k, name in enumerate(names):
        target = np.where(label == IGNORE_INDEX, IGNORE_INDEX, label == k).astype(np.uint8)
        tables[name] = reliability_table(probs[:, k], target, bins=bins, strategy=strategy, valid=valid)  # type: ignore[arg-type]
    return tables


def plot_class_reliability(
    tables: Mapping[str, Mapping[str, pd.DataFrame]], colors: Sequence[str], title: str = ""
) -> Figure:
    """Reliability diagrams per class: `tables[class][curve]` (e.g. "before (T = 1)", "after"), one panel each.

    The first curve of a panel is drawn dashed, the last solid in the class colour.
    """
    names = list(tables)
    _check_classes(names, colors)
    columns = min(len(names), 4)
    rows = math.ceil(len(names) / columns)
    fig = Figure(figsize=(3.4 * columns, 3.4 * rows + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).reshape(-1)
    for ax, name, color in zip(axes, names, colors):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
        curves = list(tables[name].items())
        for position, (curve, table) in enumerate(curves):
            filled = table[table["count"] > 0]
            last = position == len(curves) - 1
            ax.plot(
                filled["confidence"],
                filled["frequency"],
                marker="o",
                markersize=3,
                color=color if last else "0.45",
                linestyle="-" if last else ":",
                label=curve,
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.set_xlabel(f"mean p({name})")
        ax.set_ylabel("observed frequency")
        ax.legend(loc="upper left", fontsize="x-small")
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def class_four_panel(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    predicted: np.ndarray | None,
    valid: np.ndarray,
    title: str,
    names: Sequence[str],
    colors: Sequence[str],
    confidence: np.ndarray | None = None,
    rgb: Sequence[str] = ("B04", "B03", "B02"),
) -> Figure:
    """RGB | model confidence | label | prediction of one chip, label and prediction in the class colours.

    `predicted` is the decided class map (`workbench.evaluate.calibration.predict_classes`), `confidence`
    the calibrated probability of the predicted class. Panel titles give the share of each class over
    scored pixels (valid and labelled); the legend names every class, the unlabelled and the nodata grey.
    """
    from workbench.indices import BandNotFoundError, resolve_band

    _check_classes(names, colors)
    image, planes = chip_planes(image, label, valid, predicted=predicted, confidence=confidence)
    label, valid = planes["label"], planes["valid"]
    shape = label.shape
    predicted, confidence = planes.get("predicted"), planes.get("confidence")
    names_list = [str(name) for name in band_names]
    try:
        rgb_names = tuple(resolve_band(names_list, name) for name in rgb)
    except BandNotFoundError as error:
        raise FigureInputError(f"{error}; set data.rgb_bands to bands of this store") from None
    scored = valid & (label != IGNORE_INDEX)

    def shares(classes: np.ndarray) -> str:
        total = int(scored.sum())
        if not total:
            return "no scored pixel"
        parts = [f"{names[k]} {np.count_nonzero(scored & (classes == k)) / total:.0%}" for k in range(len(names))]
        return ", ".join(parts)

    fig = Figure(figsize=(17, 5.2), layout="constrained")
    ax_rgb, ax_conf, ax_label, ax_pred = fig.subplots(1, 4)
    ax_rgb.imshow(rgb_composite(image, names_list, rgb_names, valid=valid), interpolation="nearest")  # type: ignore[arg-type]
    ax_rgb.set_title(f"RGB ({'/'.join(rgb_names)})")
    if confidence is not None:
        shown = np.where(valid, np.nan_to_num(planes["confidence"], nan=0.0), 0.0)
        ax_conf.imshow(shown, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax_conf.set_title("Confidence of the predicted class")
    else:
        ax_conf.imshow(np.zeros(shape), cmap="gray", vmin=0, vmax=1)
        ax_conf.set_title("No model")
    ax_label.imshow(class_rgb(label, colors, valid), interpolation="nearest")
    ax_label.set_title(f"Label: {shares(label)}", fontsize="small")
    if predicted is None:
        ax_pred.imshow(np.ones((*shape, 3)) * to_rgb(IGNORE_GREY))
        ax_pred.set_title("Prediction: none")
    else:
        ax_pred.imshow(class_rgb(planes["predicted"], colors, valid), interpolation="nearest")
        ax_pred.set_title(f"Prediction: {shares(planes['predicted'])}", fontsize="small")
    invalid = np.zeros((*shape, 4))
    invalid[~valid] = to_rgba(INVALID_GREY)
    for ax in (ax_rgb, ax_conf):
        ax.imshow(invalid, interpolation="nearest")
    for ax in (ax_rgb, ax_conf, ax_label, ax_pred):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(handles=class_legend_handles(names, colors), loc="outside lower center", ncol=len(names) + 2)
    fig.suptitle(title)
    return fig

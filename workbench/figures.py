"""Figures for reports and notebooks: label-noise four-panels, band histograms, class balance, split map, curves.

Every function builds a `matplotlib.figure.Figure` directly (no pyplot state, no GUI backend needed), so it
works on headless machines and inside notebooks alike; `save_figure` writes a PNG atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure

from workbench.arrays import IGNORE_INDEX
from workbench.io import write_bytes_atomic

DPI = 110
WATER_BLUE = "#8fd3ff"
INVALID_GREY = "#808080"
IGNORE_GREY = "#c8c8c8"
SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c", "buffer": "#9e9e9e"}
_MASK_CMAP = ListedColormap(["#1b1b1b", WATER_BLUE])


class FigureInputError(ValueError):
    """Arrays or files handed to a figure function do not have the expected shape or content."""


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Render `fig` as PNG and write it atomically to `path` (which must end in .png)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: figures are written as PNG; use a .png file name")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes_atomic(path, buffer.getvalue())


def _band_index(band_names: Sequence[str], name: str) -> int:
    names = list(band_names)
    if name not in names:
        raise FigureInputError(f"band {name!r} is not among the image bands {names}")
    return names.index(name)


def rgb_composite(
    image: np.ndarray,
    band_names: Sequence[str],
    rgb: tuple[str, str, str] = ("B04", "B03", "B02"),
    percentiles: tuple[float, float] = (2.0, 98.0),
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) float image in [0, 1]: each of the three bands stretched between its percentiles over valid pixels.

    Pixels outside `valid` (default: where all three bands are finite) are 0.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != len(band_names):
        raise FigureInputError(f"image has shape {image.shape}, expected ({len(band_names)}, height, width)")
    channels = np.stack([image[_band_index(band_names, name)].astype(np.float64) for name in rgb])
    usable = np.isfinite(channels).all(axis=0)
    if valid is not None:
        usable &= np.asarray(valid, dtype=bool)
    out = np.zeros((*channels.shape[1:], 3), dtype=np.float64)
    if not usable.any():
        return out
    for position, band in enumerate(channels):
        low, high = np.percentile(band[usable], percentiles)
        if high > low:
            out[..., position] = np.clip((band - low) / (high - low), 0.0, 1.0)
    out[~usable] = 0.0
    return out


def _overlay(ax: Axes, where: np.ndarray, colour: str) -> None:
    """Paint `where` pixels in a flat colour on top of what the axes show."""
    layer = np.zeros((*where.shape, 4))
    layer[where] = to_rgba(colour)
    ax.imshow(layer, interpolation="nearest")


def _percent(numerator: np.ndarray, scored: np.ndarray) -> float:
    total = int(np.count_nonzero(scored))
    return int(np.count_nonzero(numerator & scored)) / total if total else 0.0


def chip_title(chip_id: str, region: str, year: int, lat: float, lon: float, score: float | None = None) -> str:
    """Main title of a four-panel: chip id, region, year, coordinates and (optionally) the suspicion score."""
    where = f"{abs(lat):.4f}°{'N' if lat >= 0 else 'S'} {abs(lon):.4f}°{'E' if lon >= 0 else 'W'}"
    parts = [str(chip_id), f"{region} {year}".strip(), where]
    if score is not None and math.isfinite(score):
        parts.append(f"score {score:.3f}")
    return " · ".join(part for part in parts if part)


def four_panel(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    prediction_prob: np.ndarray | None,
    valid: np.ndarray,
    title: str,
    water_threshold: float = 0.0,
    threshold: float = 0.5,
    green: str = "B03",
    swir: str = "B11",
    rgb: tuple[str, str, str] = ("B04", "B03", "B02"),
) -> Figure:
    """Sentinel-2 RGB | MNDWI (water light blue) | label | prediction at `threshold`, for auditing one chip.

    Fractions in the panel titles are over scored pixels (valid and labelled), as in the review table.
    Invalid pixels are grey; unlabelled (ignore) pixels light grey in the label panel.
    """
    from workbench.indices import mndwi

    image = np.asarray(image)
    label = np.asarray(label)
    valid = np.asarray(valid, dtype=bool)
    shape = image.shape[1:]
    planes = {"label": label, "valid": valid}
    if prediction_prob is not None:
        planes["prediction_prob"] = np.asarray(prediction_prob)
    for name, plane in planes.items():
        if plane.shape != shape:
            raise FigureInputError(f"{name} has shape {plane.shape}, expected {shape} like the image")
    index = np.asarray(mndwi(image, list(band_names), green=green, swir=swir), dtype=np.float64)
    scored = valid & (label != IGNORE_INDEX)
    water = scored & (index > water_threshold)
    positive = scored & (label > 0)

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax_rgb, ax_index, ax_label, ax_pred = fig.subplots(1, 4)
    ax_rgb.imshow(rgb_composite(image, band_names, rgb, valid=valid), interpolation="nearest")
    ax_rgb.set_title(f"S2 RGB ({'/'.join(rgb)})")

    ax_index.imshow(np.where(valid, index, 0.0), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    _overlay(ax_index, water, WATER_BLUE)
    ax_index.set_title(f"MNDWI > {water_threshold:g}: water {_percent(water, scored):.1%}")

    ax_label.imshow(positive.astype(np.uint8), cmap=_MASK_CMAP, vmin=0, vmax=1, interpolation="nearest")
    _overlay(ax_label, valid & (label == IGNORE_INDEX), IGNORE_GREY)
    ax_label.set_title(f"Label: {_percent(positive, scored):.1%}")

    if prediction_prob is None:
        ax_pred.imshow(np.zeros(shape), cmap=_MASK_CMAP, vmin=0, vmax=1)
        ax_pred.set_title("Prediction: none")
    else:
        predicted = valid & (np.nan_to_num(planes["prediction_prob"], nan=0.0) >= threshold)
        ax_pred.imshow(predicted.astype(np.uint8), cmap=_MASK_CMAP, vmin=0, vmax=1, interpolation="nearest")
        ax_pred.set_title(f"Prediction ≥ {threshold:g}: {_percent(predicted, scored):.1%}")

    for ax in (ax_rgb, ax_index, ax_label, ax_pred):
        _overlay(ax, ~valid, INVALID_GREY)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return fig


def _coordinate_token(value: float) -> str:
    text = f"{abs(value):.4f}".replace(".", "p")
    negative = value < 0 and round(abs(value), 4) != 0
    return ("m" if negative else "") + text


def four_panel_filename(year: int, lat: float, lon: float) -> str:
    """File name of a four-panel figure: label_noise_<year>_<lat>_<lon>.png, 4 decimals, '.' -> 'p', '-' -> 'm'."""
    return f"label_noise_{int(year)}_{_coordinate_token(lat)}_{_coordinate_token(lon)}.png"


# --------------------------------------------------------------------------- data overview figures


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def band_histograms(
    data: Any,
    band_names: Sequence[str] | None = None,
    valid: np.ndarray | None = None,
    bins: int = 64,
    max_chips: int = 64,
    ncols: int = 4,
) -> Figure:
    """One histogram per band over valid pixels.

    `data` is an opened chip store (xarray Dataset with image/valid and a band coordinate; at most
    `max_chips` chips spread over the store are read) or an array (C, H, W) / (N, C, H, W) with `band_names`
    and an optional `valid` mask (H, W) / (N, H, W).
    """
    if hasattr(data, "data_vars"):
        n_chips = int(data.sizes["chip"])
        picks = np.unique(np.linspace(0, n_chips - 1, num=min(max_chips, n_chips)).round().astype(int))
        image = np.asarray(data["image"].isel(chip=picks).values)
        valid = np.asarray(data["valid"].isel(chip=picks).values, dtype=bool)
        band_names = [str(name) for name in data["band"].values]
    else:
        image = np.asarray(data)
        if image.ndim == 3:
            image = image[None]
            valid = None if valid is None else np.asarray(valid)[None]
        if image.ndim != 4:
            raise FigureInputError(f"image has shape {np.asarray(data).shape}, expected (C, H, W) or (N, C, H, W)")
        if band_names is None:
            band_names = [f"band {i}" for i in range(image.shape[1])]
    if len(band_names) != image.shape[1]:
        raise FigureInputError(f"{len(band_names)} band names for {image.shape[1]} bands")
    mask = np.ones(image.shape[:1] + image.shape[2:], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if mask.shape != image.shape[:1] + image.shape[2:]:
        raise FigureInputError(f"valid has shape {mask.shape}, expected {image.shape[:1] + image.shape[2:]}")
    rows, cols = _grid(len(band_names), ncols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for position, name in enumerate(band_names):
        ax = axes[position]
        values = image[:, position][mask]
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=bins, color="#4c72b0")
        ax.set_title(str(name))
        ax.tick_params(labelsize=7)
    for ax in axes[len(band_names) :]:
        fig.delaxes(ax)
    fig.suptitle("Band values over valid pixels")
    return fig


def _split_order(names: Sequence[str]) -> list[str]:
    known = [name for name in SPLIT_COLOURS if name in names]
    return known + sorted(name for name in set(names) if name not in SPLIT_COLOURS)


def class_balance_bar(
    catalog: pd.DataFrame,
    fraction_column: str = "positive_fraction",
    split_column: str = "split",
    positive_threshold: float = 0.002,
) -> Figure:
    """Chips with and without the positive class per split (stacked bars), with the mean positive pixel share.

    A chip counts as positive when its `fraction_column` is at least `positive_threshold`.
    """
    if fraction_column not in catalog.columns:
        raise FigureInputError(f"catalog has no column {fraction_column!r}; columns: {list(catalog.columns)}")
    splits = catalog[split_column].astype(str) if split_column in catalog.columns else pd.Series("all", catalog.index)
    names = _split_order(list(splits.unique()))
    fraction = catalog[fraction_column].astype(float)
    positives = [int((fraction[splits == name] >= positive_threshold).sum()) for name in names]
    negatives = [int((splits == name).sum()) - n for name, n in zip(names, positives)]
    fig = Figure(figsize=(1.6 * len(names) + 3, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(names, positives, color=WATER_BLUE, label=f"positive (≥ {positive_threshold:g})")
    ax.bar(names, negatives, bottom=positives, color="#bdbdbd", label="negative")
    for position, name in enumerate(names):
        share = float(fraction[splits == name].mean())
        ax.text(position, positives[position] + negatives[position], f"{share:.2%} px", ha="center", va="bottom")
    ax.set_ylabel("chips")
    ax.set_title("Class balance per split")
    ax.legend(loc="upper right")
    return fig


def split_map_static(
    lat: Sequence[float] | np.ndarray,
    lon: Sequence[float] | np.ndarray,
    split: Sequence[str] | np.ndarray,
    title: str = "Chip centres by split",
) -> Figure:
    """Scatter of chip centres coloured by split (a map for reports that cannot load web tiles)."""
    lat_values = np.asarray(lat, dtype=np.float64)
    lon_values = np.asarray(lon, dtype=np.float64)
    split_values = np.asarray(split).astype(str)
    if not (lat_values.shape == lon_values.shape == split_values.shape) or lat_values.ndim != 1:
        raise FigureInputError(
            f"lat, lon and split must be 1-D and equally long, got {lat_values.shape}, {lon_values.shape}, "
            f"{split_values.shape}"
        )
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.subplots()
    extra_colours = iter(["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"])
    for name in _split_order(list(np.unique(split_values))):
        chosen = split_values == name
        colour = SPLIT_COLOURS.get(name) or next(extra_colours, "#7f7f7f")
        ax.scatter(lon_values[chosen], lat_values[chosen], s=12, color=colour, label=f"{name} ({int(chosen.sum())})")
    finite = np.isfinite(lat_values)
    if finite.any():
        ax.set_aspect(1.0 / max(math.cos(math.radians(float(lat_values[finite].mean()))), 0.05))
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return fig


def _per_epoch(metrics: pd.DataFrame) -> pd.DataFrame:
    """Last non-null value of every column per epoch (Lightning CSV rows are sparse)."""
    return metrics.dropna(subset=["epoch"]).groupby("epoch", sort=True).last()


def _curve_columns(columns: Sequence[str], word: str) -> list[str]:
    return [column for column in columns if word in column.lower() and not column.endswith("_step")]


def training_curves(metrics_csv_path: str | Path) -> Figure:
    """Loss and IoU per epoch from a Lightning CSVLogger `metrics.csv` (last non-null value of each epoch)."""
    path = Path(metrics_csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a Lightning CSVLogger metrics.csv")
    metrics = pd.read_csv(path)
    if "epoch" not in metrics.columns:
        raise FigureInputError(f"{path} has no 'epoch' column; columns: {list(metrics.columns)}")
    per_epoch = _per_epoch(metrics)
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

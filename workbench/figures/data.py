"""Data overview figures: band histograms, class balance per split and a static map of chip centres."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from workbench.figures.base import SPLIT_COLOURS, WATER_BLUE, FigureInputError


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

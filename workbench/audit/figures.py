"""Figures of the data audit: band histograms, nodata, positive share and label/water-index agreement.

Each function draws from the tables of `workbench.audit.stats` and returns a matplotlib `Figure` (no
pyplot state), ready for `workbench.stages.base.save_stage_figure` or a notebook.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from workbench.audit.stats import ALL
from workbench.figures import SPLIT_COLOURS, FigureInputError


def band_histogram_figure(
    sample: np.ndarray,
    band_names: Sequence[str],
    band_stats: pd.DataFrame | None = None,
    bins: int = 60,
    ncols: int = 5,
) -> Figure:
    """One histogram per band of a pixel sample (n, C); dashed lines at p1 and p99 when `band_stats` is given."""
    sample = np.asarray(sample, dtype=np.float64)
    if sample.ndim != 2 or sample.shape[1] != len(band_names):
        raise FigureInputError(f"sample has shape {sample.shape}, expected (pixels, {len(band_names)})")
    ncols = max(1, min(ncols, len(band_names)))
    nrows = math.ceil(len(band_names) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 2.3 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    lines: dict[str, list[float]] = {}
    if band_stats is not None:
        for name, low, high in zip(band_stats["band"], band_stats["p1"], band_stats["p99"]):
            lines[str(name)] = [float(low), float(high)]
    for position, name in enumerate(band_names):
        ax = axes[position]
        values = sample[:, position]
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=bins, color="#4c72b0")
        for value in lines.get(str(name), []):
            ax.axvline(value, color="#c44e52", ls="--", lw=0.8)
        ax.set_title(str(name), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    for ax in axes[len(band_names) :]:
        fig.delaxes(ax)
    fig.suptitle(f"Band values over valid pixels (sample of {len(sample):,} pixels; dashed: p1, p99)")
    return fig


def split_colour(name: str, position: int) -> str:
    """Colour of a split: its `SPLIT_COLOURS` entry, else one of five spare colours picked by position."""
    extra = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return SPLIT_COLOURS.get(name) or extra[position % len(extra)]


def _grouped_bars(ax: Axes, table: pd.DataFrame, column: str, group: str = "region", hue: str = "split") -> None:
    """Bars of `column` per `group` (x) and `hue` (colour), from a long table; 'all' rows are left out."""
    data = table[(table[group] != ALL) & (table[hue] != ALL)]
    groups = sorted(data[group].unique())
    hues = [name for name in SPLIT_COLOURS if name in set(data[hue])] + sorted(set(data[hue]) - set(SPLIT_COLOURS))
    width = 0.8 / max(len(hues), 1)
    x = np.arange(len(groups))
    for position, name in enumerate(hues):
        values = data[data[hue] == name].set_index(group)[column].reindex(groups)
        offset = (position - (len(hues) - 1) / 2) * width
        ax.bar(x + offset, values.to_numpy(dtype=float), width, label=name, color=split_colour(name, position))
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
    ax.legend(fontsize=8)


def nodata_figure(chips: pd.DataFrame, by_group: pd.DataFrame) -> Figure:
    """Left: per-chip nodata fraction by split (histogram); right: pooled nodata fraction per region and split."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_hist, ax_bars = fig.subplots(1, 2)
    splits = [name for name in SPLIT_COLOURS if name in set(chips["split"])] + sorted(
        set(chips["split"].astype(str)) - set(SPLIT_COLOURS)
    )
    values = [chips.loc[chips["split"] == name, "nodata_fraction"].to_numpy(dtype=float) for name in splits]
    colours = [split_colour(name, position) for position, name in enumerate(splits)]
    ax_hist.hist(values, bins=np.linspace(0, 1, 21), stacked=True, color=colours, label=splits)
    ax_hist.set_xlabel("nodata fraction of the chip")
    ax_hist.set_ylabel("chips")
    ax_hist.set_title("Nodata per chip")
    ax_hist.legend(fontsize=8)
    _grouped_bars(ax_bars, by_group, "nodata_fraction")
    ax_bars.set_ylabel("nodata fraction (pixels)")
    ax_bars.set_title("Nodata per region and split")
    return fig


def positive_share_figure(by_group: pd.DataFrame) -> Figure:
    """Positive chip share and positive pixel fraction per region and split."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_chips, ax_pixels = fig.subplots(1, 2)
    _grouped_bars(ax_chips, by_group, "positive_chip_share")
    ax_chips.set_ylabel("share of chips with the positive class")
    ax_chips.set_title("Positive chips per region and split")
    _grouped_bars(ax_pixels, by_group, "positive_pixel_fraction")
    ax_pixels.set_ylabel("positive pixel fraction")
    ax_pixels.set_title("Positive pixels per region and split")
    return fig


def agreement_scatter(chips: pd.DataFrame, water_threshold: float = 0.0) -> Figure:
    """Label fraction against MNDWI water fraction per chip, coloured by split; pre-filter drops marked 'x'."""
    needed = ["label_fraction", "water_fraction", "split"]
    missing = [column for column in needed if column not in chips.columns]
    if missing:
        raise FigureInputError(f"chip table has no column(s) {missing}; run the scan with green and SWIR bands")
    fig = Figure(figsize=(6.2, 5.4), layout="constrained")
    ax = fig.subplots()
    keep = chips["prefilter_keep"].astype(bool) if "prefilter_keep" in chips else pd.Series(True, chips.index)
    splits = [name for name in SPLIT_COLOURS if name in set(chips["split"])] + sorted(
        set(chips["split"].astype(str)) - set(SPLIT_COLOURS)
    )
    for position, name in enumerate(splits):
        colour = split_colour(name, position)
        for kept, marker in ((True, "o"), (False, "x")):
            chosen = (chips["split"] == name) & (keep == kept)
            if not chosen.any():
                continue
            ax.scatter(
                chips.loc[chosen, "label_fraction"],
                chips.loc[chosen, "water_fraction"],
                s=16,
                marker=marker,
                color=colour,
                alpha=0.8,
                label=f"{name}{'' if kept else ' (pre-filter drop)'} ({int(chosen.sum())})",
            )
    top = float(max(chips["label_fraction"].max(), chips["water_fraction"].max(), 0.01)) * 1.05
    ax.plot([0, top], [0, top], color="#555555", ls="--", lw=0.8, label="water = label")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("label fraction (of valid, labelled pixels)")
    ax.set_ylabel(f"MNDWI > {water_threshold:g} fraction")
    ax.set_title("Label versus water index per chip")
    ax.legend(fontsize=7, loc="upper left")
    return fig

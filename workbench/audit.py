"""Data audit: what is in a chip store before any model sees it, and whether the training loader feeds it right.

* `BandStatistics` / `scan_store` stream the store chip by chip (bounded memory): per-band statistics over
  valid pixels, and one row per chip with its nodata share, label share and water-index (MNDWI) agreement.
* `nodata_by_group` / `positive_by_group` summarise those rows per split and region.
* `band_histogram_figure`, `nodata_figure`, `positive_share_figure`, `agreement_scatter` draw them.
* `split_map` builds an interactive map of chip centres (folium for HTML reports, leafmap in JupyterLab).
* `composite`, `chip_figure` and `chip_explorer` show single chips in band composites (true colour, SWIR,
  SAR, DEM hillshade, any three bands).
* `check_batches` / `check_data` iterate the real training DataLoader (sampler, augmentation,
  normalisation) and report shapes, dtypes, non-finite values, label values and batch class balance.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from workbench.arrays import IGNORE_INDEX
from workbench.data.normalize import PercentileReservoir, Welford
from workbench.data.store import ChipReader
from workbench.figures import INVALID_GREY, SPLIT_COLOURS, WATER_BLUE, FigureInputError, rgb_composite
from workbench.params import ReviewParams

if TYPE_CHECKING:
    from workbench.data.prepare import PreparedData
    from workbench.params import Params

BAND_STAT_COLUMNS = [
    "band",
    "min",
    "p1",
    "mean",
    "median",
    "p99",
    "max",
    "std",
    "nodata_fraction",
    "zero_fraction",
    "n_valid",
]
AGREEMENT_KEYS = ["water_fraction", "iou_label_water", "water_label_ratio", "prefilter_keep", "prefilter_reason"]
IGNORE_RGB = (0.78, 0.78, 0.78)
BACKGROUND_RGB = (0.11, 0.11, 0.11)
ALL = "all"


class AuditInputError(ValueError):
    """A store, catalog or batch handed to the audit does not have the expected layout."""


def allowed_label_values(num_classes: int) -> set[int]:
    """Label values a store may hold: class ids 0..K-1 (0 and 1 for a binary model) and the ignore index."""
    return set(range(max(int(num_classes), 2))) | {IGNORE_INDEX}


# --------------------------------------------------------------------------- band statistics


class BandStatistics:
    """Streaming per-band statistics over valid pixels: exact min/max/mean/std, percentiles from a sample.

    Mean and std use Welford's update; percentiles come from a uniform reservoir sample of pixels (exact
    while the store holds fewer valid pixels than `capacity`), which also feeds the histograms.
    nodata_fraction is the share of all pixels whose valid mask is False (one mask for all bands).
    """

    def __init__(self, band_names: Sequence[str], capacity: int = 100_000, seed: int = 0) -> None:
        self.band_names = [str(name) for name in band_names]
        n_bands = len(self.band_names)
        self.moments = Welford(n_bands)
        self.reservoir = PercentileReservoir(n_bands, capacity=capacity, seed=seed)
        self.minimum = np.full(n_bands, np.inf)
        self.maximum = np.full(n_bands, -np.inf)
        self.zeros = np.zeros(n_bands, dtype=np.int64)
        self.n_pixels = 0
        self._pending: list[np.ndarray] = []
        self._pending_pixels = 0

    def update(self, image: np.ndarray, valid: np.ndarray) -> BandStatistics:
        """Add one chip: image (C, H, W), valid (H, W) bool."""
        image = np.asarray(image)
        valid = np.asarray(valid, dtype=bool)
        if image.ndim != 3 or image.shape[0] != len(self.band_names) or valid.shape != image.shape[1:]:
            raise AuditInputError(
                f"image {image.shape} / valid {valid.shape} do not match {len(self.band_names)} bands (C, H, W)"
            )
        self.n_pixels += int(valid.size)
        self.moments.update(image, valid)
        pixels = image[:, valid]
        if pixels.shape[1]:
            self.minimum = np.minimum(self.minimum, pixels.min(axis=1))
            self.maximum = np.maximum(self.maximum, pixels.max(axis=1))
            self.zeros += (pixels == 0).sum(axis=1)
            self._pending.append(pixels)
            self._pending_pixels += pixels.shape[1]
            if self._pending_pixels >= 65_536:
                self._flush()
        return self

    def _flush(self) -> None:
        """Offer the buffered pixels to the reservoir at once (fewer, larger merges)."""
        if self._pending:
            pixels = np.concatenate(self._pending, axis=1)
            self.reservoir.update(pixels[:, None, :], np.ones((1, pixels.shape[1]), dtype=bool))
        self._pending, self._pending_pixels = [], 0

    @property
    def sample(self) -> np.ndarray:
        """(n, C) uniform sample of valid pixels (for histograms)."""
        self._flush()
        return self.reservoir.sample

    def table(self) -> pd.DataFrame:
        """One row per band: min, p1, mean, median, p99, max, std, nodata_fraction, zero_fraction, n_valid."""
        self._flush()
        n_valid = self.moments.count
        if n_valid:
            p1, median, p99 = self.reservoir.percentiles([1.0, 50.0, 99.0])
        else:
            p1 = median = p99 = np.full(len(self.band_names), np.nan)
        nodata = 1.0 - n_valid / self.n_pixels if self.n_pixels else math.nan
        table = pd.DataFrame(
            {
                "band": self.band_names,
                "min": np.where(n_valid > 0, self.minimum, np.nan),
                "p1": p1,
                "mean": self.moments.mean,
                "median": median,
                "p99": p99,
                "max": np.where(n_valid > 0, self.maximum, np.nan),
                "std": self.moments.std,
                "nodata_fraction": nodata,
                "zero_fraction": self.zeros / n_valid if n_valid else np.nan,
                "n_valid": n_valid,
            }
        )
        return table[BAND_STAT_COLUMNS]


# --------------------------------------------------------------------------- per-chip summary


def has_bands(band_names: Sequence[str], *names: str) -> bool:
    """Whether every name is among the bands."""
    return all(name in band_names for name in names)


def chip_summary(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    valid: np.ndarray,
    review: ReviewParams | None = None,
    green: str = "B03",
    swir: str = "B11",
    allowed_labels: set[int] | None = None,
) -> dict[str, Any]:
    """Nodata, label and water-index numbers of one chip.

    Keys: n_pixels, n_valid, nodata_fraction, n_scored (valid and labelled), n_positive, label_fraction
    (n_positive / n_scored), unexpected_label_pixels (valid pixels whose label is not in `allowed_labels`)
    and, when `green` and `swir` are bands, the water-index agreement of `workbench.review.chip_agreement`
    (water_fraction, iou_label_water, water_label_ratio, prefilter_keep, prefilter_reason).
    """
    from workbench.review import chip_agreement

    label = np.asarray(label)
    valid = np.asarray(valid, dtype=bool)
    scored = valid & (label != IGNORE_INDEX)
    n_scored = int(scored.sum())
    n_positive = int((scored & (label > 0)).sum())
    allowed = allowed_label_values(1) if allowed_labels is None else allowed_labels
    unexpected = valid & ~np.isin(label, sorted(allowed))
    row: dict[str, Any] = {
        "n_pixels": int(valid.size),
        "n_valid": int(valid.sum()),
        "nodata_fraction": 1.0 - float(valid.mean()) if valid.size else math.nan,
        "n_scored": n_scored,
        "n_positive": n_positive,
        "label_fraction": n_positive / n_scored if n_scored else 0.0,
        "unexpected_label_pixels": int(unexpected.sum()),
    }
    if has_bands(band_names, green, swir):
        agreement = chip_agreement(image, band_names, label, valid, cfg=review, green=green, swir=swir)
        row.update({key: agreement[key] for key in AGREEMENT_KEYS})
    return row


@dataclass
class StoreScan:
    """What one pass over a store produced."""

    band_names: list[str]
    band_stats: pd.DataFrame
    chips: pd.DataFrame  # one row per chip: catalog columns + chip_summary columns
    sample: np.ndarray  # (n, C) uniform sample of valid pixels
    agreement: bool  # whether the water-index columns were computed
    notes: list[str] = field(default_factory=list)


def scan_store(
    store: str | Path,
    catalog: pd.DataFrame,
    band_names: Sequence[str],
    review: ReviewParams | None = None,
    green: str = "B03",
    swir: str = "B11",
    allowed_labels: set[int] | None = None,
    capacity: int = 100_000,
    progress: bool = True,
) -> StoreScan:
    """Read every chip once (one chip in memory at a time) into band statistics and a per-chip table.

    `catalog` lists the store's chips in store order (e.g. the run's catalog with splits); `band_names`
    are all the store's bands in image order. The water-index agreement is skipped, with a note, when the
    store lacks the `green` or `swir` band.
    """
    readers = {name: ChipReader(store, name) for name in ("image", "label", "valid")}
    n_chips = len(readers["image"])
    if len(catalog) != n_chips:
        raise AuditInputError(f"catalog lists {len(catalog)} chips but store {store} holds {n_chips}")
    if readers["image"].shape[1] != len(band_names):
        raise AuditInputError(
            f"{len(band_names)} band names {list(band_names)} for store {store} with {readers['image'].shape[1]} bands"
        )
    agreement = has_bands(band_names, green, swir)
    notes = []
    if not agreement:
        notes.append(
            f"water-index agreement skipped: the store has no {green!r} and {swir!r} bands "
            f"(data.green_band / data.swir_band); its bands are {list(band_names)}"
        )
    stats = BandStatistics(band_names, capacity=capacity)
    rows = []
    records = catalog.reset_index(drop=True).to_dict(orient="records")
    for position in tqdm(range(n_chips), desc="data audit", unit="chip", disable=not progress):
        image = readers["image"].read(position)
        label = readers["label"].read(position)
        valid = readers["valid"].read(position).astype(bool)
        stats.update(image, valid)
        row = dict(records[position])
        row.update(chip_summary(image, band_names, label, valid, review, green, swir, allowed_labels))
        rows.append(row)
    chips = pd.DataFrame(rows)
    return StoreScan(list(band_names), stats.table(), chips, stats.sample, agreement, notes)


# --------------------------------------------------------------------------- split / region tables


def _with_totals(chips: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The chips again under 'all' for each trailing grouping column, so a groupby also yields subtotals."""
    missing = [column for column in by if column not in chips.columns]
    if missing:
        raise AuditInputError(f"chip table has no column(s) {missing}; columns: {list(chips.columns)}")
    parts = [chips]
    for depth in range(len(by) - 1, -1, -1):
        parts.append(chips.assign(**{column: ALL for column in by[depth:]}))
    return pd.concat(parts, ignore_index=True).astype({column: str for column in by})


def nodata_by_group(chips: pd.DataFrame, by: Sequence[str] = ("split", "region")) -> pd.DataFrame:
    """Nodata per group (with 'all' subtotals): chips, pixel nodata fraction, worst chip, chips with nodata.

    nodata_fraction is pooled over pixels (sum invalid / sum pixels); mean_chip_nodata averages chips.
    """
    table = _with_totals(chips, by)
    rows = []
    for key, group in table.groupby(list(by), sort=True):
        n_pixels = float(group["n_pixels"].sum())
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "chips": len(group),
                "nodata_fraction": 1.0 - float(group["n_valid"].sum()) / n_pixels if n_pixels else math.nan,
                "mean_chip_nodata": float(group["nodata_fraction"].mean()),
                "max_chip_nodata": float(group["nodata_fraction"].max()),
                "chips_with_nodata": int((group["nodata_fraction"] > 0).sum()),
                "chips_over_half_nodata": int((group["nodata_fraction"] > 0.5).sum()),
            }
        )
    return pd.DataFrame(rows)


def positive_by_group(
    chips: pd.DataFrame, threshold: float = 0.002, by: Sequence[str] = ("split", "region")
) -> pd.DataFrame:
    """Positive class per group (with 'all' subtotals).

    positive_pixel_fraction = sum of positive pixels / sum of scored pixels (valid and labelled);
    a chip is positive when its label_fraction is at least `threshold` (data.sampler.positive_threshold).
    """
    table = _with_totals(chips, by)
    rows = []
    for key, group in table.groupby(list(by), sort=True):
        n_scored = float(group["n_scored"].sum())
        positive_chips = int((group["label_fraction"] >= threshold).sum())
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "chips": len(group),
                "positive_chips": positive_chips,
                "positive_chip_share": positive_chips / len(group),
                "positive_pixel_fraction": float(group["n_positive"].sum()) / n_scored if n_scored else math.nan,
            }
        )
    return pd.DataFrame(rows)


def prefilter_dropped_fraction(chips: pd.DataFrame) -> float:
    """Share of chips the water-index pre-filter would drop (NaN without agreement columns)."""
    if "prefilter_keep" not in chips.columns or not len(chips):
        return math.nan
    return float((~chips["prefilter_keep"].astype(bool)).mean())


# --------------------------------------------------------------------------- figures


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


def _split_colour(name: str, position: int) -> str:
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
        ax.bar(x + offset, values.to_numpy(dtype=float), width, label=name, color=_split_colour(name, position))
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
    colours = [_split_colour(name, position) for position, name in enumerate(splits)]
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
        colour = _split_colour(name, position)
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


# --------------------------------------------------------------------------- split map


def _map_points(catalog: pd.DataFrame) -> pd.DataFrame:
    missing = [column for column in ("lat", "lon", "split") if column not in catalog.columns]
    if missing:
        raise AuditInputError(f"catalog has no column(s) {missing}; a map needs lat, lon and split")
    points = catalog[np.isfinite(catalog["lat"].astype(float)) & np.isfinite(catalog["lon"].astype(float))]
    if not len(points):
        raise AuditInputError("no chip has finite lat/lon; cannot draw a map")
    return points


def _tooltip(row: Mapping[Any, Any]) -> str:
    parts = [str(row.get("chip_id", "")), str(row.get("split", ""))]
    if "region" in row:
        parts.append(f"{row['region']} {row.get('year', '')}".strip())
    if "positive_fraction" in row:
        parts.append(f"positive {float(row['positive_fraction']):.2%}")
    return " · ".join(part for part in parts if part)


def split_map(catalog: pd.DataFrame, backend: str = "folium", basemap: bool = True) -> Any:
    """Interactive map of chip centres coloured by split, one toggleable layer per split.

    backend "folium" returns a `folium.Map` (static HTML, no kernel needed: `save_map_html`);
    "leafmap" returns a `leafmap.Map` (ipyleaflet widget for JupyterLab). With `basemap` an
    OpenStreetMap layer is added; it only loads with internet access, the points show either way.
    """
    points = _map_points(catalog)
    centre = (float(points["lat"].mean()), float(points["lon"].mean()))
    bounds = [
        [float(points["lat"].min()), float(points["lon"].min())],
        [float(points["lat"].max()), float(points["lon"].max())],
    ]
    splits = [name for name in SPLIT_COLOURS if name in set(points["split"])] + sorted(
        set(points["split"].astype(str)) - set(SPLIT_COLOURS)
    )
    colours = {name: _split_colour(name, position) for position, name in enumerate(splits)}
    if backend == "folium":
        return _folium_map(points, centre, bounds, colours, basemap)
    if backend == "leafmap":
        return _leafmap_map(points, centre, bounds, colours, basemap)
    raise ValueError(f"map backend must be 'folium' or 'leafmap', got {backend!r}")


def _folium_map(
    points: pd.DataFrame, centre: tuple[float, float], bounds: list[list[float]], colours: dict[str, str], basemap: bool
) -> Any:
    import folium

    fmap = folium.Map(location=centre, zoom_start=8, tiles="OpenStreetMap" if basemap else None)
    for name, colour in colours.items():
        layer = folium.FeatureGroup(name=f"{name} ({int((points['split'] == name).sum())})")
        for row in points[points["split"] == name].to_dict(orient="records"):
            folium.CircleMarker(
                location=(float(row["lat"]), float(row["lon"])),
                radius=4,
                color=colour,
                fill=True,
                fill_opacity=0.8,
                weight=1,
                tooltip=_tooltip(row),
            ).add_to(layer)
        layer.add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)
    fmap.fit_bounds(bounds)
    return fmap


def _leafmap_map(
    points: pd.DataFrame, centre: tuple[float, float], bounds: list[list[float]], colours: dict[str, str], basemap: bool
) -> Any:
    import ipyleaflet
    import leafmap

    lmap = leafmap.Map(center=centre, zoom=8)
    if not basemap:
        lmap.clear_layers()
    for name, colour in colours.items():
        markers = [
            ipyleaflet.CircleMarker(
                location=(float(row["lat"]), float(row["lon"])),
                radius=4,
                color=colour,
                fill_color=colour,
                fill_opacity=0.8,
                weight=1,
                title=_tooltip(row),
            )
            for row in points[points["split"] == name].to_dict(orient="records")
        ]
        lmap.add_layer(ipyleaflet.LayerGroup(layers=markers, name=f"{name} ({len(markers)})"))
    lmap.add_legend(title="split", legend_dict=colours)
    lmap.fit_bounds(bounds)
    return lmap


def save_map_html(fmap: Any, path: str | Path) -> Path:
    """Write a folium map as a standalone HTML file, atomically."""
    from workbench.io import write_text_atomic

    path = Path(path)
    if path.suffix.lower() != ".html":
        raise ValueError(f"{path}: maps are written as HTML; use a .html file name")
    return write_text_atomic(path, fmap.get_root().render())


# --------------------------------------------------------------------------- band composites

CUSTOM = "any 3 bands"
DEFAULT_COMPOSITES: dict[str, tuple[str, ...]] = {
    "true colour (B04/B03/B02)": ("B04", "B03", "B02"),
    "false colour (B08/B04/B03)": ("B08", "B04", "B03"),
    "SWIR (B12/B8A/B04)": ("B12", "B8A", "B04"),
    "SAR (VV/VH/VV-VH dB ratio)": ("VV", "VH", "VV-VH"),
    "DEM hillshade": ("hillshade(DEM)",),
}


class CompositeError(ValueError):
    """A composite names bands the image does not have, or is not 1 or 3 channels."""


def hillshade(dem: np.ndarray, pixel_size: float = 10.0, azimuth: float = 315.0, altitude: float = 45.0) -> np.ndarray:
    """Illumination in [0, 1] of a north-up DEM (rows run south) lit from `azimuth` (° clockwise from north).

    The cosine between the surface normal and the direction of the sun at `altitude` degrees; 0 in shadow.
    A flat surface gets sin(altitude).
    """
    dem = np.asarray(dem, dtype=np.float64)
    d_row, d_col = np.gradient(dem, pixel_size)
    d_east, d_north = d_col, -d_row
    normal = np.stack([-d_east, -d_north, np.ones_like(dem)])
    normal /= np.linalg.norm(normal, axis=0, keepdims=True)
    az, alt = math.radians(azimuth), math.radians(altitude)
    sun = np.array([math.sin(az) * math.cos(alt), math.cos(az) * math.cos(alt), math.sin(alt)])
    shade: np.ndarray = np.clip(np.tensordot(sun, normal, axes=1), 0.0, 1.0)
    return shade


def composite_channel(image: np.ndarray, band_names: Sequence[str], expression: str) -> np.ndarray:
    """One display channel: a band name, 'A/B' (ratio), 'A-B' (difference, the ratio of bands in dB) or
    'hillshade(A)'."""
    names = list(band_names)

    def band(name: str) -> np.ndarray:
        if name not in names:
            raise CompositeError(f"composite channel {expression!r} needs band {name!r}; the bands are {names}")
        return np.asarray(image[names.index(name)], dtype=np.float64)

    if expression in names:
        return band(expression)
    if expression.startswith("hillshade(") and expression.endswith(")"):
        return hillshade(band(expression[len("hillshade(") : -1]))
    for operator in ("/", "-"):
        if operator in expression:
            first, second = (part.strip() for part in expression.split(operator, 1))
            a, b = band(first), band(second)
            if operator == "-":
                return a - b
            out = np.zeros_like(a)
            np.divide(a, b, out=out, where=b != 0)
            return out
    return band(expression)


def composite(
    image: np.ndarray,
    band_names: Sequence[str],
    bands: Sequence[str],
    valid: np.ndarray | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> np.ndarray:
    """(H, W, 3) display image in [0, 1] of one chip; pixels outside `valid` are 0.

    `bands` holds three channel expressions (see `composite_channel`), each stretched between its
    `percentiles` over valid pixels, or one expression shown in grey (a hillshade unstretched, since it
    already is an illumination in [0, 1]).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != len(band_names):
        raise CompositeError(f"image has shape {image.shape}, expected ({len(band_names)}, height, width)")
    if len(bands) not in (1, 3):
        raise CompositeError(f"a composite has 1 or 3 channels, got {list(bands)}")
    mask = np.ones(image.shape[1:], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    channels = np.stack([composite_channel(image, band_names, expression) for expression in bands])
    if len(bands) == 1 and bands[0].startswith("hillshade("):
        grey = np.where(mask, channels[0], 0.0)
        return np.repeat(grey[..., None], 3, axis=-1)
    names = [f"channel {position}" for position in range(len(bands))]
    red, green, blue = (names[0], names[1], names[2]) if len(names) == 3 else (names[0],) * 3
    return rgb_composite(channels, names, (red, green, blue), percentiles, valid=mask)


def available_composites(
    band_names: Sequence[str], composites: Mapping[str, Sequence[str]] | None = None
) -> dict[str, tuple[str, ...]]:
    """The composites whose channels can all be computed from these bands."""
    probe = np.ones((len(band_names), 3, 3))
    usable = {}
    for name, bands in (composites or DEFAULT_COMPOSITES).items():
        if len(bands) not in (1, 3):
            continue
        try:
            for expression in bands:
                composite_channel(probe, band_names, expression)
        except CompositeError:
            continue
        usable[name] = tuple(bands)
    return usable


def label_rgb(label: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W, 3) label display: positive light blue, background dark, ignore light grey, nodata grey."""
    label = np.asarray(label)
    valid = np.asarray(valid, dtype=bool)
    out = np.empty((*label.shape, 3))
    out[:] = BACKGROUND_RGB
    out[(label > 0) & (label != IGNORE_INDEX)] = to_rgb(WATER_BLUE)
    out[label == IGNORE_INDEX] = IGNORE_RGB
    out[~valid] = to_rgb(INVALID_GREY)
    return out


def chip_figure(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    valid: np.ndarray,
    bands: Sequence[str],
    title: str = "",
) -> Figure:
    """Composite | label | valid mask of one chip."""
    valid = np.asarray(valid, dtype=bool)
    label = np.asarray(label)
    fig = Figure(figsize=(11, 3.9), layout="constrained")
    ax_image, ax_label, ax_valid = fig.subplots(1, 3)
    ax_image.imshow(composite(image, band_names, bands, valid), interpolation="nearest")
    ax_image.set_title(" / ".join(bands))
    scored = valid & (label != IGNORE_INDEX)
    share = float(((label > 0) & scored).sum() / max(int(scored.sum()), 1))
    ax_label.imshow(label_rgb(label, valid), interpolation="nearest")
    ax_label.set_title(f"label: {share:.1%} positive")
    ax_valid.imshow(valid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_valid.set_title(f"valid: {valid.mean():.1%} (black = nodata)")
    for ax in (ax_image, ax_label, ax_valid):
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """PNG bytes of a figure (for image widgets)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class ChipExplorer(widgets.VBox):  # type: ignore[misc]
    """Pick a split, a chip (dropdown or slider) and a band composite; shows composite, label and valid mask.

    The rendered PNG is in `self.image.value`; `self.figure()` returns the current figure.
    """

    def __init__(
        self,
        store: str | Path,
        catalog: pd.DataFrame,
        band_names: Sequence[str],
        composites: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.readers = {name: ChipReader(store, name) for name in ("image", "label", "valid")}
        if len(catalog) != len(self.readers["image"]):
            raise AuditInputError(
                f"catalog lists {len(catalog)} chips but store {store} holds {len(self.readers['image'])}"
            )
        self.catalog = catalog.reset_index(drop=True)
        self.band_names = [str(name) for name in band_names]
        self.composites = available_composites(self.band_names, composites)
        splits = [name for name in SPLIT_COLOURS if name in set(self.catalog.get("split", []))]
        self.split = widgets.Dropdown(options=[ALL, *splits], value=ALL, description="split")
        self.chip = widgets.Dropdown(options=[], description="chip")
        self.position = widgets.IntSlider(min=0, max=0, description="#", continuous_update=False)
        self.choice = widgets.Dropdown(options=[*self.composites, CUSTOM], description="composite")
        first = [self.band_names[min(i, len(self.band_names) - 1)] for i in range(3)]
        self.custom = [
            widgets.Dropdown(options=self.band_names, value=name, description=colour, layout={"width": "160px"})
            for colour, name in zip("RGB", first)
        ]
        self.caption = widgets.HTML()
        self.image = widgets.Image(format="png")
        super().__init__(
            [
                widgets.HBox([self.split, self.chip, self.position]),
                widgets.HBox([self.choice, *self.custom]),
                self.caption,
                self.image,
            ]
        )
        self._positions = {str(chip_id): position for position, chip_id in enumerate(self.catalog["chip_id"])}
        self._quiet = False
        self._update_chips()
        self.split.observe(lambda _: self._update_chips(), names="value")
        self.chip.observe(self._on_chip, names="value")
        self.position.observe(self._on_position, names="value")
        for control in (self.choice, *self.custom):
            control.observe(lambda _: self.render(), names="value")

    def _ids(self) -> list[str]:
        chosen = self.catalog if self.split.value == ALL else self.catalog[self.catalog["split"] == self.split.value]
        return [str(value) for value in chosen["chip_id"]]

    def _update_chips(self) -> None:
        """Refill the chip list after a split change, keeping the chip when it is still listed."""
        ids = self._ids()
        current = self.chip.value
        self._quiet = True
        try:
            self.chip.options = ids
            self.chip.value = current if current in ids else (ids[0] if ids else None)
            self.position.max = max(len(ids) - 1, 0)
            self.position.value = ids.index(self.chip.value) if ids else 0
        finally:
            self._quiet = False
        self.render()

    def _on_chip(self, change: Any) -> None:
        if self._quiet:
            return
        ids = self._ids()
        if change["new"] in ids:
            self._quiet = True
            try:
                self.position.value = ids.index(change["new"])
            finally:
                self._quiet = False
        self.render()

    def _on_position(self, change: Any) -> None:
        if self._quiet:
            return
        ids = self._ids()
        if 0 <= change["new"] < len(ids):
            self.chip.value = ids[change["new"]]

    def bands(self) -> tuple[str, ...]:
        """Channel expressions of the selected composite."""
        if self.choice.value == CUSTOM:
            return tuple(str(control.value) for control in self.custom)
        return self.composites[self.choice.value]

    def figure(self) -> Figure | None:
        """Figure of the selected chip and composite (None when no chip is selected)."""
        if self.chip.value is None:
            return None
        position = self._positions[str(self.chip.value)]
        row = self.catalog.iloc[position]
        image = self.readers["image"].read(position)
        label = self.readers["label"].read(position)
        valid = self.readers["valid"].read(position).astype(bool)
        title = " · ".join(
            str(part) for part in (row["chip_id"], row.get("split", ""), row.get("region", ""), row.get("year", ""))
        )
        return chip_figure(image, self.band_names, label, valid, self.bands(), title)

    def render(self) -> None:
        """Redraw the image for the current selection."""
        if self._quiet:
            return
        for control in self.custom:
            control.disabled = self.choice.value != CUSTOM
        fig = self.figure()
        if fig is None:
            self.caption.value = "<i>no chip in this split</i>"
            self.image.value = b""
            return
        self.caption.value = f"<b>{self.chip.value}</b> ({self.position.value + 1} of {len(self.chip.options)})"
        self.image.value = figure_png(fig)


def chip_explorer(
    store: str | Path,
    catalog: pd.DataFrame,
    band_names: Sequence[str],
    composites: Mapping[str, Sequence[str]] | None = None,
) -> ChipExplorer:
    """An ipywidgets chip explorer over a store (`catalog` in store order, `band_names` all store bands)."""
    return ChipExplorer(store, catalog, band_names, composites)


# --------------------------------------------------------------------------- loader pre-flight check

BATCH_COLUMNS = [
    "batch",
    "n_samples",
    "valid_fraction",
    "ignore_fraction",
    "positive_pixel_fraction",
    "positive_chip_share",
    "image_min",
    "image_max",
    "n_nonfinite",
]
EXPECTED_DTYPES = {"image": "torch.float32", "label": "torch.int64", "valid": "torch.bool"}


@dataclass
class DataCheckReport:
    """Outcome of iterating the training loader: ok is False when any problem was found."""

    ok: bool
    problems: list[str]
    warnings: list[str]
    batches: pd.DataFrame
    bands: pd.DataFrame

    def summary(self) -> str:
        """One paragraph for logs and notebooks."""
        status = "passed" if self.ok else f"FAILED ({len(self.problems)} problems)"
        lines = [f"data check {status} over {len(self.batches)} batches"]
        lines += [f"  problem: {text}" for text in self.problems]
        lines += [f"  warning: {text}" for text in self.warnings]
        return "\n".join(lines)


def _chip_name(batch: Mapping[str, Any], sample: int, chip_ids: Sequence[str] | None) -> str:
    index = batch.get("index")
    if index is None:
        return f"sample {sample}"
    chip = int(np.asarray(index)[sample])
    name = f"chip {chip}"
    if chip_ids is not None and 0 <= chip < len(chip_ids):
        name += f" ({chip_ids[chip]})"
    return name


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _layout(batch: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and per-sample shape of each checked tensor."""
    return {
        key: (str(batch[key].dtype), tuple(batch[key].shape[1:]))
        for key in ("image", "label", "valid", "target")
        if key in batch
    }


def _structure_problems(
    batch: Mapping[str, Any], where: str, n_bands: int | None, reference: dict[str, tuple[str, tuple[int, ...]]] | None
) -> list[str]:
    """Missing keys, wrong dtypes, inconsistent shapes (within the batch and against the first batch)."""
    missing = [key for key in ("image", "label", "valid") if key not in batch]
    if missing:
        return [f"{where}: missing {missing}; a batch holds image, label, valid (and target)"]
    problems = []
    for key, expected in EXPECTED_DTYPES.items():
        if str(batch[key].dtype) != expected:
            problems.append(f"{where}: {key} has dtype {batch[key].dtype}, expected {expected}")
    if "target" in batch and not str(batch["target"].dtype).startswith("torch.float"):
        problems.append(f"{where}: target has dtype {batch['target'].dtype}, expected a float dtype")
    image = batch["image"]
    if image.ndim != 4:
        return [*problems, f"{where}: image has shape {tuple(image.shape)}, expected (B, C, H, W)"]
    size, _, height, width = image.shape
    if n_bands is not None and image.shape[1] != n_bands:
        problems.append(f"{where}: image has {image.shape[1]} bands, expected {n_bands}")
    for key in ("label", "valid", "target"):
        if key in batch and tuple(batch[key].shape) != (size, height, width):
            problems.append(f"{where}: {key} has shape {tuple(batch[key].shape)}, expected {(size, height, width)}")
    if reference is not None:
        for key, (dtype, shape) in _layout(batch).items():
            if key in reference and reference[key] != (dtype, shape):
                problems.append(f"{where}: {key} is {dtype} {shape} per sample, the first batch had {reference[key]}")
    return problems


def check_batch(
    batch: Mapping[str, Any],
    number: int,
    allowed_labels: set[int],
    positive_threshold: float = 0.002,
    n_bands: int | None = None,
    reference: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    chip_ids: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Check one collated batch; returns its table row and the problems found (naming chips)."""
    where = f"batch {number}"
    problems = _structure_problems(batch, where, n_bands, reference)
    row: dict[str, Any] = {"batch": number}
    if any("missing" in text or "expected (B, C, H, W)" in text for text in problems):
        return row, problems
    image, label = _numpy(batch["image"]), _numpy(batch["label"]).astype(np.int64)
    valid = _numpy(batch["valid"]).astype(bool)
    nonfinite = ~np.isfinite(image)
    for sample in np.flatnonzero(nonfinite.any(axis=(1, 2, 3))):
        count = int(nonfinite[sample].sum())
        problems.append(f"{where}: image of {_chip_name(batch, int(sample), chip_ids)} has {count} non-finite values")
    bad = ~np.isin(label, sorted(allowed_labels))
    for sample in np.flatnonzero(bad.any(axis=(1, 2))):
        values = sorted({int(v) for v in np.unique(label[sample][bad[sample]])})
        problems.append(
            f"{where}: label of {_chip_name(batch, int(sample), chip_ids)} holds values {values[:10]} "
            f"outside the allowed {sorted(allowed_labels)}"
        )
    if "target" in batch:
        target = _numpy(batch["target"])
        off = ~np.isfinite(target) | (target < 0) | (target > 1)
        for sample in np.flatnonzero(off.any(axis=(1, 2))):
            name = _chip_name(batch, int(sample), chip_ids)
            problems.append(f"{where}: target of {name} leaves [0, 1] at {int(off[sample].sum())} pixels")
    scored = valid & (label != IGNORE_INDEX)
    positive = scored & (label > 0) & ~bad
    per_chip = positive.sum(axis=(1, 2)) / np.maximum(scored.sum(axis=(1, 2)), 1)
    finite_valid = image[np.isfinite(image) & valid[:, None]]
    row.update(
        n_samples=int(image.shape[0]),
        valid_fraction=float(valid.mean()),
        ignore_fraction=float((valid & (label == IGNORE_INDEX)).sum() / max(int(valid.sum()), 1)),
        positive_pixel_fraction=float(positive.sum() / max(int(scored.sum()), 1)),
        positive_chip_share=float((per_chip >= positive_threshold).mean()),
        image_min=float(finite_valid.min()) if finite_valid.size else math.nan,
        image_max=float(finite_valid.max()) if finite_valid.size else math.nan,
        n_nonfinite=int(nonfinite.sum()),
    )
    return row, problems


def _band_moments(moments: Welford, batch: Mapping[str, Any]) -> None:
    image = _numpy(batch["image"]).astype(np.float64)
    valid = _numpy(batch["valid"]).astype(bool)
    for sample, mask in zip(image, valid):
        moments.update(sample, mask & np.isfinite(sample).all(axis=0))


def band_warnings(
    bands: pd.DataFrame, method: str, mean_tolerance: float = 0.5, std_range: tuple[float, float] = (0.5, 2.0)
) -> list[str]:
    """For z-score inputs, bands whose mean over the checked batches is far from 0 or whose std is far from 1."""
    if method != "zscore":
        return []
    found = []
    for name, mean, std in zip(bands["band"], bands["mean"].astype(float), bands["std"].astype(float)):
        if not math.isfinite(mean) or abs(mean) > mean_tolerance:
            found.append(f"band {name}: normalised mean {mean:.3g}, expected near 0 for zscore")
        if not math.isfinite(std) or not std_range[0] <= std <= std_range[1]:
            found.append(f"band {name}: normalised std {std:.3g}, expected near 1 for zscore")
    return found


def check_batches(
    batches: Iterable[Mapping[str, Any]],
    allowed_labels: set[int] | None = None,
    positive_threshold: float = 0.002,
    band_names: Sequence[str] | None = None,
    method: str = "zscore",
    chip_ids: Sequence[str] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> DataCheckReport:
    """Check batches as a training loop receives them; see `check_batch`. A loader error is a problem too."""
    allowed = allowed_label_values(1) if allowed_labels is None else allowed_labels
    n_bands = len(band_names) if band_names is not None else None
    rows, problems = [], []
    reference: dict[str, tuple[str, tuple[int, ...]]] | None = None
    moments: Welford | None = None
    stream = itertools.islice(batches, max_batches) if max_batches is not None else batches
    bar = tqdm(stream, total=max_batches, desc="data check", unit="batch", disable=not progress)
    try:
        for number, batch in enumerate(bar):
            row, found = check_batch(batch, number, allowed, positive_threshold, n_bands, reference, chip_ids)
            rows.append(row)
            problems += found
            if reference is None and not found:
                reference = _layout(batch)
            if "image" in batch and "valid" in batch and np.ndim(batch["image"]) == 4:
                moments = moments or Welford(int(batch["image"].shape[1]))
                if int(batch["image"].shape[1]) == moments.n_bands:
                    _band_moments(moments, batch)
    except Exception as exc:  # a crashing loader is the most important finding of a pre-flight check
        problems.append(f"loader failed after {len(rows)} batches: {type(exc).__name__}: {exc}")
    if not rows and not problems:
        problems.append("the loader yielded no batch")
    names = list(band_names) if band_names is not None else None
    if moments is not None and moments.count:
        names = (
            names if names is not None and len(names) == moments.n_bands else [str(i) for i in range(moments.n_bands)]
        )
        bands = pd.DataFrame({"band": names, "mean": moments.mean, "std": moments.std})
    else:
        bands = pd.DataFrame(columns=["band", "mean", "std"])
    table = pd.DataFrame(rows).reindex(columns=BATCH_COLUMNS)
    return DataCheckReport(not problems, problems, band_warnings(bands, method), table, bands)


def check_data(params: Params, prepared: PreparedData, n_batches: int = 8, progress: bool = True) -> DataCheckReport:
    """Iterate `n_batches` of the real training DataLoader (sampler, augmentation, normalisation) and check them.

    Batch-level augmentation (copy-paste, slide-mix) is applied as in training when it is configured. The
    check stops at the end of the first epoch when that comes before `n_batches`.
    """
    from workbench.data.augment import batch_augment_generator
    from workbench.data.loading import build_datamodule

    datamodule = build_datamodule(params, prepared)
    loader = datamodule.train_dataloader()
    batch_augment = datamodule.batch_augment if getattr(datamodule.batch_augment, "enabled", False) else None

    def batches() -> Iterable[Mapping[str, Any]]:
        for step, batch in enumerate(loader):
            if batch_augment is not None:
                batch = batch_augment(batch, batch_augment_generator(params.seed, step))
            yield batch

    return check_batches(
        batches(),
        allowed_labels=allowed_label_values(params.model.num_classes),
        positive_threshold=params.data.sampler.positive_threshold,
        band_names=prepared.bands,
        method=params.data.normalize.method,
        chip_ids=[str(value) for value in prepared.catalog["chip_id"]],
        max_batches=n_batches,
        progress=progress,
    )

"""Data audit statistics: what is in a chip store before any model sees it.

`BandStatistics` / `scan_store` stream the store chip by chip (bounded memory): per-band statistics over
valid pixels, and one row per chip (`chip_summary`) with its nodata share, label share and water-index
(MNDWI) agreement from `workbench.data.agreement`. `nodata_by_group` / `positive_by_group` summarise those
rows per split and region, with 'all' subtotals; `prefilter_dropped_fraction` is the share of chips the
water-index pre-filter would drop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from workbench.arrays import IGNORE_INDEX
from workbench.data.agreement import chip_agreement
from workbench.data.normalize import PercentileReservoir, Welford
from workbench.data.store import ChipReader
from workbench.params import ReviewParams

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
    and, when `green` and `swir` are bands, the water-index agreement of
    `workbench.data.agreement.chip_agreement` (water_fraction, iou_label_water, water_label_ratio,
    prefilter_keep, prefilter_reason).
    """
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

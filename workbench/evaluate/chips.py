"""Per-chip scoring: one row of confusion counts, IoU and flags per chip, and metrics pooled from them.

Reads the chip logits stored by `workbench.infer.chips` together with each chip's label and
valid mask, so the per-chip table, the pooled split metrics and the metrics per region or year
all count the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from workbench.arrays import IGNORE_INDEX, sigmoid
from workbench.data.dataset import ChipDataset
from workbench.functional import confusion_counts, iou_score, mark_undefined_without_positives, metrics_from_counts

IDENTITY_COLUMNS = ("chip_id", "region", "year", "lat", "lon", "split")


def chip_counts(pred: np.ndarray, truth: np.ndarray, usable: np.ndarray) -> dict[str, Any]:
    """Confusion counts of one chip over `usable` pixels, with union, IoU and flags (empty, tail: IoU < 0.05).

    `pred` and `truth` are boolean masks; callers decide how probabilities become `pred`.
    """
    counts = confusion_counts(pred, truth, valid=usable, per_image=False)
    tp, fp, fn, tn = (int(c[0]) for c in counts)
    n = tp + fp + fn + tn
    union = tp + fp + fn
    iou = float(iou_score(tp, fp, fn, tn))
    flags = ["empty"] if union == 0 else []
    if tp + fn and iou < 0.05:
        flags.append("tail")
    return {
        "valid_pixels": n,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "label_pixels": tp + fn,
        "predicted_pixels": tp + fp,
        "intersection": tp,
        "union": union,
        "iou": iou,
        "flags": ",".join(flags),
    }


def chip_identity(catalog: pd.DataFrame, index: int) -> dict[str, Any]:
    """The catalog's identity columns of the chip at store position `index`, plus that position."""
    row = catalog.iloc[index]
    identity: dict[str, Any] = {c: row[c] for c in IDENTITY_COLUMNS if c in catalog.columns}
    identity["store_index"] = index
    return identity


def iter_split_chips(
    store: Path, predictions: xr.Dataset, bands: list[str] | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (store index, raw image, label, valid, logit) for each predicted chip, one at a time."""
    indices = predictions["chip_index"].values
    dataset = ChipDataset(store, indices, bands=bands)
    logits = predictions["logit"]
    for position, index in enumerate(indices):
        image, label, valid = dataset.read_raw(position)
        yield int(index), image, label, valid, np.asarray(logits[position].values, dtype=np.float32)


def per_chip_table(
    store: Path,
    catalog: pd.DataFrame,
    predictions: xr.Dataset,
    threshold: float = 0.5,
    temperature: float = 1.0,
    bands: list[str] | None = None,
    green: str = "B03",
    swir: str = "B11",
    water_threshold: float = 0.0,
) -> pd.DataFrame:
    """One row per chip: identity, pixel counts, intersection/union/IoU and the water-index fraction.

    A pixel is predicted positive when its probability is `>= threshold`, as in calibration and review.
    """
    from workbench.indices import mndwi

    rows = []
    for index, image, label, valid, logit in iter_split_chips(store, predictions, bands):
        prob = sigmoid(logit / temperature, np.float32)
        usable = valid & (label != IGNORE_INDEX)
        row = chip_identity(catalog, index)
        row.update(chip_counts(prob >= threshold, label > 0, usable))
        if bands is not None and green in bands and swir in bands:
            index_map = mndwi(image, bands, green=green, swir=swir)
            row["water_index_fraction"] = float((index_map[valid] > water_threshold).mean()) if valid.any() else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Pooled (sum I / sum U over the split) and per-chip mean metrics from a per-chip table."""
    tp, fp, fn, tn = (float(table[c].sum()) for c in ("tp", "fp", "fn", "tn"))
    pooled = {
        **metrics_from_counts(tp, fp, fn, tn),
        "mean_chip_iou": float(table["iou"].mean()) if table["iou"].notna().any() else float("nan"),
        "tail_chips": int((table["flags"].str.contains("tail")).sum()),
        "n_chips": len(table),
    }
    return mark_undefined_without_positives(pooled, tp, fn)  # no positive pixel: IoU/F1/recall undefined

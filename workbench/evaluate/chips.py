"""Per-chip scoring: one row of confusion counts, IoU and flags per chip, and metrics pooled from them.

Reads the chip logits stored by `workbench.infer.chips` together with each chip's label and
valid mask, so the per-chip table, the pooled split metrics and the metrics per region or year
all count the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from workbench.arrays import IGNORE_INDEX, sigmoid
from workbench.data.dataset import ChipDataset
from workbench.functional import (
    confusion_counts,
    f1_score,
    iou_score,
    mark_undefined_without_positives,
    metrics_from_counts,
)
from workbench.indices import mndwi

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
    store: Path, predictions: xr.Dataset, bands: list[str] | None = None, corrections: Any = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (store index, raw image, label, valid, logit) for each predicted chip, one at a time.

    With `corrections` (store index -> corrected label file) the label is the corrected one.
    """
    indices = predictions["chip_index"].values
    dataset = ChipDataset(store, indices, bands=bands, corrections=corrections)
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
    corrections: Any = None,
) -> pd.DataFrame:
    """One row per chip: identity, pixel counts, intersection/union/IoU and the water-index fraction.

    A pixel is predicted positive when its probability is `>= threshold`, as in calibration and review.
    With `corrections` (a review ledger applied, see `workbench.data.ledger`) the counts use the corrected
    labels, `tp_raw`, `fp_raw`, `fn_raw`, `tn_raw` the store's original ones, `dropped` marks chips judged
    "drop" (catalog split "dropped") and `fixed` chips with a corrected label.
    """

    rows = []
    ledger = corrections is not None
    raw_reader = ChipDataset(store, predictions["chip_index"].values, bands=bands) if ledger else None
    for position, (index, image, label, valid, logit) in enumerate(
        iter_split_chips(store, predictions, bands, corrections)
    ):
        prob = sigmoid(logit / temperature, np.float32)
        usable = valid & (label != IGNORE_INDEX)
        row = chip_identity(catalog, index)
        row.update(chip_counts(prob >= threshold, label > 0, usable))
        if raw_reader is not None:
            raw_label = raw_reader.read_raw(position)[1]
            raw_usable = valid & (raw_label != IGNORE_INDEX)
            raw = chip_counts(prob >= threshold, raw_label > 0, raw_usable)
            row.update({f"{key}_raw": raw[key] for key in ("tp", "fp", "fn", "tn")})
            row["dropped"] = bool(catalog["split"].iloc[index] == "dropped")
            row["fixed"] = int(index) in corrections
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


def raw_and_corrected_counts(
    store: Path,
    catalog: pd.DataFrame,
    predictions: xr.Dataset,
    corrections: Mapping[int, Path],
    temperature: float = 1.0,
    threshold: float | Callable[[str], float] = 0.5,
) -> pd.DataFrame:
    """Per-chip confusion counts against the store's label (`tp_raw`, ...) and the label-corrected one (`tp`, ...).

    For every predicted chip: identity columns, `dropped` (catalog split "dropped": a review "drop"),
    `fixed` (a corrected label from the review ledger, `corrections`: store index -> label file) and both
    sets of counts at `threshold` on probabilities at `temperature` (a callable maps a chip's region to
    its threshold, as `Calibration.threshold_for`). Only labels and valid masks are read, not images.
    `label_corrected_table` turns the result into the raw against label-corrected table.
    """
    from workbench.data.ledger import load_corrected
    from workbench.data.store import ChipReader

    labels, valids = ChipReader(store, "label"), ChipReader(store, "valid")
    logits = predictions["logit"]
    rows = []
    for position, index in enumerate(np.asarray(predictions["chip_index"].values, dtype=np.int64)):
        index = int(index)
        row = chip_identity(catalog, index)
        region = str(catalog["region"].iloc[index]) if "region" in catalog else ""
        cut = threshold(region) if callable(threshold) else float(threshold)
        prob = sigmoid(np.asarray(logits[position].values, dtype=np.float32) / temperature, np.float32)
        raw_label, valid = labels.read(index), valids.read(index).astype(bool)
        label = load_corrected(corrections[index], raw_label.shape) if index in corrections else raw_label
        for suffix, truth in (("", label), ("_raw", raw_label)):
            counts = chip_counts(prob >= cut, truth > 0, valid & (truth != IGNORE_INDEX))
            row.update({f"{key}{suffix}": counts[key] for key in ("tp", "fp", "fn", "tn")})
        row["threshold"] = cut
        row["dropped"] = bool(catalog["split"].iloc[index] == "dropped")
        row["fixed"] = index in corrections
        rows.append(row)
    return pd.DataFrame(rows)


def label_corrected_table(table: pd.DataFrame) -> pd.DataFrame:
    """Raw and label-corrected pooled IoU and F1 side by side, for all chips and per region.

    Raw: every chip scored against the store's original label (`*_raw` counts). Label-corrected: chips
    judged "drop" left out, fixed chips scored against their corrected label. Columns: region, iou_raw,
    iou_corrected, delta, f1_raw, f1_corrected, n_chips, n_dropped, n_fixed.
    """

    def pooled(frame: pd.DataFrame, suffix: str, metric: Callable[..., Any]) -> float:
        tp, fp, fn = (float(frame[f"{c}{suffix}"].sum()) for c in ("tp", "fp", "fn"))
        return float(metric(tp, fp, fn, 0.0))

    rows = []
    groups = [("all", table)] + ([(str(r), g) for r, g in table.groupby("region")] if "region" in table else [])
    for region, frame in groups:
        kept = frame[~frame["dropped"].astype(bool)]
        raw, corrected = pooled(frame, "_raw", iou_score), pooled(kept, "", iou_score)
        rows.append(
            {
                "region": region,
                "iou_raw": raw,
                "iou_corrected": corrected,
                "delta": corrected - raw,
                "f1_raw": pooled(frame, "_raw", f1_score),
                "f1_corrected": pooled(kept, "", f1_score),
                "n_chips": len(frame),
                "n_dropped": int(frame["dropped"].sum()),
                "n_fixed": int(frame["fixed"].sum()),
            }
        )
    return pd.DataFrame(rows)

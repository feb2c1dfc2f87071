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


def label_corrected_table(table: pd.DataFrame) -> pd.DataFrame:
    """Raw and label-corrected pooled IoU side by side, for all chips and per region.

    Raw: every chip scored against the store's original label (`*_raw` counts). Label-corrected: chips
    judged "drop" left out, fixed chips scored against their corrected label. Columns: region, iou_raw,
    iou_corrected, delta, n_chips, n_dropped, n_fixed.
    """

    def pooled(frame: pd.DataFrame, suffix: str) -> float:
        tp, fp, fn = (float(frame[f"{c}{suffix}"].sum()) for c in ("tp", "fp", "fn"))
        return float(iou_score(tp, fp, fn, 0.0))

    rows = []
    groups = [("all", table)] + ([(str(r), g) for r, g in table.groupby("region")] if "region" in table else [])
    for region, frame in groups:
        kept = frame[~frame["dropped"].astype(bool)]
        raw, corrected = pooled(frame, "_raw"), pooled(kept, "")
        rows.append(
            {
                "region": region,
                "iou_raw": raw,
                "iou_corrected": corrected,
                "delta": corrected - raw,
                "n_chips": len(frame),
                "n_dropped": int(frame["dropped"].sum()),
                "n_fixed": int(frame["fixed"].sum()),
            }
        )
    return pd.DataFrame(rows)

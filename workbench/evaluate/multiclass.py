"""Scores of a softmax model's stored chip predictions: one pass of per-chip confusion matrices.

Each predicted chip gives one (C, C) confusion matrix [label, decided class] over its valid labelled
pixels (`workbench.functional.confusion_matrix`); pooled, per-region and per-year matrices are sums of
those, and every metric comes from a matrix through `workbench.functional.multiclass_summary`, so the
split, region and year tables agree with each other exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from workbench.evaluate.calibration import predict_classes
from workbench.evaluate.chips import chip_identity, iter_split_chips
from workbench.functional import confusion_matrix, multiclass_summary
from workbench.io import write_parquet_atomic, write_text_atomic
from workbench.run import RunLayout

GROUPS = ("region", "year")


def chip_confusions(
    store: Path,
    catalog: pd.DataFrame,
    predictions: xr.Dataset,
    class_names: Sequence[str],
    calibration: Mapping[str, Any] | None = None,
    bands: list[str] | None = None,
    corrections: Any = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-chip identity rows and their (n_chips, C, C) confusion matrices of a (chip, class, y, x) split."""
    names = list(class_names)
    if predictions["logit"].ndim != 4 or predictions["logit"].shape[1] != len(names):
        raise ValueError(
            f"predictions hold logits of shape {predictions['logit'].shape}; expected (chip, {len(names)}, y, x) "
            "for the model's classes"
        )
    rows: list[dict[str, Any]] = []
    matrices = []
    for index, _image, label, valid, logit in iter_split_chips(store, predictions, bands, corrections):
        decided = predict_classes(logit, calibration, names)
        cm = confusion_matrix(decided, label, len(names), valid=valid)
        matrices.append(cm)
        row = chip_identity(catalog, index)
        row["valid_pixels"] = int(cm.sum())
        row["accuracy"] = float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan")
        for c, name in enumerate(names):
            row[f"label_pixels.{name}"] = int(cm[c].sum())
            row[f"predicted_pixels.{name}"] = int(cm[:, c].sum())
        rows.append(row)
    shape = (0, len(names), len(names))
    return pd.DataFrame(rows), np.stack(matrices) if matrices else np.zeros(shape, dtype=np.int64)


def confusion_long(cm: np.ndarray, class_names: Sequence[str], **keys: Any) -> pd.DataFrame:
    """A confusion matrix as rows (label, predicted, count, normalized = count / label row total)."""
    names = list(class_names)
    totals = cm.sum(axis=1)
    rows = [
        {
            **keys,
            "label": names[i],
            "predicted": names[j],
            "count": int(cm[i, j]),
            "normalized": float(cm[i, j] / totals[i]) if totals[i] else float("nan"),
        }
        for i in range(len(names))
        for j in range(len(names))
    ]
    return pd.DataFrame(rows)


def split_scores(
    table: pd.DataFrame, matrices: np.ndarray, class_names: Sequence[str]
) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Pooled metrics of a split and its tables: `confusion` (long, normalised by label row),
    `confusion_<group>` per region and year, and `class_metrics` (per class: pooled and per group)."""
    names = list(class_names)
    pooled = matrices.sum(axis=0)
    metrics = multiclass_summary(pooled, names)
    tables = {"confusion": confusion_long(pooled, names)}
    class_rows = [_class_rows(metrics, names, group="all", value="all")]
    for group in GROUPS:
        if group not in table.columns or table.empty:
            continue
        parts = []
        for value, members in table.groupby(group, sort=True):
            cm = matrices[members.index.to_numpy()].sum(axis=0)
            parts.append(confusion_long(cm, names, **{group: value}))
            class_rows.append(_class_rows(multiclass_summary(cm, names), names, group=group, value=value))
        tables[f"confusion_{group}"] = pd.concat(parts, ignore_index=True)
    tables["class_metrics"] = pd.concat(class_rows, ignore_index=True)
    return metrics, tables


def _class_rows(summary: Mapping[str, Any], names: list[str], group: str, value: Any) -> pd.DataFrame:
    rows = [
        {
            "group": group,
            "value": value,
            "class": name,
            **{m: summary[f"{m}.{name}"] for m in ("iou", "f1", "precision", "recall")},
            "absent": name in summary["absent_classes"],
            "miou": summary["miou"],
            "miou_no_background": summary["miou_no_background"],
            "overall_accuracy": summary["overall_accuracy"],
        }
        for name in names
    ]
    return pd.DataFrame(rows)


def write_split_tables(run_dir: Path, split: str, per_chip: pd.DataFrame, tables: Mapping[str, pd.DataFrame]) -> None:
    """Write one split's per-chip table, confusion tables (pooled, per region, per year) and class metrics.

    The training and calibration stages hand these files to the notebooks and to later stages under the
    names `workbench.run.RunLayout` gives them; every write is atomic.
    """
    layout = RunLayout(run_dir)
    write_parquet_atomic(layout.per_chip(split), per_chip)
    write_text_atomic(layout.confusion(split), tables["confusion"].to_csv(index=False))
    for group in ("region", "year"):
        if f"confusion_{group}" in tables:
            write_text_atomic(layout.confusion(split, group), tables[f"confusion_{group}"].to_csv(index=False))
    write_text_atomic(layout.class_metrics(split), tables["class_metrics"].to_csv(index=False))

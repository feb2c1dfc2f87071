"""What the notebooks show for a softmax model (`model.num_classes >= 2`): classes, balance, per-class tables.

Each function reads what the stages wrote (the catalog, the store, metrics, confusion tables, chip
predictions, `calibration.json`) and returns tables and figure paths, so the notebooks stay thin.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.arrays import IGNORE_INDEX
from workbench.data.prepare import load_prepared
from workbench.data.store import ChipReader
from workbench.figures import class_legend
from workbench.params import Params, resolve_classes
from workbench.stages.base import StageResult, save_stage_figure

CLASS_METRICS = ("iou", "f1", "precision", "recall")


def is_multiclass(params: Params) -> bool:
    """Whether the run's model is a softmax model (C >= 2 logits)."""
    return params.model.num_classes >= 2


def class_names_colors(params: Params) -> tuple[list[str], list[str]]:
    """The class names and colours of the run (`workbench.params.resolve_classes`)."""
    classes = resolve_classes(params.model)
    return [spec.name for spec in classes], [spec.color for spec in classes]


def class_table(params: Params) -> pd.DataFrame:
    """One row per class: id, name and colour."""
    names, colors = class_names_colors(params)
    return pd.DataFrame({"class": range(len(names)), "name": names, "color": colors})


def legend_figure(params: Params, run_dir: Path, result: StageResult) -> Path:
    """Save the class legend as `figures/classes.png` and return its path."""
    names, colors = class_names_colors(params)
    save_stage_figure(class_legend(names, colors), Path(run_dir), "classes", result)
    return result.figures["classes"]


def class_balance(params: Params, run_dir: Path, batch: int = 256) -> pd.DataFrame:
    """Pixel share of each class per split over valid pixels (plus the unlabelled share), read chip batch by batch.

    Columns: split, n_chips, labelled_pixels, unlabelled_share and one `share.<class>` column per class;
    a label value that is no class is counted in `unknown_pixels` (the data audit refuses such stores).
    """
    names, _ = class_names_colors(params)
    prepared = load_prepared(Path(run_dir), params.data)
    labels = ChipReader(prepared.store, "label")
    valids = ChipReader(prepared.store, "valid")
    rows = []
    for split in ["train", "val", "test"]:
        positions = np.flatnonzero(prepared.catalog["split"].to_numpy() == split)
        counts = np.zeros(256, dtype=np.int64)
        for start in range(0, len(positions), batch):
            chunk = positions[start : start + batch]
            label = labels.read_batch(chunk)
            valid = valids.read_batch(chunk).astype(bool)
            counts += np.bincount(label[valid].astype(np.int64).reshape(-1), minlength=256)
        labelled = int(counts[: len(names)].sum())
        total = int(counts.sum())
        row: dict[str, Any] = {
            "split": split,
            "n_chips": len(positions),
            "labelled_pixels": labelled,
            "unlabelled_share": counts[IGNORE_INDEX] / total if total else math.nan,
            "unknown_pixels": int(total - labelled - counts[IGNORE_INDEX]),
        }
        for k, name in enumerate(names):
            row[f"share.{name}"] = counts[k] / labelled if labelled else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def per_class_metrics(metrics: dict[str, Any], params: Params, split: str = "test") -> pd.DataFrame:
    """The per-class metrics of `split` from the flat metrics (`<split>.iou.<class>`, ...) as a table.

    One row per class with iou, f1, precision, recall (NaN for a class absent from label and prediction,
    marked in the `absent` column), then the rows mIoU, mIoU without background and overall accuracy.
    """
    names, _ = class_names_colors(params)
    absent = metrics.get(f"{split}.absent_classes") or []
    rows = []
    for name in names:
        row: dict[str, Any] = {"class": name}
        for metric in CLASS_METRICS:
            row[metric] = metrics.get(f"{split}.{metric}.{name}", math.nan)
        row["absent"] = name in absent
        rows.append(row)
    table = pd.DataFrame(rows)
    summary = {
        "miou": metrics.get(f"{split}.miou", math.nan),
        "miou_no_background": metrics.get(f"{split}.miou_no_background", math.nan),
        "overall_accuracy": metrics.get(f"{split}.overall_accuracy", math.nan),
    }
    return pd.concat([table, pd.DataFrame([{"class": key, "iou": value} for key, value in summary.items()])])

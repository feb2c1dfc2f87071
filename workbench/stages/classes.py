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
from workbench.evaluate.calibration import class_probabilities
from workbench.figures import class_legend, class_reliability_tables, confusion_figure, plot_class_reliability
from workbench.infer.chips import load_predictions
from workbench.io import read_json
from workbench.params import Params, resolve_classes
from workbench.run import RunLayout
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
    if isinstance(absent, str):  # metrics.json holds the names comma-separated
        absent = [name for name in absent.split(",") if name]
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


def confusion_matrix_counts(params: Params, run_dir: Path, split: str) -> np.ndarray:
    """The (C, C) pixel counts [label, prediction] of `split` from `diagnostics/confusion_<split>.csv`."""
    names, _ = class_names_colors(params)
    path = RunLayout(Path(run_dir)).confusion(split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run the training and calibration stages of this run first")
    long = pd.read_csv(path)
    counts = long.pivot_table(index="label", columns="predicted", values="count", aggfunc="sum")
    return counts.reindex(index=names, columns=names).fillna(0).to_numpy(dtype=np.int64)


def confusion_figures(params: Params, run_dir: Path, result: StageResult, splits: tuple[str, ...] = ("test",)) -> None:
    """Draw each split's confusion matrix (counts and row shares) as `figures/confusion_<split>.png`."""
    names, _ = class_names_colors(params)
    for split in splits:
        if not RunLayout(Path(run_dir)).confusion(split).is_file():
            continue
        counts = confusion_matrix_counts(params, run_dir, split)
        fig = confusion_figure(counts, names, title=f"{params.experiment} · {split}")
        save_stage_figure(fig, Path(run_dir), f"confusion_{split}", result)


def reliability_figure(
    params: Params, run_dir: Path, result: StageResult, split: str | None = None, max_chips: int = 200
) -> dict[str, dict[str, pd.DataFrame]]:
    """Per-class reliability diagrams of `split` (default: the test split) before and after calibration.

    Probabilities come from `workbench.evaluate.calibration.class_probabilities` with temperature 1 and with
    the run's `calibration.json`; at most `max_chips` chips (evenly spaced) keep memory bounded. Saved as
    `figures/reliability_classes.png`; returns the tables {class: {"before (T = 1)": ..., "after": ...}}.
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    names, colors = class_names_colors(params)
    split = split or "test"
    predictions = load_predictions(run_dir, split)
    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    positions = np.asarray(predictions["chip_index"].values, dtype=np.int64)
    keep = np.unique(np.linspace(0, len(positions) - 1, min(max_chips, len(positions))).round().astype(int))
    logits = np.asarray(predictions["logit"][keep].values, dtype=np.float64)
    labels = ChipReader(prepared.store, "label").read_batch(positions[keep])
    valid = ChipReader(prepared.store, "valid").read_batch(positions[keep]).astype(bool)
    calibration = read_json(layout.calibration) if layout.calibration.is_file() else None
    before = class_reliability_tables(
        class_probabilities(logits, None), labels, names, valid=valid, bins=params.calibrate.ece_bins
    )
    after = class_reliability_tables(
        class_probabilities(logits, calibration), labels, names, valid=valid, bins=params.calibrate.ece_bins
    )
    tables = {name: {"before (T = 1)": before[name], "after": after[name]} for name in names}
    fig = plot_class_reliability(tables, colors, title=f"{split}: one-vs-rest reliability per class")
    save_stage_figure(fig, run_dir, "reliability_classes", result)
    return tables

"""Stage 2: train, save the model bundle, predict each needed split once, score val and test, and report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.arrays import sigmoid
from workbench.data.dataset import ChipDataset
from workbench.data.prepare import load_prepared
from workbench.evaluate.chips import iter_split_chips, label_corrected_table, per_chip_table, pooled_metrics
from workbench.figures import pick_gallery_chips, prediction_gallery, training_curves
from workbench.infer.chips import load_predictions, write_predictions
from workbench.io import write_parquet_atomic, write_text_atomic
from workbench.params import Params, resolve_classes
from workbench.run import FINAL_WEIGHTS_TABLE, TRAINING, RunLayout
from workbench.stages.base import StageResult, save_stage_figure, write_stage_metrics
from workbench.train.card import model_card, sampler_composition, split_summary
from workbench.train.crossfit import out_of_fold_predictions, use_out_of_fold
from workbench.train.fit import train_model
from workbench.train.launch import launch_training, needs_process_group
from workbench.train.log import divergence_warnings


def evaluate_split(params: Params, run_dir: Path, split: str, threshold: float, temperature: float = 1.0) -> Any:
    """Per-chip table and pooled metrics of one predicted split (written to diagnostics/)."""

    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    table = per_chip_table(
        prepared.store,
        prepared.catalog,
        load_predictions(run_dir, split),
        corrections=prepared.corrections if prepared.ledger is not None else None,
        threshold=threshold,
        temperature=temperature,
        bands=prepared.bands,
        green=params.data.green_band,
        swir=params.data.swir_band,
        water_threshold=params.review.water_index_threshold,
    )
    write_parquet_atomic(RunLayout(run_dir).per_chip(split), table)
    if "dropped" in table and prepared.ledger is not None:
        corrected = label_corrected_table(table)
        path = RunLayout(run_dir).label_corrected
        earlier = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=corrected.columns)
        both = pd.concat([earlier[earlier["split"] != split], corrected.assign(split=split)], ignore_index=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, both.to_csv(index=False))
        pooled = pooled_metrics(table[~table["dropped"]])
        raw = pooled_metrics(table.assign(**{c: table[f"{c}_raw"] for c in ("tp", "fp", "fn", "tn")}))
        return table, {
            **pooled,
            "iou_raw": raw["iou"],
            "iou_corrected": pooled["iou"],
            "f1_raw": raw["f1"],
            "f1_corrected": pooled["f1"],
            "n_dropped": int(table["dropped"].sum()),
            "n_fixed": int(table["fixed"].sum()),
        }
    return table, pooled_metrics(table)


def evaluate_multiclass_split(
    params: Params, run_dir: Path, split: str, calibration: dict[str, Any] | None = None
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, pd.DataFrame]]:
    """Per-chip table, pooled metrics and confusion / class tables of a softmax model's predicted split.

    Writes `per_chip_<split>.parquet`, `confusion_<split>.csv` (counts and row-normalised),
    `confusion_<split>_region.csv`, `confusion_<split>_year.csv` and `class_metrics_<split>.csv`.
    """
    from workbench.evaluate.multiclass import chip_confusions, split_scores, write_split_tables

    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    names = [spec.name for spec in resolve_classes(params.model)]
    table, matrices = chip_confusions(
        prepared.store,
        prepared.catalog,
        load_predictions(run_dir, split),
        names,
        calibration,
        bands=prepared.bands,
        corrections=prepared.corrections if prepared.ledger is not None else None,
    )
    metrics, tables = split_scores(table, matrices, names)
    write_split_tables(run_dir, split, table, tables)
    metrics["absent_classes"] = ",".join(metrics["absent_classes"])
    metrics["n_chips"] = len(table)
    return table, metrics, tables


def prediction_splits(params: Params) -> list[str]:
    """Splits the run predicts once: val and test, plus those the review audits."""
    return list(dict.fromkeys(["val", "test", *params.review.splits]))


def run_training(params: Params, run_dir: Path) -> StageResult:
    """Train, save the model bundle, predict every needed split once, score val/test at 0.5, and report.

    With `review.out_of_fold` the train split is also predicted out of fold (`workbench.train.crossfit`).
    Training that needs several processes (devices, nodes or a DDP strategy) runs as its own process
    group (`workbench.train.launch`), its output streamed here; the rest of the stage runs in this process.

    Besides the scores, the result holds the data and sampler summary (`split_summary`,
    `sampler_composition`), the model card (`model_parts`, `param_groups`), `warnings` (tiny
    learning rates, train-validation divergence) and the figures `training_curves` and
    `val_predictions`; tables are also written to `diagnostics/train_*.csv`.
    """

    run_dir = Path(run_dir)
    RunLayout(run_dir).check_params(params)
    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    result = StageResult()
    result.tables["split_summary"] = split_summary(prepared.catalog, params.data.sampler.positive_threshold)
    result.tables["sampler_composition"] = sampler_composition(params, prepared.catalog)
    if needs_process_group(params):  # DDP cannot start inside a notebook kernel: train as a process group
        trained = launch_training(params, prepared, run_dir)
    else:
        trained = train_model(params, prepared, run_dir)
    final_table = RunLayout(run_dir).diagnostic(FINAL_WEIGHTS_TABLE)
    if final_table.is_file():
        result.tables["final_weights"] = pd.read_csv(final_table)
    parts, groups, lr_warnings = model_card(trained.task)
    result.tables["model_parts"] = parts
    result.tables["param_groups"] = groups
    model = trained.task.model.eval()
    normalizer = trained.datamodule.normalizer
    for split in prediction_splits(params):
        # chips dropped by the review ledger are still predicted, for the raw-label metrics beside the corrected
        positions = np.flatnonzero(prepared.catalog["review_split"].to_numpy() == split)
        if positions.size == 0:
            continue
        dataset = ChipDataset(
            prepared.store, positions, bands=prepared.bands, normalizer=normalizer, corrections=prepared.corrections
        )
        write_predictions(run_dir, split, model, dataset, params.data.batch_size, tta=params.evaluate.tta)
    metrics = dict(trained.metrics)

    multiclass = params.model.num_classes >= 2
    if use_out_of_fold(params, prepared.catalog):
        metrics.update(out_of_fold_predictions(params, prepared, run_dir, "train"))
    for split in ("val", "test"):
        if multiclass:  # argmax of the uncalibrated softmax; the calibration stage re-scores calibrated
            table, pooled, tables = evaluate_multiclass_split(params, run_dir, split)
            result.tables.update({f"{name}_{split}": frame for name, frame in tables.items()})
        else:
            table, pooled = evaluate_split(params, run_dir, split, params.evaluate.threshold)
        result.tables[f"per_chip_{split}"] = table
        metrics.update({f"{split}.{key}": value for key, value in pooled.items()})
    if prepared.ledger is not None and RunLayout(run_dir).label_corrected.is_file():
        result.tables["label_corrected"] = pd.read_csv(RunLayout(run_dir).label_corrected)
    curves = RunLayout(run_dir).training_log
    warnings = [("learning rate", text) for text in lr_warnings]
    if curves.is_file():
        save_stage_figure(training_curves(curves), run_dir, "training_curves", result)
        warnings += [("overfitting", text) for text in divergence_warnings(curves)]
    gallery = None if multiclass else validation_gallery(params, run_dir, result.tables["per_chip_val"])
    if gallery is not None:
        save_stage_figure(gallery, run_dir, "val_predictions", result)
    result.tables["warnings"] = pd.DataFrame(warnings, columns=["kind", "warning"])
    metrics["train.n_warnings"] = len(warnings)
    save_training_tables(run_dir, result)
    write_stage_metrics(run_dir, TRAINING, metrics)
    result.metrics = metrics
    return result


def validation_gallery(params: Params, run_dir: Path, per_chip_val: pd.DataFrame, n: int = 6) -> Any:
    """RGB | label | probability for up to `n` validation chips (worst to best IoU, then false alarms)."""

    chosen = pick_gallery_chips(per_chip_val, n)
    if not chosen:
        return None
    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    rgb = params.data.rgb_bands
    if not set(rgb) <= set(prepared.bands):
        rgb = tuple(prepared.bands[i % len(prepared.bands)] for i in range(3))  # type: ignore[assignment]
    predictions = load_predictions(run_dir, "val")
    rows = {int(v): i for i, v in enumerate(predictions["chip_index"].values)}
    subset = predictions.isel(chip=[rows[index] for index in chosen])
    table = per_chip_val.set_index("store_index")
    chips = []
    for index, image, label, valid, logit in iter_split_chips(prepared.store, subset, prepared.bands):
        row = table.loc[index]
        title = (
            f"{row['chip_id']} · IoU {row['iou']:.2f}"
            if np.isfinite(row["iou"])
            else f"{row['chip_id']} · nothing labelled or predicted"
        )
        chips.append((title, image, label, valid, sigmoid(logit, np.float32)))
    return prediction_gallery(chips, prepared.bands, rgb, threshold=params.evaluate.threshold)


def save_training_tables(run_dir: Path, result: StageResult) -> None:
    """Write the report tables of the training stage to `diagnostics/train_<name>.csv`."""

    for name in ("split_summary", "sampler_composition", "model_parts", "param_groups", "warnings"):
        write_text_atomic(RunLayout(run_dir).diagnostic(f"train_{name}.csv"), result.tables[name].to_csv(index=False))

"""Stage 2: train, save the model bundle, predict each needed split once, score val and test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workbench.params import Params
from workbench.stages.base import DIAGNOSTICS, StageResult, save_stage_figure, write_stage_metrics


def evaluate_split(params: Params, run_dir: Path, split: str, threshold: float, temperature: float = 1.0) -> Any:
    """Per-chip table and pooled metrics of one predicted split (written to diagnostics/)."""
    from workbench.data.prepare import load_prepared
    from workbench.evaluate.predict import load_predictions, per_chip_table, pooled_metrics
    from workbench.io import write_bytes_atomic

    prepared = load_prepared(run_dir, params.data)
    table = per_chip_table(
        prepared.store,
        prepared.catalog,
        load_predictions(run_dir, split),
        threshold=threshold,
        temperature=temperature,
        bands=prepared.bands,
        green=params.data.green_band,
        swir=params.data.swir_band,
        water_threshold=params.review.water_index_threshold,
    )
    buffer = table.to_parquet(index=False)
    assert buffer is not None
    write_bytes_atomic(Path(run_dir) / DIAGNOSTICS / f"per_chip_{split}.parquet", buffer)
    return table, pooled_metrics(table)


def prediction_splits(params: Params) -> list[str]:
    """Splits the run predicts once: val and test, plus those the review audits."""
    return list(dict.fromkeys(["val", "test", *params.review.splits]))


def run_training(params: Params, run_dir: Path) -> StageResult:
    """Train, save the model bundle, predict every needed split once, and score val/test at 0.5."""
    from workbench.data.dataset import ChipDataset
    from workbench.data.prepare import load_prepared
    from workbench.evaluate.predict import write_predictions
    from workbench.figures import training_curves
    from workbench.train.fit import train_model

    run_dir = Path(run_dir)
    prepared = load_prepared(run_dir, params.data)
    trained = train_model(params, prepared, run_dir)
    result = StageResult()
    result.tables["param_groups"] = trained.task.param_group_table()
    model = trained.task.model.eval()
    normalizer = trained.datamodule.normalizer
    for split in prediction_splits(params):
        positions = np.flatnonzero(prepared.catalog["split"].to_numpy() == split)
        if positions.size == 0:
            continue
        dataset = ChipDataset(prepared.store, positions, bands=prepared.bands, normalizer=normalizer)
        write_predictions(run_dir, split, model, dataset, params.data.batch_size, tta=params.evaluate.tta)
    metrics = dict(trained.metrics)
    for split in ("val", "test"):
        table, pooled = evaluate_split(params, run_dir, split, params.evaluate.threshold)
        result.tables[f"per_chip_{split}"] = table
        metrics.update({f"{split}.{key}": value for key, value in pooled.items()})
    write_stage_metrics(run_dir, "train", metrics)
    curves = run_dir / "logs" / "metrics.csv"
    if curves.is_file():
        save_stage_figure(training_curves(curves), run_dir, "training_curves", result)
    result.metrics = metrics
    return result

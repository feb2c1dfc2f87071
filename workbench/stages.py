"""The four stages of a run, each reading its inputs from and writing its outputs to the run directory.

Notebooks call these functions and show what they return; `workbench run` executes the
notebooks in order. Stages never share Python state: everything they hand over is a file under
`<run_dir>` (data/, model/, predictions/, diagnostics/, metrics/, figures/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.io import read_json, write_json_atomic
from workbench.params import Params

FIGURES = "figures"
METRICS = "metrics"
DIAGNOSTICS = "diagnostics"


@dataclass
class StageResult:
    """Metrics, tables and figure paths a stage produced (for the notebook to show)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)


def _save(fig: Any, run_dir: Path, name: str, result: StageResult) -> None:
    from workbench.figures import save_figure

    path = Path(run_dir) / FIGURES / f"{name}.png"
    save_figure(fig, path)
    result.figures[name] = path


def write_stage_metrics(run_dir: Path, stage: str, metrics: dict[str, Any]) -> Path:
    """Write one stage's flat metrics; the pipeline merges all of them into metrics.json."""
    return write_json_atomic(Path(run_dir) / METRICS / f"{stage}.json", metrics)


# --------------------------------------------------------------------------- 1. data audit


def run_data_audit(params: Params, run_dir: Path) -> StageResult:
    """Prepare the data (store, splits, normalisation) and summarise it."""
    from workbench.data.prepare import prepare_data
    from workbench.data.split import leakage_report
    from workbench.figures import class_balance_bar, split_map_static

    run_dir = Path(run_dir)
    prepared = prepare_data(params.data, run_dir, seed=params.seed)
    catalog = prepared.catalog
    result = StageResult()
    split_summary = (
        catalog.groupby("split")
        .agg(chips=("chip_id", "size"), positive_fraction=("positive_fraction", "mean"))
        .reindex(["train", "val", "test", "buffer"])
        .dropna(how="all")
    )
    region_summary = catalog.pivot_table(
        index="region", columns="split", values="positive_fraction", aggfunc="mean"
    ).round(4)
    leakage = leakage_report(catalog[catalog["split"] != "buffer"])
    result.tables.update(split_summary=split_summary, region_summary=region_summary, leakage=leakage)
    _save(class_balance_bar(catalog), run_dir, "class_balance", result)
    _save(
        split_map_static(catalog["lat"].to_numpy(), catalog["lon"].to_numpy(), catalog["split"].to_numpy()),
        run_dir,
        "split_map",
        result,
    )
    metrics: dict[str, Any] = {"data.n_chips": len(catalog), "data.bands": len(prepared.bands)}
    for split, row in split_summary.iterrows():
        metrics[f"data.{split}_chips"] = int(row["chips"])
        metrics[f"data.{split}_positive_fraction"] = float(row["positive_fraction"])
    if len(leakage):
        metrics["data.min_cross_split_km"] = float(leakage["min_distance_km"].min())
    if "noisy" in catalog:
        metrics["data.noisy_chips"] = int(catalog["noisy"].sum())
    write_stage_metrics(run_dir, "audit_data", metrics)
    result.metrics = metrics
    return result


# --------------------------------------------------------------------------- 2. training


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
        _save(training_curves(curves), run_dir, "training_curves", result)
    result.metrics = metrics
    return result


# --------------------------------------------------------------------------- 3. calibration


def _histogram_and_sample(
    params: Params, run_dir: Path, split: str, temperature: float, max_pixels: int = 2_000_000
) -> tuple[Any, np.ndarray, np.ndarray, dict[str, Any]]:
    """One pass over a split: a threshold histogram, a bounded pixel sample for fitting, per-region histograms."""
    from workbench.data.prepare import load_prepared
    from workbench.evaluate.metrics import ThresholdHistogram
    from workbench.evaluate.predict import iter_split_chips, load_predictions, sigmoid

    prepared = load_prepared(run_dir, params.data)
    predictions = load_predictions(run_dir, split)
    bins = params.evaluate.histogram_bins
    total = ThresholdHistogram(bins=bins)
    by_region: dict[str, Any] = {}
    rng = np.random.default_rng(params.seed)
    n_chips = predictions.sizes["chip"]
    per_chip = max(1, max_pixels // max(n_chips, 1))
    logits_sample, labels_sample = [], []
    for index, _, label, valid, logit in iter_split_chips(prepared.store, predictions):
        usable = valid & (label != 255)
        prob = sigmoid(logit / temperature)
        total.update(prob, label, valid)
        region = str(prepared.catalog.iloc[index]["region"])
        by_region.setdefault(region, ThresholdHistogram(bins=bins)).update(prob, label, valid)
        flat_logit, flat_label = logit[usable], (label[usable] > 0).astype(np.float32)
        if flat_logit.size > per_chip:
            keep = rng.choice(flat_logit.size, per_chip, replace=False)
            flat_logit, flat_label = flat_logit[keep], flat_label[keep]
        logits_sample.append(flat_logit)
        labels_sample.append(flat_label)
    return total, np.concatenate(logits_sample), np.concatenate(labels_sample), by_region


def run_calibration(params: Params, run_dir: Path) -> StageResult:
    """Fit temperature scaling on the calibration split, pick the threshold, and re-score the test split."""
    from workbench.calibrate import (
        Calibration,
        brier,
        choose_threshold,
        choose_thresholds_by_group,
        ece,
        fit_temperature,
        plot_reliability,
        reliability_table,
    )
    from workbench.evaluate.predict import sigmoid

    run_dir = Path(run_dir)
    cfg = params.calibrate
    result = StageResult()
    _, logits, labels, _ = _histogram_and_sample(params, run_dir, cfg.split, temperature=1.0)
    temperature = float(fit_temperature(logits, labels))
    before, after = sigmoid(logits), sigmoid(logits / temperature)
    hist, _, _, by_region = _histogram_and_sample(params, run_dir, cfg.split, temperature)
    choice = choose_threshold(
        hist,
        rule=cfg.threshold_rule,
        target_precision=cfg.target_precision,
        thresholds=np.asarray(params.evaluate.sweep_thresholds),
        fixed_threshold=params.evaluate.threshold,
    )
    region_thresholds = (
        choose_thresholds_by_group(
            by_region,
            rule=cfg.threshold_rule,
            target_precision=cfg.target_precision,
            thresholds=np.asarray(params.evaluate.sweep_thresholds),
        )
        if cfg.per_region
        else {}
    )
    calibration = Calibration(
        temperature=temperature,
        threshold=float(choice["threshold"]),
        rule=cfg.threshold_rule,
        per_region={k: float(v["threshold"]) for k, v in region_thresholds.items()},
        ece_before=float(ece(before, labels, bins=cfg.ece_bins)),
        ece_after=float(ece(after, labels, bins=cfg.ece_bins)),
        brier_before=float(brier(before, labels)),
        brier_after=float(brier(after, labels)),
    )
    calibration.save(run_dir / "model" / "calibration.json")
    sweep = hist.sweep(np.asarray(params.evaluate.sweep_thresholds))
    write_json_atomic(run_dir / DIAGNOSTICS / "threshold_sweep.json", sweep.to_dict(orient="records"))
    tables = {
        "uncalibrated": reliability_table(before, labels, bins=cfg.ece_bins),
        "calibrated": reliability_table(after, labels, bins=cfg.ece_bins),
    }
    _save(plot_reliability(tables), run_dir, "reliability", result)
    test_table, test_metrics = evaluate_split(params, run_dir, "test", calibration.threshold, temperature)
    per_region = {
        str(region): {"iou": float(g["tp"].sum() / max(g["tp"].sum() + g["fp"].sum() + g["fn"].sum(), 1))}
        for region, g in test_table.groupby("region")
    }
    write_json_atomic(run_dir / DIAGNOSTICS / "per_region.json", per_region)
    metrics = {
        "calibration.temperature": temperature,
        "calibration.threshold": calibration.threshold,
        "calibration.ece_before": calibration.ece_before,
        "calibration.ece_after": calibration.ece_after,
        "calibration.brier_before": calibration.brier_before,
        "calibration.brier_after": calibration.brier_after,
        "calibration.val_pr_auc": float(hist.pr_auc()),
    }
    metrics.update({f"test.calibrated_{k}": v for k, v in test_metrics.items() if isinstance(v, float)})
    write_stage_metrics(run_dir, "calibration", metrics)
    result.metrics = metrics
    result.tables.update(
        threshold_sweep=sweep,
        per_region=pd.DataFrame(per_region).T,
        worst_chips=(test_table.dropna(subset=["iou"]).nsmallest(10, "iou")),
    )
    return result


# --------------------------------------------------------------------------- 4. label-noise review


def run_review(params: Params, run_dir: Path) -> StageResult:
    """Rank chips by label suspicion, score the ranking against injected noise, draw four-panel figures."""
    from workbench.data.prepare import load_prepared
    from workbench.evaluate.predict import iter_split_chips, load_predictions, sigmoid
    from workbench.figures import four_panel, four_panel_filename
    from workbench.io import write_bytes_atomic
    from workbench.review import ReviewChip, prefilter_table, review_table, top_k_scores

    run_dir = Path(run_dir)
    cfg = params.review
    prepared = load_prepared(run_dir, params.data)
    calibration_file = run_dir / "model" / "calibration.json"
    calibration = read_json(calibration_file) if calibration_file.is_file() else {}
    temperature = float(calibration.get("temperature", 1.0))
    threshold = float(calibration.get("threshold", params.evaluate.threshold))
    catalog = prepared.catalog

    def chips() -> Any:
        for split in cfg.splits:
            if not (catalog["split"] == split).any():
                continue
            for index, image, label, valid, logit in iter_split_chips(
                prepared.store, load_predictions(run_dir, split), prepared.bands
            ):
                yield ReviewChip(
                    row={str(k): v for k, v in catalog.iloc[index].items()},
                    image=image,
                    band_names=prepared.bands,
                    label=label,
                    valid=valid,
                    prob=sigmoid(logit / temperature),
                )

    table = review_table(
        chips(), cfg, threshold=threshold, green=params.data.green_band, swir=params.data.swir_band, progress=False
    )
    buffer = table.to_parquet(index=False)
    assert buffer is not None
    write_bytes_atomic(run_dir / DIAGNOSTICS / "review.parquet", buffer)
    result = StageResult(tables={"ranking": table.head(25), "prefilter": prefilter_table(table)})
    metrics: dict[str, Any] = {"audit.n_chips": len(table)}
    if "noisy" in table:
        k = cfg.top_k or max(int(table["noisy"].sum()), 1)
        scores = top_k_scores(table, k)
        metrics.update(
            {"audit.k": k, "audit.top_k_precision": scores["precision"], "audit.top_k_recall": scores["recall"]}
        )
    top = table.nsmallest(cfg.n_figures, "rank")
    wanted = set(top["chip_id"])
    for chip in chips():
        if chip.row["chip_id"] not in wanted:
            continue
        row = top[top["chip_id"] == chip.row["chip_id"]].iloc[0]
        title = (
            f"{row['chip_id']} · {row['region']} {int(row['year'])} · "
            f"{row['lat']:.4f}N {row['lon']:.4f}E · score {row['score']:.2f}"
        )
        fig = four_panel(
            chip.image,
            chip.band_names,
            chip.label,
            chip.prob,
            chip.valid,
            title,
            water_threshold=cfg.water_index_threshold,
            threshold=threshold,
            green=params.data.green_band,
            swir=params.data.swir_band,
        )
        name = Path(four_panel_filename(int(row["year"]), float(row["lat"]), float(row["lon"]))).stem
        _save(fig, run_dir, f"review/{int(row['rank']):02d}_{name}", result)
    write_stage_metrics(run_dir, "review", metrics)
    result.metrics = metrics
    return result

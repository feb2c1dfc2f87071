"""Stage 3: temperature scaling, threshold choice and calibrated test scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.io import write_json_atomic
from workbench.params import Params
from workbench.stages.base import DIAGNOSTICS, StageResult, save_stage_figure, write_stage_metrics
from workbench.stages.training import evaluate_split


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
    save_stage_figure(plot_reliability(tables), run_dir, "reliability", result)
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

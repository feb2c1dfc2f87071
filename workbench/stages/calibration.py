"""Stage 3: temperature scaling, threshold choice and the calibrated evaluation of the test split.

Reads only files of the run directory (data/, model/, predictions/) and reads the stored logits of
each split once: the calibration split (`calibrate.split`, spatially disjoint from train and test
under the block split) gives the temperature and the operating threshold(s); the test split is
then scored with them. Writes model/calibration.json, diagnostics/*.json, a per-chip parquet,
figures and metrics/calibration.json. The TTA comparison is the only step that runs the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.data.dataset import ChipDataset
from workbench.data.ledger import DROPPED_SPLIT
from workbench.data.prepare import load_prepared
from workbench.evaluate.calibration import Calibration, choose_threshold, choose_thresholds_by_group
from workbench.evaluate.chips import label_corrected_table, raw_and_corrected_counts
from workbench.evaluate.metrics import group_metrics
from workbench.evaluate.scoring import (
    calibration_quality,
    evaluate_predictions,
    iter_label_logits,
    object_metrics,
    object_table,
    pooled_summary,
    pr_curve_record,
    prevalence_metrics,
    prevalence_table,
    tta_comparison,
)
from workbench.figures import plot_pr_curves_with_baseline, plot_reliability_grid
from workbench.functional import MetricInputError
from workbench.infer.chips import load_predictions
from workbench.io import write_json_atomic, write_parquet_atomic, write_text_atomic
from workbench.models.bundle import load_bundle
from workbench.params import Params
from workbench.run import CALIBRATION, RunLayout
from workbench.stages.base import StageResult, save_stage_figure, write_stage_metrics

WORST_CHIPS = 10


def _records(table: pd.DataFrame, key: str) -> dict[str, dict[str, Any]]:
    """A group table as {group value: row} for JSON."""
    return {str(row[key]): {str(k): v for k, v in row.items() if k != key} for row in table.to_dict(orient="records")}


def _scan_split(
    params: Params, run_dir: Path, prepared: Any, split: str, calibration: Any = None, max_sample: int = 1_000_000
) -> Any:
    """One pass over a split's stored logits (see `workbench.evaluate.scoring.evaluate_predictions`)."""

    predictions = load_predictions(run_dir, split)
    corrections, dropped = _ledger_view(prepared)
    return evaluate_predictions(
        iter_label_logits(prepared.store, predictions, corrections=corrections, skip=dropped),
        prepared.catalog,
        calibration=calibration,
        object_iou=params.evaluate.object_iou,
        max_sample=max_sample,
        seed=params.seed,
        total=int(predictions.sizes["chip"]) - len(set(dropped) & set(predictions["chip_index"].values.tolist())),
        progress=params.train.progress_bar,
    )


def _ledger_view(prepared: Any) -> tuple[dict[int, Path], list[int]]:
    """Corrected labels and dropped store positions when a review ledger is applied (else none)."""
    if prepared.ledger is None:
        return {}, []
    dropped = np.flatnonzero(prepared.catalog["split"].to_numpy() == DROPPED_SPLIT).tolist()
    return dict(prepared.corrections), dropped


def label_corrected_report(
    params: Params, run_dir: Path, prepared: Any, calibration: Calibration, splits: list[str]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Raw against label-corrected metrics per split and region at the calibrated temperature and thresholds.

    Written to diagnostics/label_corrected_calibrated.csv; the metrics are ``<split>.calibrated_iou_raw``,
    ``<split>.calibrated_iou_corrected`` (the same as ``<split>.calibrated_iou`` of the corrected pass),
    their F1 twins, and the numbers of dropped and fixed chips.
    """
    frames, metrics = [], {}
    for split in splits:
        counts = raw_and_corrected_counts(
            prepared.store,
            prepared.catalog,
            load_predictions(run_dir, split),
            prepared.corrections,
            calibration.temperature,
            calibration.threshold_for,
        )
        table = label_corrected_table(counts).assign(split=split)
        frames.append(table)
        overall = table.iloc[0]
        for key in ("iou_raw", "iou_corrected", "f1_raw", "f1_corrected"):
            metrics[f"{split}.calibrated_{key}"] = float(overall[key])
        metrics[f"{split}.n_dropped"] = int(overall["n_dropped"])
        metrics[f"{split}.n_fixed"] = int(overall["n_fixed"])
    report = pd.concat(frames, ignore_index=True)
    report = report[["split", *[c for c in report.columns if c != "split"]]]
    write_text_atomic(RunLayout(run_dir).label_corrected_calibrated, report.to_csv(index=False))
    return report, metrics


def _choose_thresholds(params: Params, evaluation: Any, temperature: float) -> tuple[dict[str, Any], pd.DataFrame]:
    """The global threshold (and per-region ones when asked) on calibrated probabilities, plus a comparison table.

    The table also shows what the same rule picks on uncalibrated probabilities (T = 1): the
    threshold moves with the temperature, which is why it is chosen after calibrating.
    """

    cfg, bins = params.calibrate, params.evaluate.histogram_bins
    rule: dict[str, Any] = {
        "rule": cfg.threshold_rule,
        "target_precision": cfg.target_precision,
        "thresholds": np.asarray(params.evaluate.sweep_thresholds),
        "fixed_threshold": params.evaluate.threshold,
    }
    chosen = choose_threshold(evaluation.logits.threshold_histogram(temperature, bins), **rule)
    uncalibrated = choose_threshold(evaluation.logits.threshold_histogram(1.0, bins), **rule)
    rows = [{"probabilities": "uncalibrated (T = 1)", "group": "all", **uncalibrated}]
    rows.append({"probabilities": f"calibrated (T = {temperature:.3f})", "group": "all", **chosen})
    per_region: dict[str, float] = {}
    if cfg.per_region:
        rule.pop("fixed_threshold")
        hists = {g: h.threshold_histogram(temperature, bins) for g, h in evaluation.groups.items()}
        for region, choice in choose_thresholds_by_group(hists, **rule).items():
            per_region[region] = float(choice["threshold"])
            rows.append({"probabilities": "calibrated", "group": region, **choice})
    return {"choice": chosen, "per_region": per_region}, pd.DataFrame(rows)


def _prevalence(params: Params, evaluation: Any, threshold: float) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """Prevalence table and curves; an empty table and the reason when the test split cannot be re-weighted."""

    is_positive = evaluation.per_chip["label_pixels"].to_numpy() > 0
    try:
        table, curves = prevalence_table(
            evaluation.chip_pos, evaluation.chip_neg, is_positive, params.evaluate.prevalences, threshold
        )
    except MetricInputError as exc:
        return pd.DataFrame(), {}, f"prevalence re-weighting skipped: {exc}"
    return table, curves, ""


def _tta(params: Params, run_dir: Path, prepared: Any, temperature: float, threshold: float, max_chips: int) -> Any:
    """TTA comparison on the first `max_chips` val chips with the saved model bundle."""

    split = "val" if (prepared.catalog["split"] == "val").any() else params.calibrate.split
    positions = np.flatnonzero(prepared.catalog["split"].to_numpy() == split)
    bundle = load_bundle(RunLayout(run_dir).model)
    dataset = ChipDataset(
        prepared.store, positions, bands=bundle.bands, normalizer=bundle.normalization, corrections=prepared.corrections
    )
    table = tta_comparison(
        bundle.model,
        dataset,
        temperature=temperature,
        threshold=threshold,
        batch_size=params.data.batch_size,
        max_chips=max_chips,
        progress=params.train.progress_bar,
    )
    table.insert(0, "split", split)
    return table


def run_calibration(params: Params, run_dir: Path, tta_chips: int = 64, max_sample: int = 1_000_000) -> StageResult:
    """Fit temperature scaling, choose thresholds after calibrating, and score the test split with both.

    A softmax model (model.num_classes >= 2) goes to `workbench.stages.mc_calibration`.

    `tta_chips` bounds the TTA comparison (0 skips it); `max_sample` bounds the pixel sample used for
    ECE, MCE, Brier and reliability diagrams.
    """

    if params.model.num_classes >= 2:  # softmax: temperature(s), class-of-interest threshold, argmax decisions
        from workbench.stages.mc_calibration import run_multiclass_calibration

        return run_multiclass_calibration(params, run_dir, max_sample)
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    layout.check_params(params)
    cfg, bins = params.calibrate, params.evaluate.histogram_bins
    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    result = StageResult()
    diagnostics = layout.diagnostics

    # calibration split: one pass -> temperature, thresholds, calibration scores
    cal = _scan_split(params, run_dir, prepared, cfg.split, max_sample=max_sample)
    temperature = float(cal.logits.fit_temperature())
    chosen, threshold_table = _choose_thresholds(params, cal, temperature)
    cal_quality, cal_tables = calibration_quality(cal.sample.logits, cal.sample.targets, temperature, cfg.ece_bins)
    calibration = Calibration(
        temperature=temperature,
        threshold=float(chosen["choice"]["threshold"]),
        rule=cfg.threshold_rule,
        target_precision=cfg.target_precision if cfg.threshold_rule == "target_precision" else None,
        per_region=chosen["per_region"],
        ece_before=cal_quality["ece_before"],
        ece_after=cal_quality["ece_after"],
        brier_before=cal_quality["brier_before"],
        brier_after=cal_quality["brier_after"],
        extra={"split": cfg.split, "ece_bins": cfg.ece_bins, "choice": chosen["choice"], **cal_quality},
    )
    calibration.save(layout.calibration)

    # test split: one pass at the chosen temperature and thresholds
    test = _scan_split(params, run_dir, prepared, "test", calibration, max_sample)
    test_quality, test_tables = calibration_quality(test.sample.logits, test.sample.targets, temperature, cfg.ece_bins)
    grid = np.asarray(params.evaluate.sweep_thresholds)
    hists = {
        cfg.split: cal.logits.threshold_histogram(temperature, bins),
        "test": test.logits.threshold_histogram(temperature, bins),
    }
    sweep = pd.concat([h.sweep(grid).assign(split=name) for name, h in hists.items()], ignore_index=True)
    pr_curves = {name: pr_curve_record(h) for name, h in hists.items()}
    per_chip = test.per_chip
    summary = pooled_summary(per_chip)
    per_region = group_metrics(per_chip, "region")
    per_region["threshold"] = [
        calibration.threshold_for(str(r)) if r != "all" else np.nan for r in per_region["region"]
    ]
    per_year = group_metrics(per_chip, "year")
    prevalence, prevalence_curves, prevalence_note = _prevalence(params, test, calibration.threshold)
    objects = object_table(test.objects)
    quality = pd.DataFrame({cfg.split: cal_quality, "test": test_quality}).T

    write_json_atomic(diagnostics / "threshold_sweep.json", sweep.to_dict(orient="records"))
    write_json_atomic(diagnostics / "thresholds.json", threshold_table.to_dict(orient="records"))
    write_json_atomic(diagnostics / "calibration_quality.json", quality.to_dict(orient="index"))
    write_json_atomic(diagnostics / "pr_curves.json", pr_curves)
    write_json_atomic(diagnostics / "per_region.json", _records(per_region, "region"))
    write_json_atomic(diagnostics / "per_year.json", _records(per_year.astype({"year": str}), "year"))
    write_json_atomic(
        diagnostics / "prevalence.json",
        {"table": prevalence.to_dict(orient="records"), "curves": prevalence_curves, "note": prevalence_note},
    )
    write_json_atomic(diagnostics / "objects.json", objects.to_dict(orient="records"))
    write_parquet_atomic(diagnostics / "per_chip_test_calibrated.parquet", per_chip)

    save_stage_figure(
        plot_reliability_grid({cfg.split: cal_tables, "test": test_tables}), run_dir, "reliability", result
    )
    save_stage_figure(
        plot_pr_curves_with_baseline(pr_curves, "Precision-recall, calibrated"), run_dir, "pr_curves", result
    )
    if prevalence_curves:
        fig = plot_pr_curves_with_baseline(prevalence_curves, "Test, positive:negative chips 1:N", log_precision=True)
        save_stage_figure(fig, run_dir, "prevalence_pr", result)

    metrics: dict[str, Any] = {
        "calibration.temperature": temperature,
        "calibration.threshold": calibration.threshold,
        **{f"calibration.{k}": v for k, v in cal_quality.items()},
        "calibration.val_pr_auc": pr_curves[cfg.split]["pr_auc"],
        "test.pr_auc": pr_curves["test"]["pr_auc"],
        **{f"test.{k}": v for k, v in test_quality.items()},
    }
    metrics.update({f"test.calibrated_{k}": v for k, v in summary.items() if isinstance(v, float) and "/" not in k})
    if len(prevalence):
        metrics.update(prevalence_metrics(prevalence, "test"))
    metrics.update(object_metrics(objects, "test"))

    tables: dict[str, pd.DataFrame] = {}
    if tta_chips > 0:
        tta = _tta(params, run_dir, prepared, temperature, calibration.threshold, tta_chips)
        write_json_atomic(diagnostics / "tta.json", tta.to_dict(orient="records"))
        for _, row in tta.iterrows():
            metrics[f"val.tta_iou_{row['mode']}"] = float(row["iou"])
            metrics[f"val.tta_seconds_{row['mode']}"] = float(row["seconds"])
        tables["tta"] = tta

    if prepared.ledger is not None:  # a review ledger applied: raw and label-corrected side by side
        splits = list(dict.fromkeys([cfg.split, "test"]))
        tables["label_corrected"], corrected_metrics = label_corrected_report(
            params, run_dir, prepared, calibration, splits
        )
        metrics.update(corrected_metrics)

    write_stage_metrics(run_dir, CALIBRATION, metrics)
    result.metrics = metrics
    result.tables.update(
        thresholds=threshold_table,
        threshold_sweep=sweep,
        calibration_quality=quality,
        test_summary=pd.Series(summary, name="test").to_frame(),
        per_region=per_region,
        per_year=per_year,
        prevalence=prevalence,
        objects=objects,
        worst_chips=per_chip.dropna(subset=["iou"]).nsmallest(WORST_CHIPS, "iou"),
        **tables,
    )
    return result

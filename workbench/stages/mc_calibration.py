"""Stage 3 for a softmax model (model.num_classes >= 2): temperature scaling, a class-of-interest threshold
and the calibrated evaluation of the test split.

The calibration split (`calibrate.split`) gives one temperature, or one per class with
`calibrate.per_class_temperature`, fitted on a pixel sample of its stored logits; with
`calibrate.class_of_interest` that class also gets its own probability threshold, chosen on the same
split by `calibrate.threshold_rule` for the decision actually used (the class wins where its calibrated
probability reaches the threshold, the argmax decides elsewhere). The record goes to
model/calibration.json (`decision: argmax`) through `workbench.models.bundle.write_calibration`, so the
bundle's checksums cover it. Reliability tables (top-label and one-vs-rest per class, before and after)
go to `diagnostics/reliability_<split>.csv`; the test split is re-scored with the calibration into
`per_chip_test_calibrated.parquet`, `confusion_test_calibrated*.csv` and `class_metrics_test_calibrated.csv`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.arrays import IGNORE_INDEX
from workbench.data.prepare import load_prepared
from workbench.evaluate.calibration import (
    choose_threshold,
    class_probabilities,
    fit_class_temperature,
    multiclass_ece,
    reliability_table,
)
from workbench.evaluate.chips import iter_split_chips
from workbench.evaluate.multiclass import chip_confusions, split_scores, write_split_tables
from workbench.functional import score
from workbench.infer.chips import load_predictions
from workbench.io import write_text_atomic
from workbench.models.bundle import write_calibration
from workbench.params import Params, resolve_classes
from workbench.run import CALIBRATION, RunLayout
from workbench.stages.base import StageResult, write_stage_metrics

CALIBRATED = "test_calibrated"  # the split key of the calibrated test tables


def sample_pixels(
    store: Path, predictions: Any, max_sample: int, seed: int, bands: list[str] | None = None, corrections: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (P, C) and class labels (P,) of the labelled valid pixels of a split, at most `max_sample`
    of them: every pixel when the split has no more, else a seeded uniform sample (each chip keeps its pixels
    with probability max_sample / split pixels as it is read, so memory stays bounded, then trimmed)."""
    logits: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    shape = predictions["logit"].shape
    rate = min(1.0, max_sample / max(1, int(shape[0]) * int(shape[2]) * int(shape[3])))
    for _index, _image, label, valid, logit in iter_split_chips(store, predictions, bands, corrections):
        keep = np.asarray(valid, dtype=bool) & (np.asarray(label) != IGNORE_INDEX)
        if rate < 1.0:
            keep &= rng.random(keep.shape) < rate
        logits.append(np.moveaxis(logit, 0, -1)[keep].astype(np.float32))
        labels.append(np.asarray(label)[keep].astype(np.int64))
    n_classes = int(predictions["logit"].shape[1])
    pixels = np.concatenate(logits).astype(np.float64) if logits else np.zeros((0, n_classes))
    classes = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    if classes.size > max_sample:
        pick = np.sort(rng.choice(classes.size, max_sample, replace=False))
        pixels, classes = pixels[pick], classes[pick]
    return pixels, classes


class _DecisionSweep:
    """What `choose_threshold` needs (`sweep`) for a class-of-interest threshold: counts of the decision
    "class c where p_c >= t, else the argmax" against the labels, at each threshold t."""

    def __init__(self, prob: np.ndarray, labels: np.ndarray, class_index: int) -> None:
        self.is_class = labels == class_index
        self.by_argmax = prob.argmax(axis=1) == class_index  # decided c whatever the threshold
        self.prob = prob[:, class_index]

    def sweep(self, thresholds: Any, class_index: int = 0) -> pd.DataFrame:
        t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        rows = []
        for value in t:
            decided = self.by_argmax | (self.prob >= value)
            tp = float(np.sum(decided & self.is_class))
            fp = float(np.sum(decided & ~self.is_class))
            fn = float(np.sum(~decided & self.is_class))
            tn = float(np.sum(~decided & ~self.is_class))
            rows.append({"threshold": float(value), "tp": tp, "fp": fp, "fn": fn, "tn": tn})
        table = pd.DataFrame(rows)
        counts = [table[k].to_numpy() for k in ("tp", "fp", "fn", "tn")]
        for metric in ("iou", "f1", "precision", "recall"):
            table[metric] = score(metric, *counts)  # type: ignore[arg-type]
        return table


def choose_class_threshold(
    prob: np.ndarray,
    labels: np.ndarray,
    class_index: int,
    rule: Any = "best_iou",
    target_precision: float = 0.8,
    thresholds: Any = None,
    fixed_threshold: float = 0.5,
) -> dict[str, Any]:
    """The class-of-interest threshold of calibrated pixel probabilities (P, C) by the binary threshold rule
    (`workbench.evaluate.calibration.choose_threshold`), scoring the decision `predict_classes` makes."""
    return choose_threshold(
        _DecisionSweep(prob, labels, class_index),  # type: ignore[arg-type]
        rule=rule,
        target_precision=target_precision,
        thresholds=thresholds,
        fixed_threshold=fixed_threshold,
    )


def reliability_tables(prob: np.ndarray, labels: np.ndarray, names: list[str], bins: int) -> pd.DataFrame:
    """Reliability bins, long format: `kind` top_label (confidence max_c p_c vs argmax correct) and
    class (p_c vs label == c, one block per `class`)."""
    top = reliability_table(prob.max(axis=1), (prob.argmax(axis=1) == labels).astype(np.float64), bins)
    parts = [top.assign(kind="top_label", **{"class": "all"})]
    for c, name in enumerate(names):
        table = reliability_table(prob[:, c], (labels == c).astype(np.float64), bins)
        parts.append(table.assign(kind="class", **{"class": name}))
    return pd.concat(parts, ignore_index=True)


def _quality(prob_before: np.ndarray, prob_after: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for when, prob in (("before", prob_before), ("after", prob_after)):
        out[f"ece_top_label_{when}"] = multiclass_ece(prob, labels, bins, "top_label")
        out[f"ece_classwise_{when}"] = multiclass_ece(prob, labels, bins, "classwise")
        picked = np.clip(prob[np.arange(labels.size), labels], 1e-12, 1.0)
        out[f"nll_{when}"] = float(-np.mean(np.log(picked)))
    return out


def _pixel_probabilities(logits: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    """Calibrated probabilities (P, C) of pixel logits (P, C) through `class_probabilities` ((N, C, H, W))."""
    return class_probabilities(logits.T[None, :, :, None], calibration)[0, :, :, 0].T


def run_multiclass_calibration(params: Params, run_dir: Path, max_sample: int = 1_000_000) -> StageResult:
    """Fit the temperature(s) and class-of-interest threshold of a softmax model, write calibration.json and
    reliability tables, and score the test split with the calibration."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    layout.check_params(params)
    cfg, bins = params.calibrate, params.calibrate.ece_bins
    names = [spec.name for spec in resolve_classes(params.model)]
    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    corrections = prepared.corrections if prepared.ledger is not None else None
    result = StageResult()

    def pixels(split: str) -> tuple[np.ndarray, np.ndarray]:
        predictions = load_predictions(run_dir, split)
        if predictions["logit"].ndim != 4 or predictions["logit"].shape[1] != len(names):
            raise ValueError(
                f"{layout.predictions(split)} holds logits of shape {tuple(predictions['logit'].shape)}, not "
                f"(chip, {len(names)}, y, x) for model.num_classes={len(names)}; run the training stage again"
            )
        return sample_pixels(prepared.store, predictions, max_sample, params.seed, prepared.bands, corrections)

    cal_logits, cal_labels = pixels(cfg.split)
    if cal_labels.size and cal_labels.max() >= len(names):
        raise ValueError(f"the {cfg.split} split holds label value {int(cal_labels.max())}, not a class of {names}")
    temperature = fit_class_temperature(cal_logits, cal_labels, per_class=cfg.per_class_temperature)
    calibration: dict[str, Any] = {
        "decision": "argmax",
        "num_classes": len(names),
        "classes": names,
        "temperature": temperature,
        "split": cfg.split,
        "ece_bins": bins,
        "pixels": int(cal_labels.size),
    }
    cal_before = _pixel_probabilities(cal_logits, None)
    cal_after = _pixel_probabilities(cal_logits, calibration)
    metrics: dict[str, Any] = {}
    if cfg.class_of_interest is not None:
        c = names.index(cfg.class_of_interest)
        choice = choose_class_threshold(
            cal_after,
            cal_labels,
            c,
            rule=cfg.threshold_rule,
            target_precision=cfg.target_precision,
            thresholds=params.evaluate.sweep_thresholds,
            fixed_threshold=params.evaluate.threshold,
        )
        calibration["class_thresholds"] = {cfg.class_of_interest: choice["threshold"]}
        calibration["class_threshold_choice"] = {cfg.class_of_interest: choice}
        metrics[f"calibration.class_threshold.{cfg.class_of_interest}"] = choice["threshold"]
        result.tables["class_threshold"] = pd.DataFrame([{"class": cfg.class_of_interest, **choice}])
    cal_quality = _quality(cal_before, cal_after, cal_labels, bins)
    calibration.update(cal_quality)
    write_calibration(layout.model, calibration, params.model)

    test_logits, test_labels = pixels("test")
    test_quality = _quality(
        _pixel_probabilities(test_logits, None), _pixel_probabilities(test_logits, calibration), test_labels, bins
    )
    reliability = {
        cfg.split: pd.concat(
            [
                reliability_tables(cal_before, cal_labels, names, bins).assign(calibrated=False),
                reliability_tables(cal_after, cal_labels, names, bins).assign(calibrated=True),
            ],
            ignore_index=True,
        ),
        "test": pd.concat(
            [
                reliability_tables(_pixel_probabilities(test_logits, None), test_labels, names, bins).assign(
                    calibrated=False
                ),
                reliability_tables(_pixel_probabilities(test_logits, calibration), test_labels, names, bins).assign(
                    calibrated=True
                ),
            ],
            ignore_index=True,
        ),
    }
    for split, table in reliability.items():
        write_text_atomic(layout.reliability(split), table.to_csv(index=False))
        result.tables[f"reliability_{split}"] = table

    # the test split decided with the calibration (per-class temperatures and class thresholds move the argmax)
    per_chip, matrices = chip_confusions(
        prepared.store,
        prepared.catalog,
        load_predictions(run_dir, "test"),
        names,
        calibration,
        bands=prepared.bands,
        corrections=corrections,
    )
    scores, tables = split_scores(per_chip, matrices, names)
    write_split_tables(run_dir, CALIBRATED, per_chip, tables)

    if isinstance(temperature, list):
        metrics.update({f"calibration.temperature.{n}": t for n, t in zip(names, temperature, strict=True)})
    else:
        metrics["calibration.temperature"] = temperature
    metrics.update({f"calibration.{k}": v for k, v in cal_quality.items()})
    metrics.update({f"test.{k}": v for k, v in test_quality.items()})
    for key, value in scores.items():
        metrics[f"test.calibrated_{key}"] = ",".join(value) if key == "absent_classes" else value
    write_stage_metrics(run_dir, CALIBRATION, metrics)
    result.metrics = metrics
    quality = pd.DataFrame({cfg.split: cal_quality, "test": test_quality}).T
    result.tables.update(
        calibration_quality=quality,
        per_chip_test_calibrated=per_chip,
        **{f"{name}_{CALIBRATED}": frame for name, frame in tables.items()},
    )
    return result

"""The evaluation engine: scores a split's stored predictions in ONE pass over its logits.

`evaluate_predictions` reads each chip's logits, label and valid mask once and accumulates:

* `LogitHistogram`: exact counts of every float16 logit value, positive and negative pixels
  apart (stored logits are float16, so 65,536 bins hold them without loss). The temperature fit,
  calibrated threshold histograms, threshold sweeps and PR curves for ANY temperature follow
  from it without reading the logits again; one is kept per group (region) as well.
* `PixelSample`: a uniform random sample of (logit, target) pixels of bounded size, for the
  calibration scores that need single pixels (ECE with equal-mass bins, MCE, Brier, reliability).
* With a `Calibration` (temperature and thresholds chosen beforehand on another split): the
  per-chip confusion counts at the operating threshold, per-chip probability histograms for the
  prevalence re-weighting, and object matches (connected components).

A pixel counts when ``valid`` is True and ``label != 255``; it is positive when its label is
neither 0 nor 255 and predicted positive when its calibrated probability is ``>= threshold``
(the rule of `ThresholdHistogram`, so threshold choice and scoring agree).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from workbench.arrays import IGNORE_INDEX
from workbench.data.ledger import load_corrected
from workbench.data.store import ChipReader
from workbench.evaluate.calibration import (
    Calibration,
    apply_temperature,
    brier,
    ece,
    fit_temperature,
    mce,
    reliability_table,
)
from workbench.evaluate.chips import chip_counts, chip_identity
from workbench.evaluate.metrics import PrevalenceEvaluator, ThresholdHistogram, per_chip_histograms
from workbench.evaluate.objects import DEFAULT_IOU_THRESHOLDS, ObjectMatcher
from workbench.functional import mark_undefined_without_positives, metrics_from_counts, segmentation_summary
from workbench.infer.tta import TTA_MODES, predict_with_tta

if TYPE_CHECKING:
    import xarray as xr

FLOAT16_CODES = 1 << 16
FLOAT16_MAX = float(np.finfo(np.float16).max)
DEFAULT_SIZE_BINS = (0.0, 10.0, 100.0, 1000.0, math.inf)  # object area in pixels (at 10 m: 0.001, 0.01, 0.1 km2)
TTA_COMPARISON_MODES = ("none", "minimal", "standard", "full")
ChipArrays = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # store index, label, valid, logit


class ReportInputError(ValueError):
    """Inputs to the evaluation report are inconsistent; the message says which and what was expected."""


# --------------------------------------------------------------------------- reading a split


def iter_label_logits(
    store: Path,
    predictions: xr.Dataset,
    batch: int = 32,
    corrections: Mapping[int, Path] | None = None,
    skip: Collection[int] = (),
) -> Iterator[ChipArrays]:
    """Yield (store index, label, valid, logit) per predicted chip; images are not read.

    Logits are read `batch` chips at a time (one zarr read per batch instead of one per chip). With a
    review ledger applied, `corrections` (store index -> corrected label file) replace those chips' labels
    and the chips in `skip` (judged "drop") are left out.
    """

    labels, valids = ChipReader(store, "label"), ChipReader(store, "valid")
    indices = np.asarray(predictions["chip_index"].values, dtype=np.int64)
    logits = predictions["logit"]
    corrections = corrections or {}
    skipped = {int(index) for index in skip}
    for start in range(0, indices.size, batch):
        block = np.asarray(logits.isel(chip=slice(start, start + batch)).values)
        for offset, index in enumerate(indices[start : start + batch]):
            chip = int(index)
            if chip in skipped:
                continue
            label = labels.read(chip)
            if chip in corrections:
                label = load_corrected(corrections[chip], label.shape)
            yield chip, label, valids.read(chip).astype(bool), block[offset]


def _usable_and_positive(label: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    label = np.asarray(label)
    usable = label != IGNORE_INDEX
    if valid is not None:
        usable &= np.asarray(valid, dtype=bool)
    return usable, usable & (label != 0)


# --------------------------------------------------------------------------- accumulators


class LogitHistogram:
    """Counts of each float16 logit value over usable pixels, positives and negatives apart.

    Logits are rounded to float16 (exact for logits stored as float16, a relative error below
    1e-3 otherwise). NaN logits on usable pixels are an error; +-inf are clipped to the float16 range.
    """

    def __init__(self) -> None:
        self.pos = np.zeros(FLOAT16_CODES, dtype=np.int64)
        self.neg = np.zeros(FLOAT16_CODES, dtype=np.int64)

    def update(self, logit: Any, label: Any, valid: Any = None) -> LogitHistogram:
        """Add one chip or batch (same shapes for logit, label and valid); returns self."""
        logit_arr = np.asarray(logit)
        if logit_arr.shape != np.shape(label):
            raise ReportInputError(f"logit has shape {logit_arr.shape} but label has shape {np.shape(label)}")
        usable, positive = _usable_and_positive(label, valid)
        codes = logit_arr.astype(np.float16)[usable].view(np.uint16)
        is_pos = positive[usable]
        self.pos += np.bincount(codes[is_pos], minlength=FLOAT16_CODES)
        self.neg += np.bincount(codes[~is_pos], minlength=FLOAT16_CODES)
        return self

    def merge(self, other: LogitHistogram) -> LogitHistogram:
        """Add another histogram's counts; returns self."""
        self.pos += other.pos
        self.neg += other.neg
        return self

    @property
    def n_pixels(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    @property
    def n_positive(self) -> int:
        return int(self.pos.sum())

    def support(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logit values as float64, positive counts, negative counts) of the occupied values."""
        occupied = np.flatnonzero((self.pos + self.neg) > 0)
        values = occupied.astype(np.uint16).view(np.float16).astype(np.float64)
        if np.isnan(values).any():
            raise ReportInputError("predictions hold NaN logits on valid, labelled pixels; re-run the prediction")
        return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX), self.pos[occupied], self.neg[occupied]

    def fit_temperature(self) -> float:
        """Temperature minimising the NLL of every counted pixel (`workbench.evaluate.calibration.fit_temperature`)."""
        values, pos, neg = self.support()
        if pos.sum() == 0 or neg.sum() == 0:
            counts = f"got {pos.sum()} positive, {neg.sum()} negative"
            raise ReportInputError(f"temperature scaling needs positive and negative pixels; {counts}")
        logits = np.concatenate([values, values])
        targets = np.concatenate([np.ones(values.size), np.zeros(values.size)])
        return fit_temperature(logits, targets, weights=np.concatenate([pos, neg]))

    def threshold_histogram(self, temperature: float = 1.0, bins: int = 1000) -> ThresholdHistogram:
        """Histogram of calibrated probabilities sigmoid(logit / T), as one streaming pass would build it."""
        values, pos, neg = self.support()
        prob = apply_temperature(values, temperature)
        index = np.minimum((prob * bins).astype(np.int64), bins - 1)
        return ThresholdHistogram.from_counts(
            np.bincount(index, weights=pos, minlength=bins).astype(np.int64),
            np.bincount(index, weights=neg, minlength=bins).astype(np.int64),
        )


class PixelSample:
    """Uniform random sample (without replacement) of at most `capacity` usable pixels.

    Each pixel gets a random key; the pixels with the smallest keys are kept (bottom-k sampling),
    so the sample does not depend on how the pixels were split into chips.
    """

    def __init__(self, capacity: int = 1_000_000, seed: int = 0) -> None:
        if capacity < 1:
            raise ReportInputError(f"sample capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self._keys = np.zeros(0)
        self._logits = np.zeros(0, dtype=np.float32)
        self._targets = np.zeros(0, dtype=np.float32)

    def update(self, logit: Any, label: Any, valid: Any = None) -> PixelSample:
        usable, positive = _usable_and_positive(label, valid)
        logits = np.asarray(logit, dtype=np.float32)[usable]
        keys = self.rng.random(logits.size)
        self._keys = np.concatenate([self._keys, keys])
        self._logits = np.concatenate([self._logits, logits])
        self._targets = np.concatenate([self._targets, positive[usable].astype(np.float32)])
        if self._keys.size > 2 * self.capacity:
            self._shrink()
        return self

    def _shrink(self) -> None:
        if self._keys.size <= self.capacity:
            return
        keep = np.argpartition(self._keys, self.capacity - 1)[: self.capacity]
        self._keys, self._logits, self._targets = self._keys[keep], self._logits[keep], self._targets[keep]

    @property
    def logits(self) -> np.ndarray:
        self._shrink()
        return self._logits

    @property
    def targets(self) -> np.ndarray:
        self._shrink()
        return self._targets


@dataclass
class SplitEvaluation:
    """What one pass over a split accumulated (see the module docstring)."""

    logits: LogitHistogram
    groups: dict[str, LogitHistogram]
    sample: PixelSample
    per_chip: pd.DataFrame = field(default_factory=pd.DataFrame)
    chip_pos: np.ndarray | None = None  # (n_chips, chip_bins) calibrated-probability histograms
    chip_neg: np.ndarray | None = None
    objects: ObjectMatcher | None = None

    @property
    def calibrated(self) -> bool:
        return self.objects is not None


def _chip_row(
    catalog: pd.DataFrame, index: int, prob: np.ndarray, usable: np.ndarray, truth: np.ndarray, t: float
) -> dict[str, Any]:
    """Identity columns and confusion counts of one chip at threshold `t` (``prob >= t``, as the histograms)."""
    row = chip_identity(catalog, index)
    row["threshold"] = t
    row.update(chip_counts(prob >= t, truth, usable))
    return row


def evaluate_predictions(
    chips: Iterable[ChipArrays],
    catalog: pd.DataFrame,
    calibration: Calibration | None = None,
    group_by: str = "region",
    chip_bins: int = 100,
    object_iou: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
    size_bins: Sequence[float] = DEFAULT_SIZE_BINS,
    max_sample: int = 1_000_000,
    seed: int = 0,
    total: int | None = None,
    progress: bool = False,
) -> SplitEvaluation:
    """One pass over (store index, label, valid, logit) chips; `catalog` rows are addressed by store index.

    Without `calibration` only the logit histograms (global and per `group_by` value) and the
    pixel sample are kept - enough to fit a temperature and choose thresholds. With it, each chip
    is also scored at its region's threshold (`Calibration.threshold_for`) on calibrated
    probabilities: per-chip counts, per-chip histograms (`chip_bins`) and object matches.
    """
    if group_by not in catalog.columns:
        raise ReportInputError(f"catalog has no column {group_by!r} to group by; it has {list(catalog.columns)}")
    evaluation = SplitEvaluation(LogitHistogram(), {}, PixelSample(max_sample, seed))
    rows: list[dict[str, Any]] = []
    pos_rows: list[np.ndarray] = []
    neg_rows: list[np.ndarray] = []
    if calibration is not None:
        evaluation.objects = ObjectMatcher(object_iou, size_bins)
    for index, label, valid, logit in tqdm(chips, total=total, desc="evaluate", disable=not progress, leave=False):
        if index < 0 or index >= len(catalog):
            raise ReportInputError(f"chip index {index} is outside the catalog (0..{len(catalog) - 1})")
        evaluation.logits.update(logit, label, valid)
        group = str(catalog.iloc[index][group_by])
        evaluation.groups.setdefault(group, LogitHistogram()).update(logit, label, valid)
        evaluation.sample.update(logit, label, valid)
        if calibration is None:
            continue
        prob = apply_temperature(np.asarray(logit, dtype=np.float32), calibration.temperature).astype(np.float32)
        threshold = calibration.threshold_for(str(catalog.iloc[index].get("region", "")))
        usable, truth = _usable_and_positive(label, valid)
        rows.append(_chip_row(catalog, index, prob, usable, truth, threshold))
        pos, neg = per_chip_histograms(prob, np.asarray(label), valid, bins=chip_bins)
        pos_rows.append(pos[0])
        neg_rows.append(neg[0])
        assert evaluation.objects is not None
        evaluation.objects.update(prob, np.asarray(label), valid, threshold=threshold)
    if calibration is not None:
        evaluation.per_chip = pd.DataFrame(rows)
        evaluation.chip_pos = np.stack(pos_rows) if pos_rows else np.zeros((0, chip_bins), np.int64)
        evaluation.chip_neg = np.stack(neg_rows) if neg_rows else np.zeros((0, chip_bins), np.int64)
    return evaluation


# --------------------------------------------------------------------------- read-outs


def calibration_quality(
    logits: np.ndarray, targets: np.ndarray, temperature: float, bins: int = 15
) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """ECE (equal-width and equal-mass bins), MCE and Brier score before and after temperature scaling.

    Returns the scores (``ece``, ``ece_mass``, ``mce``, ``mce_mass``, ``brier`` with ``_before`` /
    ``_after``) and the reliability tables keyed ``"<uniform|quantile>/<before|after>"``.
    """
    probs = {"before": apply_temperature(logits, 1.0), "after": apply_temperature(logits, temperature)}
    scores: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    for when, prob in probs.items():
        for strategy, suffix in (("uniform", ""), ("quantile", "_mass")):
            tables[f"{strategy}/{when}"] = reliability_table(prob, targets, bins, strategy)  # type: ignore[arg-type]
            scores[f"ece{suffix}_{when}"] = ece(prob, targets, bins, strategy)  # type: ignore[arg-type]
            scores[f"mce{suffix}_{when}"] = mce(prob, targets, bins, strategy)  # type: ignore[arg-type]
        scores[f"brier_{when}"] = brier(prob, targets)
    return scores, tables


def pooled_summary(per_chip: pd.DataFrame, class_names: Sequence[str] = ("background", "foreground")) -> dict[str, Any]:
    """Pooled IoU, F1, precision, recall, mIoU and pixel accuracy (`segmentation_summary`), plus means per chip.

    The binary counts of the positive class are mirrored for the background class, so mIoU is the
    mean of the background and foreground IoU.
    """
    needed = {"tp", "fp", "fn", "tn", "iou"}
    if not needed <= set(per_chip.columns):
        raise ReportInputError(f"per-chip table lacks columns {sorted(needed - set(per_chip.columns))}")
    tp, fp, fn, tn = (per_chip[c].to_numpy(np.float64) for c in ("tp", "fp", "fn", "tn"))
    # (chips, classes) counts: background's tp/fp/fn/tn are the foreground's tn/fn/fp/tp
    c_tp, c_fp, c_fn, c_tn = (np.stack(pair, axis=1) for pair in ((tn, tp), (fn, fp), (fp, fn), (tp, tn)))
    summary: dict[str, Any] = segmentation_summary(c_tp, c_fp, c_fn, c_tn, class_names=class_names)
    summary["accuracy"] = summary["pixel_accuracy"]
    chip = segmentation_summary(c_tp, c_fp, c_fn, c_tn, class_names=class_names, imagewise=True)
    summary["mean_chip_iou"] = float(per_chip["iou"].mean()) if per_chip["iou"].notna().any() else float("nan")
    summary["mean_chip_f1"] = chip["f1"]
    summary["n_chips"] = len(per_chip)
    if "flags" in per_chip:
        summary["tail_chips"] = int(per_chip["flags"].str.contains("tail").sum())
    return mark_undefined_without_positives(summary, float(tp.sum()), float(fn.sum()))


def pr_curve_record(hist: ThresholdHistogram) -> dict[str, Any]:
    """PR curve and average precision of a histogram, as JSON-ready lists."""
    precision, recall, thresholds = hist.pr_curve()
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "thresholds": thresholds.tolist(),
        "pr_auc": hist.pr_auc(),
        "prevalence": float(hist.pos[0].sum() / max(hist.n_pixels, 1)),
    }


def prevalence_table(
    pos: np.ndarray,
    neg: np.ndarray,
    is_positive: np.ndarray,
    ratios: Sequence[int] = (200, 500, 1000),
    threshold: float = 0.5,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Metrics at positive:negative chip ratios 1:N from per-chip histograms of one pass.

    Every negative chip is weighted so that the pool holds N negatives per positive chip
    (`PrevalenceEvaluator`). The ``no_skill_ap`` column is the pixel prevalence of that pool: the
    average precision of a detector whose scores carry no information. Returns the table (one row
    per ratio, labelled ``1:N``) and the PR curve at each ratio.
    """
    evaluator = PrevalenceEvaluator(pos, neg, is_positive)
    table = evaluator.evaluate(list(ratios), threshold)
    table.insert(0, "prevalence", [f"1:{r:g}" for r in table["ratio"]])
    table["no_skill_ap"] = table["pixel_prevalence"]
    table["n_positive_chips"] = evaluator.n_pos_chips
    table["n_negative_chips"] = evaluator.n_neg_chips
    curves = {f"1:{r:g}": pr_curve_record(evaluator.histogram(r)) for r in ratios}
    return table, curves


def prevalence_metrics(table: pd.DataFrame, prefix: str = "test") -> dict[str, float]:
    """Flat metrics ``<prefix>.pr_auc_<N>``, ``.precision_<N>``, ``.recall_<N>`` from a prevalence table."""
    out = {}
    for _, row in table.iterrows():
        ratio = f"{row['ratio']:g}"
        for name in ("pr_auc", "precision", "recall"):
            out[f"{prefix}.{name}_{ratio}"] = float(row[name])
    return out


def object_table(matcher: ObjectMatcher) -> pd.DataFrame:
    """Object precision / recall / F1 per IoU threshold, for all sizes and per size bin (areas in pixels)."""
    return matcher.result()


def object_metrics(table: pd.DataFrame, prefix: str = "test") -> dict[str, float]:
    """Flat metrics ``<prefix>.object_<f1|precision|recall>_<iou>`` from the all-sizes rows of `object_table`."""
    out = {}
    for _, row in table[table["size_bin"] == "all"].iterrows():
        for name in ("f1", "precision", "recall"):
            out[f"{prefix}.object_{name}_{row['iou_threshold']:g}"] = float(row[name])
    return out


# --------------------------------------------------------------------------- test-time augmentation


def _batch_counts(prob: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, threshold: float) -> np.ndarray:
    usable = valid.bool() & (label != IGNORE_INDEX)
    pred = (prob >= threshold) & usable
    truth = (label != 0) & usable
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    return np.array([int(tp), int(fp), int(fn), int(usable.sum() - tp - fp - fn)], dtype=np.int64)


@torch.no_grad()
def tta_comparison(
    model: nn.Module,
    dataset: Dataset[Any],
    modes: Sequence[str] = TTA_COMPARISON_MODES,
    temperature: float = 1.0,
    threshold: float = 0.5,
    batch_size: int = 16,
    max_chips: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> pd.DataFrame:
    """Pooled IoU, F1, precision, recall and seconds of each TTA mode over the first `max_chips` chips.

    `dataset` yields dicts with image (C, H, W), label (H, W) and valid (H, W), e.g. a `ChipDataset`
    with the bundle's normalisation. Logits are averaged over the mode's transforms, divided by
    `temperature` and thresholded (``>=``). ``seconds_per_chip`` includes data loading.
    """

    unknown = [mode for mode in modes if mode not in TTA_MODES]
    if unknown:
        raise ReportInputError(f"unknown TTA modes {unknown}; expected some of {list(TTA_MODES)}")
    n_chips = min(len(dataset), max_chips)  # type: ignore[arg-type]
    if n_chips < 1:
        raise ReportInputError("the TTA comparison needs at least one chip")
    subset = Subset(dataset, range(n_chips))
    model = model.to(device).eval()
    warm_up = next(iter(DataLoader(subset, batch_size=batch_size, shuffle=False)))
    model(warm_up["image"].to(device))  # first-call costs (allocations, thread pools) are not any mode's
    rows = []
    for mode in tqdm(modes, desc="tta", disable=not progress, leave=False):
        counts = np.zeros(4, dtype=np.int64)
        started = time.perf_counter()
        for batch in DataLoader(subset, batch_size=batch_size, shuffle=False):
            logits = predict_with_tta(model, batch["image"].to(device), mode)[:, 0].float().cpu()
            prob = torch.sigmoid(logits / temperature)
            counts += _batch_counts(prob, batch["label"], batch["valid"], threshold)
        seconds = time.perf_counter() - started
        tp, fp, fn, tn = (float(c) for c in counts)
        rows.append(
            {
                "mode": mode,
                "passes": len(TTA_MODES[mode]),
                "n_chips": n_chips,
                **metrics_from_counts(tp, fp, fn, tn),
                "seconds": seconds,
                "seconds_per_chip": seconds / n_chips,
            }
        )
    table = pd.DataFrame(rows).drop(columns="accuracy")
    base = table.loc[table["mode"] == "none", "seconds"]
    if len(base):
        table["relative_time"] = table["seconds"] / float(base.iloc[0])
        table["iou_gain"] = table["iou"] - float(table.loc[table["mode"] == "none", "iou"].iloc[0])
    return table


__all__ = [
    "DEFAULT_SIZE_BINS",
    "LogitHistogram",
    "PixelSample",
    "ReportInputError",
    "SplitEvaluation",
    "calibration_quality",
    "evaluate_predictions",
    "iter_label_logits",
    "object_metrics",
    "object_table",
    "pooled_summary",
    "pr_curve_record",
    "prevalence_metrics",
    "prevalence_table",
    "tta_comparison",
]

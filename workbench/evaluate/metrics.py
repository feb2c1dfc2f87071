"""Streaming pixel evaluators: per-chip count tables, threshold histograms and prevalence re-weighting.

Counts become metrics in `workbench.functional` (the one counts-to-metrics core, 0/0 = NaN); this
module holds what accumulates the counts over a split.

* Only pixels where ``valid`` is True and ``label != 255`` are counted.
* Binary probability maps: a pixel is positive when its label is neither 0 nor 255, and it is
  predicted positive when ``prob >= threshold``.

``group_metrics`` pools per-chip counts by a catalog column (region, year, ...).

``ThresholdHistogram`` accumulates probability histograms of positive and negative pixels in one
pass, so precision, recall, IoU and F1 at any threshold of the bin grid, the PR curve and average
precision come from the histogram without another pass over the data.

``PrevalenceEvaluator`` re-weights negative chips of one inference pass to report metrics at
other positive:negative chip ratios (e.g. 1:200, 1:500, 1:1000).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from workbench.arrays import IGNORE_INDEX
from workbench.functional import (
    MetricInputError,
    as_batch,
    as_numpy,
    label_batch,
    metrics_from_counts,
    precision,
    recall,
    safe_divide,
    score,
    valid_or_all,
)

DEFAULT_SWEEP = np.round(np.arange(0.10, 0.901, 0.05), 2)
_CHUNK = 1 << 21  # pixels per update step: bounded memory and cache-friendly


# --------------------------------------------------------------------------- tables of per-chip counts


def group_metrics(
    per_chip: pd.DataFrame,
    by: str | Sequence[str],
    metrics: Sequence[str] = ("iou", "f1", "precision", "recall"),
    total: bool = True,
) -> pd.DataFrame:
    """Metrics per group (e.g. region, year) from per-chip counts.

    `per_chip` has one row per chip with columns tp, fp, fn, tn and the grouping column(s).
    For each group: chip count, pooled counts, pooled metrics (``<metric>``) and the mean of the
    per-chip metric over chips where it is defined (``<metric>_chip_mean``). With `total`, a last
    row (group value "all") pools every chip.
    """
    keys = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*keys, "tp", "fp", "fn", "tn"] if c not in per_chip.columns]
    if missing:
        raise MetricInputError(f"per_chip table lacks column(s) {missing}; it has {list(per_chip.columns)}")
    counts = per_chip[["tp", "fp", "fn", "tn"]].astype(np.float64)
    chip_values = pd.DataFrame(
        {m: score(m, counts.tp, counts.fp, counts.fn, counts.tn) for m in metrics},  # type: ignore[arg-type]
        index=per_chip.index,
    )
    table = pd.concat([per_chip[keys], counts, chip_values.add_suffix("_chip_mean")], axis=1)

    def summarise(frame: pd.DataFrame) -> dict[str, float]:
        row: dict[str, float] = {"n_chips": float(len(frame))}
        row.update({c: float(frame[c].sum()) for c in ("tp", "fp", "fn", "tn")})
        for m in metrics:
            row[m] = float(score(m, row["tp"], row["fp"], row["fn"], row["tn"]))  # type: ignore[arg-type]
            row[f"{m}_chip_mean"] = float(frame[f"{m}_chip_mean"].mean())  # pandas skips NaN
        return row

    rows = []
    for group, frame in table.groupby(keys, sort=True, dropna=False):
        values = group if isinstance(group, tuple) else (group,)
        rows.append({**dict(zip(keys, values)), **summarise(frame)})
    if total:
        rows.append({**dict.fromkeys(keys, "all"), **summarise(table)})
    out = pd.DataFrame(rows)
    out["n_chips"] = out["n_chips"].astype(int)
    return out


# --------------------------------------------------------------------------- threshold histogram


def _bin_index(prob: np.ndarray, bins: int) -> np.ndarray:
    """Bin k holds probabilities in [k/bins, (k+1)/bins); 1.0 goes to the last bin."""
    if prob.dtype.kind != "f":
        raise MetricInputError(f"probabilities must be floating point; got dtype {prob.dtype}")
    if prob.size:
        lo, hi = prob.min(), prob.max()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise MetricInputError(f"probabilities must lie in [0, 1] (apply sigmoid first); found {lo}..{hi}")
    scaled = np.multiply(prob, prob.dtype.type(bins))
    index = scaled.astype(np.int32)
    np.minimum(index, bins - 1, out=index)
    return index


def threshold_index(thresholds: ArrayLike, bins: int) -> np.ndarray:
    """Index of the first bin counted as predicted positive at each threshold (``prob >= t``).

    Thresholds on the bin grid (t = k / bins) are exact; others round up to the next grid line,
    so the result is within one bin width (1 / bins) of the requested threshold.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    if np.any(~np.isfinite(t)) or np.any(t < 0) or np.any(t > 1):
        raise MetricInputError(f"thresholds must lie in [0, 1]; got {t}")
    scaled = t * bins
    nearest = np.rint(scaled)
    on_grid = np.abs(scaled - nearest) < 1e-6
    return np.where(on_grid, nearest, np.ceil(scaled)).astype(np.int64)


class ThresholdHistogram:
    """Histograms of predicted probabilities, positives and negatives apart, per class.

    One pass of `update` over any number of batches; afterwards every threshold on the bin grid is
    free. ``num_classes == 1`` is binary: `prob` is the positive-class probability (B, H, W) or
    (B, 1, H, W) and a pixel is positive when its label is not 0 (and not 255). With
    ``num_classes > 1`` `prob` is (B, C, H, W) and class c is scored one-vs-rest (label == c).
    Counts are int64 (float64 when built from weighted counts with `from_counts`).
    """

    def __init__(self, bins: int = 1000, num_classes: int = 1) -> None:
        if bins < 2:
            raise MetricInputError(f"bins must be >= 2, got {bins}")
        if num_classes < 1:
            raise MetricInputError(f"num_classes must be >= 1, got {num_classes}")
        self.bins = int(bins)
        self.num_classes = int(num_classes)
        self.pos = np.zeros((num_classes, bins), dtype=np.int64)
        self.neg = np.zeros((num_classes, bins), dtype=np.int64)

    # ---- accumulation

    @classmethod
    def from_counts(cls, pos: ArrayLike, neg: ArrayLike) -> ThresholdHistogram:
        """Build from count arrays of shape (bins,) or (C, bins); weighted (float) counts are kept."""
        pos_a, neg_a = np.atleast_2d(np.asarray(pos)), np.atleast_2d(np.asarray(neg))
        if pos_a.shape != neg_a.shape or pos_a.ndim != 2:
            shapes = f"{pos_a.shape}, {neg_a.shape}"
            raise MetricInputError(f"pos and neg counts must have the same (C, bins) shape; got {shapes}")
        hist = cls(bins=pos_a.shape[1], num_classes=pos_a.shape[0])
        dtype = np.result_type(pos_a.dtype, neg_a.dtype, np.int64)
        hist.pos, hist.neg = pos_a.astype(dtype), neg_a.astype(dtype)
        return hist

    def _class_offsets(self, class_index: int) -> np.ndarray:
        """Lookup label -> offset: 0 negative, bins positive, 2*bins ignored."""
        lut = np.zeros(256, dtype=np.int32)
        if self.num_classes == 1:
            lut[1:] = self.bins
        else:
            lut[class_index] = self.bins
        lut[IGNORE_INDEX] = 2 * self.bins
        return lut

    def update(self, prob: Any, label: Any, valid: Any = None) -> ThresholdHistogram:
        """Add the valid, labelled pixels of a batch to the histograms; returns self."""
        label_arr = label_batch(label)
        valid_arr = valid_or_all(valid, label_arr.shape)
        prob_arr = as_numpy(prob, "prob")
        if self.num_classes == 1:
            prob_arr = as_batch(prob_arr, "prob")[:, None]
        elif prob_arr.ndim == 3:
            prob_arr = prob_arr[None]
        if prob_arr.shape != (label_arr.shape[0], self.num_classes, *label_arr.shape[1:]):
            raise MetricInputError(
                f"prob has shape {prob_arr.shape}; expected (B, {self.num_classes}, H, W) "
                f"matching label {label_arr.shape}"
            )
        labels_flat = label_arr.reshape(-1)
        invalid_flat = ~valid_arr.reshape(-1)
        for c in range(self.num_classes):
            lut = self._class_offsets(c)
            probs_flat = np.ascontiguousarray(prob_arr[:, c]).reshape(-1)
            counts = np.zeros(3 * self.bins, dtype=np.int64)
            for start in range(0, labels_flat.size, _CHUNK):
                stop = start + _CHUNK
                index = _bin_index(probs_flat[start:stop], self.bins)
                index += np.take(lut, labels_flat[start:stop])
                np.putmask(index, invalid_flat[start:stop], 2 * self.bins)
                counts += np.bincount(index, minlength=3 * self.bins)
            self.neg[c] += counts[: self.bins]
            self.pos[c] += counts[self.bins : 2 * self.bins]
        return self

    def merge(self, other: ThresholdHistogram) -> ThresholdHistogram:
        """Add another histogram's counts (e.g. from another worker); returns self."""
        if (other.bins, other.num_classes) != (self.bins, self.num_classes):
            raise MetricInputError(
                f"cannot merge a histogram with bins={other.bins}, classes={other.num_classes} into "
                f"bins={self.bins}, classes={self.num_classes}"
            )
        dtype = np.result_type(self.pos.dtype, other.pos.dtype)
        self.pos = self.pos.astype(dtype) + other.pos
        self.neg = self.neg.astype(dtype) + other.neg
        return self

    # ---- read-out

    @property
    def n_pixels(self) -> float:
        """Counted pixels (class 0 row)."""
        return float(self.pos[0].sum() + self.neg[0].sum())

    def counts_at(
        self, thresholds: ArrayLike, class_index: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """tp, fp, fn, tn at each threshold (predicted positive when ``prob >= t``)."""
        start = threshold_index(np.atleast_1d(thresholds), self.bins)
        # counts at or above each bin: reverse cumulative sums with a trailing zero for start == bins
        pos_above = np.concatenate([np.cumsum(self.pos[class_index][::-1])[::-1], [0]])
        neg_above = np.concatenate([np.cumsum(self.neg[class_index][::-1])[::-1], [0]])
        tp, fp = pos_above[start], neg_above[start]
        return tp, fp, pos_above[0] - tp, neg_above[0] - fp

    def sweep(self, thresholds: ArrayLike | None = None, class_index: int = 0) -> pd.DataFrame:
        """Counts and IoU, F1, precision, recall at each threshold."""
        t = DEFAULT_SWEEP if thresholds is None else np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        tp, fp, fn, tn = self.counts_at(t, class_index)
        table = pd.DataFrame({"threshold": t, "tp": tp, "fp": fp, "fn": fn, "tn": tn})
        for metric in ("iou", "f1", "precision", "recall"):
            table[metric] = score(metric, tp, fp, fn, tn)  # type: ignore[arg-type]
        return table

    def pr_curve(self, class_index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Precision, recall and thresholds (bin lower edges, ascending) at every non-empty bin.

        Like ``sklearn.metrics.precision_recall_curve``, a final point (precision 1, recall 0) is
        appended so that the curve reaches the recall axis.
        """
        occupied = np.flatnonzero((self.pos[class_index] + self.neg[class_index]) > 0)
        thresholds = occupied / self.bins
        tp, fp, fn, tn = self.counts_at(thresholds, class_index)
        return np.append(precision(tp, fp, fn, tn), 1.0), np.append(recall(tp, fp, fn, tn), 0.0), thresholds

    def pr_auc(self, class_index: int = 0) -> float:
        """Average precision, sum_n (R_n - R_{n-1}) P_n over thresholds from high to low.

        Equals ``sklearn.metrics.average_precision_score`` when scores fall on distinct bins;
        NaN when there are no positive pixels.
        """
        curve_precision, curve_recall, _ = self.pr_curve(class_index)
        if not np.isfinite(curve_recall).all():
            return float("nan")
        # pr_curve runs from low to high threshold; recall decreases along it
        steps = curve_recall[:-1] - curve_recall[1:]
        return float(np.sum(steps * np.nan_to_num(curve_precision[:-1], nan=0.0)))

    def __repr__(self) -> str:
        return (
            f"ThresholdHistogram(bins={self.bins}, num_classes={self.num_classes}, "
            f"positives={self.pos.sum(axis=1).tolist()}, negatives={self.neg.sum(axis=1).tolist()})"
        )


def per_chip_histograms(prob: Any, label: Any, valid: Any = None, bins: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Binary histograms for each chip of a batch in one bincount: (pos, neg), each int64 (B, bins).

    Feed these to `PrevalenceEvaluator`. Use coarse bins (e.g. 100) when keeping one per chip.
    """
    label_arr = label_batch(label)
    valid_arr = valid_or_all(valid, label_arr.shape)
    prob_arr = as_batch(prob, "prob")
    if prob_arr.shape != label_arr.shape:
        raise MetricInputError(f"prob has shape {prob_arr.shape} but label has shape {label_arr.shape}")
    batch = label_arr.shape[0]
    usable = valid_arr & (label_arr != IGNORE_INDEX)
    chip = np.broadcast_to(np.arange(batch)[:, None, None], label_arr.shape)[usable].astype(np.int64)
    cells = (chip * 2 + (label_arr[usable] > 0)) * bins + _bin_index(prob_arr[usable], bins)
    counts = np.bincount(cells, minlength=batch * 2 * bins).reshape(batch, 2, bins)
    return counts[:, 1].copy(), counts[:, 0].copy()


def bench_sweep(n_pixels: int = 10**8, bins: int = 1000, n_thresholds: int = 17, seed: int = 0) -> dict[str, float]:
    """Throughput of histogram accumulation plus a threshold sweep on one core, in pixels per second.

    One synthetic chunk (uint8 labels, 1 % positives, a few ignored and nodata pixels) is fed
    repeatedly, so data generation is not timed.
    """
    rng = np.random.default_rng(seed)
    chunk = min(n_pixels, 1 << 22)
    prob = rng.random(chunk, dtype=np.float32).reshape(1, 1, chunk)
    label = (rng.random(chunk) < 0.01).astype(np.uint8).reshape(1, 1, chunk)
    label[..., ::997] = IGNORE_INDEX
    valid = np.ones_like(label, dtype=bool)
    valid[..., ::1009] = False
    hist = ThresholdHistogram(bins=bins)
    thresholds = np.linspace(0.1, 0.9, n_thresholds)
    done = 0
    start = time.perf_counter()
    while done < n_pixels:
        hist.update(prob, label, valid)
        done += chunk
    table = hist.sweep(thresholds)
    seconds = time.perf_counter() - start
    return {
        "pixels": float(done),
        "seconds": seconds,
        "pixels_per_s": done / seconds,
        "n_thresholds": float(len(table)),
        "bins": float(bins),
    }


# --------------------------------------------------------------------------- prevalence


def precision_at_prevalence(tpr: ArrayLike, fpr: ArrayLike, pi: ArrayLike) -> np.ndarray:
    """Precision a classifier with this TPR and FPR reaches at positive prevalence `pi`.

    P = TPR*pi / (TPR*pi + FPR*(1 - pi)); NaN where nothing is predicted positive.
    """
    tpr_a, fpr_a, pi_a = (np.asarray(v, dtype=np.float64) for v in (tpr, fpr, pi))
    if np.any((pi_a < 0) | (pi_a > 1)):
        raise MetricInputError(f"prevalence pi must lie in [0, 1]; got {pi_a}")
    # precision with the expected true and false positive shares at that prevalence as counts
    return precision(tpr_a * pi_a, fpr_a * (1 - pi_a), 0.0, 0.0)


class PrevalenceEvaluator:
    """Metrics at other positive:negative chip ratios from one inference pass.

    Holds one binary histogram per chip (`pos`, `neg`: (n_chips, bins)) and whether each chip is
    a positive chip. For a ratio 1:r, the pool is every positive chip plus r * n_pos negative
    chips. Instead of drawing negatives at random, every negative chip enters with weight
    ``w = r * n_pos / n_neg``: this equals the expected counts of drawing that many negatives
    uniformly (with replacement), so it is exact in expectation and has no sampling noise. When
    ``w > 1`` there are fewer negative chips than the ratio asks for; the result records it in the
    ``upweighted`` column.
    """

    def __init__(self, pos: ArrayLike, neg: ArrayLike, is_positive: ArrayLike) -> None:
        self.pos = np.asarray(pos)
        self.neg = np.asarray(neg)
        self.is_positive = np.asarray(is_positive, dtype=bool).reshape(-1)
        if self.pos.ndim != 2 or self.pos.shape != self.neg.shape:
            raise MetricInputError(f"pos and neg must both be (n_chips, bins); got {self.pos.shape}, {self.neg.shape}")
        if self.is_positive.size != self.pos.shape[0]:
            raise MetricInputError(f"is_positive has {self.is_positive.size} entries for {self.pos.shape[0]} chips")
        self.n_pos_chips = int(self.is_positive.sum())
        self.n_neg_chips = int((~self.is_positive).sum())
        if self.n_pos_chips == 0 or self.n_neg_chips == 0:
            raise MetricInputError(
                f"need positive and negative chips; got {self.n_pos_chips} positive, {self.n_neg_chips} negative"
            )

    def negative_weight(self, ratio: float) -> float:
        """Weight of each negative chip for a 1:`ratio` positive:negative chip ratio."""
        if ratio <= 0:
            raise MetricInputError(f"ratio must be > 0 (1:ratio positive:negative), got {ratio}")
        return ratio * self.n_pos_chips / self.n_neg_chips

    def histogram(self, ratio: float) -> ThresholdHistogram:
        """Pooled (weighted) histogram of the 1:`ratio` evaluation set."""
        weight = self.negative_weight(ratio)
        chip_weight = np.where(self.is_positive, 1.0, weight)
        return ThresholdHistogram.from_counts(chip_weight @ self.pos.astype(np.float64), chip_weight @ self.neg)

    def evaluate(self, ratios: Sequence[float] = (200, 500, 1000), threshold: float = 0.5) -> pd.DataFrame:
        """One row per ratio: pixel prevalence, precision, recall, IoU, F1 at `threshold` and PR-AUC."""
        rows = []
        for ratio in ratios:
            hist = self.histogram(ratio)
            tp, fp, fn, tn = (float(v[0]) for v in hist.counts_at([threshold]))
            weight = self.negative_weight(ratio)
            rows.append(
                {
                    "ratio": ratio,
                    "negative_weight": weight,
                    "upweighted": weight > 1,
                    "pixel_prevalence": float(safe_divide(tp + fn, tp + fp + fn + tn)),
                    "threshold": threshold,
                    **metrics_from_counts(tp, fp, fn, tn),
                    "pr_auc": hist.pr_auc(),
                }
            )
        return pd.DataFrame(rows).drop(columns="accuracy")


def prevalence_metrics(
    pos: ArrayLike,
    neg: ArrayLike,
    is_positive: ArrayLike,
    ratios: Sequence[float] = (200, 500, 1000),
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Shortcut for ``PrevalenceEvaluator(pos, neg, is_positive).evaluate(ratios, threshold)``."""
    return PrevalenceEvaluator(pos, neg, is_positive).evaluate(ratios, threshold)

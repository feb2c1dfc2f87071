"""Object-level precision, recall and F1: connected components matched one to one.

Each connected component (blob) of the thresholded prediction and of the ground truth is an
object. Predicted objects are visited by decreasing mean probability; each is matched to the
still unmatched ground-truth object with which it has the highest IoU, provided that IoU reaches
the matching threshold (greedy, COCO-style). Matched predictions are true positives, the other
predictions false positives, unmatched ground-truth objects false negatives.

Pixels that are nodata (``valid`` False) belong to no object. Pixels labelled 255 (ignore) do not
split objects but are not counted in object areas or overlaps, and a predicted object lying
entirely on ignored pixels is dropped (it is neither right nor wrong).

Panoptic quality is reported alongside: SQ = mean IoU of matched pairs, RQ = F1, PQ = SQ x RQ.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from workbench.arrays import IGNORE_INDEX
from workbench.functional import (
    MetricInputError,
    as_batch,
    iou_score,
    label_batch,
    precision,
    recall,
    safe_divide,
    valid_or_all,
)

DEFAULT_IOU_THRESHOLDS = (0.5, 0.3, 0.1)


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D bool mask: (ids with 0 = background, count)."""
    if connectivity not in (4, 8):
        raise MetricInputError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = np.ones((3, 3), dtype=bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    ids, count = ndimage.label(mask, structure=structure)
    return ids, int(count)


@dataclass
class ChipObjects:
    """Objects of one chip: areas, mean probabilities and the pairwise IoU matrix."""

    pred_area: np.ndarray  # (n_pred,) usable pixels per predicted object
    gt_area: np.ndarray  # (n_gt,)
    pred_score: np.ndarray  # (n_pred,) mean probability over the object
    iou: np.ndarray  # (n_pred, n_gt)


def chip_objects(
    prob: np.ndarray, label: np.ndarray, valid: np.ndarray, threshold: float, connectivity: int = 8
) -> ChipObjects:
    """Components of one (H, W) chip and their pairwise IoU from a single bincount of id pairs."""
    gt_mask = valid & (label != 0) & (label != IGNORE_INDEX)
    pred_mask = valid & (prob >= threshold)
    pred_ids, n_pred = label_components(pred_mask, connectivity)
    gt_ids, n_gt = label_components(gt_mask, connectivity)
    usable = valid & (label != IGNORE_INDEX)
    pairs = pred_ids[usable].astype(np.int64) * (n_gt + 1) + gt_ids[usable]
    table = np.bincount(pairs, minlength=(n_pred + 1) * (n_gt + 1)).reshape(n_pred + 1, n_gt + 1)
    inter = table[1:, 1:].astype(np.float64)
    pred_area = table[1:].sum(axis=1)
    gt_area = table[:, 1:].sum(axis=0)
    # a pair's false positives are the predicted object's pixels outside the GT object, and vice versa
    iou = iou_score(inter, pred_area[:, None] - inter, gt_area[None, :] - inter, 0.0, zero_division=0.0)
    prob_sum = np.bincount(pred_ids.ravel(), weights=prob.ravel().astype(np.float64), minlength=n_pred + 1)[1:]
    pixel_count = np.bincount(pred_ids.ravel(), minlength=n_pred + 1)[1:]
    score = prob_sum / np.maximum(pixel_count, 1)
    keep = pred_area > 0  # drop predictions that lie only on ignored pixels
    return ChipObjects(pred_area[keep], gt_area, score[keep], iou[keep])


def greedy_match(iou: np.ndarray, pred_score: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Index of the matched GT object for each prediction, -1 where unmatched.

    Predictions in order of decreasing score (ties: lower index first) each take the unmatched GT
    object of highest IoU when that IoU is at least `iou_threshold`.
    """
    n_pred, n_gt = iou.shape
    match = np.full(n_pred, -1, dtype=np.int64)
    if n_gt == 0:
        return match
    taken = np.zeros(n_gt, dtype=bool)
    for p in np.argsort(-pred_score, kind="stable"):
        candidates = np.where(taken, -1.0, iou[p])
        best = int(np.argmax(candidates))
        if candidates[best] >= iou_threshold:
            match[p] = best
            taken[best] = True
    return match


def _size_bin_labels(edges: np.ndarray) -> list[str]:
    return [f"[{lo:g}, {hi:g})" for lo, hi in itertools.pairwise(edges)]


class ObjectMatcher:
    """Accumulates object matches over chips for several IoU thresholds and object-size bins.

    `size_bins` are pixel-area edges, e.g. ``[0, 100, 1000, inf]``; recall in a bin counts
    ground-truth objects of that size, precision counts predicted objects of that size.
    """

    def __init__(
        self,
        iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
        size_bins: Sequence[float] | None = None,
        connectivity: int = 8,
    ) -> None:
        if not iou_thresholds or any(not 0 < t <= 1 for t in iou_thresholds):
            raise MetricInputError(f"iou_thresholds must be in (0, 1]; got {list(iou_thresholds)}")
        self.iou_thresholds = [float(t) for t in iou_thresholds]
        self.size_edges = np.asarray(size_bins if size_bins is not None else [0, np.inf], dtype=np.float64)
        if self.size_edges.size < 2 or np.any(np.diff(self.size_edges) <= 0):
            raise MetricInputError(f"size_bins must be at least two increasing edges; got {list(self.size_edges)}")
        self.connectivity = connectivity
        n_t, n_b = len(self.iou_thresholds), self.size_edges.size - 1
        self.n_pred = np.zeros((n_t, n_b), dtype=np.int64)
        self.n_gt = np.zeros((n_t, n_b), dtype=np.int64)
        self.tp_pred = np.zeros((n_t, n_b), dtype=np.int64)
        self.tp_gt = np.zeros((n_t, n_b), dtype=np.int64)
        self.matched_iou_sum = np.zeros(n_t, dtype=np.float64)
        self.n_chips = 0

    def _size_bin(self, area: np.ndarray) -> np.ndarray:
        """Bin of each area; -1 outside the edges."""
        index = np.searchsorted(self.size_edges, area, side="right") - 1
        return np.where(index < self.size_edges.size - 1, index, -1)

    def _count(self, target: np.ndarray, row: int, bins: np.ndarray, selected: np.ndarray | None = None) -> None:
        inside = bins >= 0
        if selected is not None:
            inside &= selected
        target[row] += np.bincount(bins[inside], minlength=target.shape[1])

    def update(self, prob: Any, label: Any, valid: Any = None, threshold: float = 0.5) -> ObjectMatcher:
        """Match objects in a chip (H, W) or a batch (B, H, W) of probability maps; returns self."""
        label_arr = label_batch(label)
        prob_arr = as_batch(prob, "prob")
        if prob_arr.shape != label_arr.shape:
            raise MetricInputError(f"prob has shape {prob_arr.shape} but label has shape {label_arr.shape}")
        valid_arr = valid_or_all(valid, label_arr.shape)
        for chip_prob, chip_label, chip_valid in zip(prob_arr, label_arr, valid_arr):
            self._update_chip(chip_prob, chip_label, chip_valid, threshold)
        return self

    def _update_chip(self, prob: np.ndarray, label: np.ndarray, valid: np.ndarray, threshold: float) -> None:
        objects = chip_objects(prob, label, valid, threshold, self.connectivity)
        pred_bins = self._size_bin(objects.pred_area)
        gt_bins = self._size_bin(objects.gt_area)
        for row, iou_threshold in enumerate(self.iou_thresholds):
            match = greedy_match(objects.iou, objects.pred_score, iou_threshold)
            gt_matched = np.zeros(objects.gt_area.size, dtype=bool)
            gt_matched[match[match >= 0]] = True
            self._count(self.n_pred, row, pred_bins)
            self._count(self.n_gt, row, gt_bins)
            self._count(self.tp_pred, row, pred_bins, match >= 0)
            self._count(self.tp_gt, row, gt_bins, gt_matched)
            matched = np.flatnonzero(match >= 0)
            self.matched_iou_sum[row] += objects.iou[matched, match[matched]].sum()
        self.n_chips += 1

    def result(self) -> pd.DataFrame:
        """One row per IoU threshold for all sizes ("all"), then one per threshold and size bin.

        Columns: n_pred, n_gt, tp_pred (matched predictions), tp_gt (matched GT objects), fp, fn,
        precision = tp_pred / n_pred, recall = tp_gt / n_gt, f1 = (tp_pred + tp_gt) / (n_pred + n_gt)
        (= 2TP / (2TP + FP + FN) on "all" rows), and for "all" rows sq and pq.
        Ratios with a zero denominator are NaN.
        """
        rows = []
        labels = _size_bin_labels(self.size_edges)
        for row, iou_threshold in enumerate(self.iou_thresholds):
            totals = (self.n_pred[row].sum(), self.n_gt[row].sum(), self.tp_pred[row].sum(), self.tp_gt[row].sum())
            rows.append(self._row(iou_threshold, "all", 0.0, float(self.size_edges[-1]), *totals, row=row))
            for b, name in enumerate(labels):
                counts = (self.n_pred[row, b], self.n_gt[row, b], self.tp_pred[row, b], self.tp_gt[row, b])
                rows.append(self._row(iou_threshold, name, self.size_edges[b], self.size_edges[b + 1], *counts))
        return pd.DataFrame(rows)

    def _row(
        self,
        iou_threshold: float,
        size_bin: str,
        size_min: float,
        size_max: float,
        n_pred: int,
        n_gt: int,
        tp_pred: int,
        tp_gt: int,
        row: int | None = None,
    ) -> dict[str, Any]:
        # precision counts predicted objects (matched = tp_pred), recall ground-truth objects (matched = tp_gt);
        # within a size bin the two differ, so F1 is pooled over both:
        # (matched predictions + matched GT) / (predictions + GT), = 2TP / (2TP + FP + FN) on "all" rows
        object_precision = float(precision(tp_pred, n_pred - tp_pred, 0, 0))
        object_recall = float(recall(tp_gt, 0, n_gt - tp_gt, 0))
        f1 = float(safe_divide(tp_pred + tp_gt, n_pred + n_gt))
        out: dict[str, Any] = {
            "iou_threshold": iou_threshold,
            "size_bin": size_bin,
            "size_min": float(size_min),
            "size_max": float(size_max),
            "n_pred": int(n_pred),
            "n_gt": int(n_gt),
            "tp_pred": int(tp_pred),
            "tp_gt": int(tp_gt),
            "fp": int(n_pred - tp_pred),
            "fn": int(n_gt - tp_gt),
            "precision": object_precision,
            "recall": object_recall,
            "f1": f1,
            "sq": float("nan"),
            "pq": float("nan"),
        }
        if row is not None and tp_gt:
            out["sq"] = float(self.matched_iou_sum[row] / tp_gt)
            out["pq"] = out["sq"] * f1
        return out


def object_metrics(
    prob: Any,
    label: Any,
    valid: Any = None,
    threshold: float = 0.5,
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
    size_bins: Sequence[float] | None = None,
    connectivity: int = 8,
) -> pd.DataFrame:
    """Object-level table for one batch (see `ObjectMatcher.result`)."""
    matcher = ObjectMatcher(iou_thresholds, size_bins, connectivity)
    return matcher.update(prob, label, valid, threshold).result()

"""Per-chip signals of the label-noise review: the suspicion that a chip's label is wrong.

Three independent views of each chip are compared: the label (the supervision under review), the MNDWI
water index of the raw Sentinel-2 reflectance (physics, no learning, see `workbench.data.agreement`) and
the model's (preferably out-of-sample) water probability. `ReviewChip` holds one chip as the review reads
it; `noise_terms` gives the disagreement terms and `noise_score` the one suspicion score built from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.arrays import IGNORE_INDEX
from workbench.data.agreement import ChipMasks, mask_iou, prepare_masks
from workbench.params import ReviewParams

SCORE_COLUMNS = ["model_disagreement", "index_disagreement", "confident_error", "score"]
SIGNAL_COLUMNS = [
    "model_disagreement",
    "confident_error",
    "cleanlab_quality",
    "index_disagreement",
    "vote_entropy",
    "contested_share",
]


@dataclass
class ReviewChip:
    """One chip as the review reads it: raw image, band names, label, valid mask, model probability, catalog row."""

    image: np.ndarray  # (C, H, W) raw reflectance, not normalised
    band_names: Sequence[str]
    label: np.ndarray  # (H, W) class ids, IGNORE_INDEX = not labelled
    valid: np.ndarray  # (H, W) bool, False = nodata
    prob: np.ndarray | None = None  # (H, W) model water probability, out-of-sample where possible
    row: Mapping[str, Any] = field(default_factory=dict)  # chip_id, region, year, lat, lon, split, [noisy]
    votes: np.ndarray | None = None  # (H, W) annotator vote counts of multi-annotator stores
    n_annotators: int = 0
    class_probs: np.ndarray | None = None  # (C, H, W) calibrated class probabilities of a softmax model
    predicted: np.ndarray | None = None  # (H, W) decided class map; default: argmax of class_probs

    @property
    def chip_id(self) -> str:
        return str(self.row.get("chip_id", ""))


def noise_terms_from_masks(
    masks: ChipMasks, cfg: ReviewParams, confident_weight: float, confidence: float, smooth_pixels: float
) -> dict[str, float]:
    """The `noise_terms` of one chip from its prepared masks."""
    if masks.pred is None or masks.prob is None:
        if not masks.has_index:
            index_disagreement = math.nan
        else:
            index_disagreement = 1.0 - mask_iou(masks.label, masks.water, smooth_pixels)
        return {
            "model_disagreement": math.nan,
            "index_disagreement": index_disagreement,
            "confident_error": math.nan,
            "score": cfg.index_weight * index_disagreement if masks.has_index else 0.0,
        }
    model_disagreement = 1.0 - mask_iou(masks.label, masks.pred, smooth_pixels)
    if masks.has_index:
        agree = masks.scored & (masks.pred == masks.water)
        index_disagreement = 1.0 - mask_iou(masks.label & agree, masks.water & agree, smooth_pixels)
    else:
        index_disagreement = math.nan
    confident = masks.scored & ((masks.prob > confidence) | (masks.prob < 1.0 - confidence))
    errors = np.abs(masks.prob[confident] - masks.label[confident])
    confident_error = float(errors.mean()) if errors.size else 0.0
    score = (
        cfg.model_weight * model_disagreement
        + (cfg.index_weight * index_disagreement if masks.has_index else 0.0)
        + confident_weight * confident_error
    )
    return {
        "model_disagreement": model_disagreement,
        "index_disagreement": index_disagreement,
        "confident_error": confident_error,
        "score": score,
    }


def noise_terms(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    valid: np.ndarray,
    prob: np.ndarray | None,
    cfg: ReviewParams | None = None,
    threshold: float = 0.5,
    confident_weight: float = 1.0,
    confidence: float = 0.9,
    smooth_pixels: float = 8.0,
    green: str = "B03",
    swir: str = "B11",
) -> dict[str, float]:
    """The parts of the suspicion score of one chip and the score itself; see `noise_score` for the formula."""
    cfg = cfg or ReviewParams()
    masks = prepare_masks(image, band_names, label, valid, prob, cfg.water_index_threshold, threshold, green, swir)
    return noise_terms_from_masks(masks, cfg, confident_weight, confidence, smooth_pixels)


def noise_score(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    valid: np.ndarray,
    prob: np.ndarray | None,
    cfg: ReviewParams | None = None,
    **options: Any,
) -> float:
    """Suspicion that a chip's label is wrong; higher = review first.

    On scored pixels (valid and labelled), with L the label mask, P = prob >= threshold the prediction,
    W = MNDWI > cfg.water_index_threshold the water mask and A = {P == W} the pixels where model and index agree::

        IoU_s(X, Y)  = (|X & Y| + s) / (|X | Y| + s)            s = smooth_pixels; two empty masks give 1
        model_dis    = 1 - IoU_s(L, P)
        index_dis    = 1 - IoU_s(L & A, W & A)
        confident    = mean |prob - L| over pixels with prob > confidence or prob < 1 - confidence (0 if none)
        score        = cfg.model_weight * model_dis + cfg.index_weight * index_dis + confident_weight * confident

    Why: the model term catches omitted, undersized and shifted outlines; the index term only counts where
    the independent physics and the model agree, so snow, ice and cloud shadows (where MNDWI is wrong and
    the model is right) add nothing; the confident term is the confident-learning signal (Northcutt et al.
    2021) of pixels the model is sure about but the label contradicts. The pseudo-count `s` is the small-
    object guard: a few stray pixels on an empty chip do not look like a missing lake.
    Without `prob` the score is cfg.index_weight * (1 - IoU_s(L, W)). `options` are those of `noise_terms`
    (threshold, confident_weight, confidence, smooth_pixels, green, swir), with the same defaults.
    """
    return noise_terms(image, band_names, label, valid, prob, cfg, **options)["score"]


def cleanlab_quality(labels: np.ndarray, probs: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """cleanlab's per-chip label-quality score (0..1, lower = more likely mislabelled) for a batch of chips.

    `labels` (N, H, W) 0/1, `probs` (N, H, W) foreground probability, `scored` (N, H, W) bool. The binary
    probability becomes cleanlab's two-class `pred_probs` (N, 2, H, W) and
    `cleanlab.segmentation.rank.get_label_quality_scores(method="softmin")` scores each chip on its own, so
    scoring batch by batch gives the same numbers as scoring everything at once while memory stays bounded.
    Unscored pixels (nodata, unlabelled) take the model's own class, so they never look like label issues.
    """
    from cleanlab.segmentation.rank import get_label_quality_scores

    labels = np.asarray(labels)
    probs = np.clip(np.asarray(probs, dtype=np.float32), 0.0, 1.0)
    scored = np.asarray(scored, dtype=bool)
    if labels.shape != probs.shape or labels.shape != scored.shape or labels.ndim != 3:
        raise ValueError(
            f"labels {labels.shape}, probs {probs.shape} and scored {scored.shape} must be equal (N, H, W)"
        )
    given = np.where(scored, labels > 0, probs >= 0.5).astype(np.int64)
    pred_probs = np.stack([1.0 - probs, probs], axis=1)
    scores, _ = get_label_quality_scores(given, pred_probs, method="softmin", verbose=False)
    return np.asarray(scores, dtype=np.float64)


def combined_score(table: Any, cfg: ReviewParams) -> Any:
    """The one suspicion score of the review table (higher = review first).

    ``score = model_weight * model_disagreement + index_weight * index_disagreement
    + confident_weight * confident_error + cleanlab_weight * (1 - cleanlab_quality)
    + votes_weight * contested_share``; a signal that a chip lacks (no model, no index, no votes) adds 0.

    Why the defaults (model 0.25, index 0.25, confident 1, cleanlab 4, votes 1): a wrong label and a hard
    chip the model gets wrong (cloud shadow, snow, turbid water) both show as model-label and index-label
    disagreement, so these two cannot tell them apart and only break ties. What sets a label error apart is
    that the model is *confident* against the label on many pixels: that is the confident-learning signal
    (Northcutt et al. 2021) of `confident_error` and of cleanlab's softmin quality, which the score is built
    on. cleanlab's quality of suspicious chips lies in about 0 to 0.1 (an order of magnitude narrower than the
    disagreement terms), hence its larger weight. On the demo data (3 % of chips with an injected omission,
    undersizing or shift), the earlier weights (1, 0.5, 1, 0.5) found 8 of the 10 corrupted chips among the
    top 10 of every store tried; these find 10, 9, 10 and 9 (the demo model in sample on its own store,
    and out of sample on three fresh stores of other generator seeds; tests/review/test_weights.py).
    """
    import pandas as pd

    def term(column: str) -> Any:
        if column not in table:
            return pd.Series(0.0, index=table.index)
        return pd.to_numeric(table[column], errors="coerce").fillna(0.0)

    cleanlab_issue = (1.0 - table["cleanlab_quality"]).fillna(0.0) if "cleanlab_quality" in table else term("_none")
    return (
        cfg.model_weight * term("model_disagreement")
        + cfg.index_weight * term("index_disagreement")
        + cfg.confident_weight * term("confident_error")
        + cfg.cleanlab_weight * cleanlab_issue
        + cfg.votes_weight * term("contested_share")
    )


# --------------------------------------------------------------------------- multiclass


def class_column(name: str) -> str:
    """The review-table column of the per-class disagreement of class `name`."""
    return f"disagree.{name}"


def class_noise_terms(
    label: np.ndarray,
    valid: np.ndarray,
    class_probs: np.ndarray | None,
    names: Sequence[str],
    cfg: ReviewParams | None = None,
    predicted: np.ndarray | None = None,
    confidence: float = 0.9,
    smooth_pixels: float = 8.0,
) -> dict[str, float]:
    """The suspicion terms of one chip of a softmax model (label classes against predicted classes).

    On scored pixels (valid and labelled), with L the label classes, P the predicted classes (`predicted`,
    else the argmax of `class_probs` (C, H, W)) and IoU_s the smoothed IoU of `noise_score`::

        mismatch_share     = share of scored pixels with L != P
        disagree.<k>       = 1 - IoU_s(L == k, P == k)                  one column per class
        model_disagreement = mean of disagree.<k> over the classes k >= 1 (class 0 = background)
        confident_error    = mean (1 - p[L]) over pixels whose top probability exceeds `confidence`
        score              = cfg.model_weight * model_disagreement + cfg.confident_weight * confident_error

    Why per class: an omitted lake is a few percent of a chip's pixels but the whole of its lake class, so
    the per-class IoU sees it where the pixel share barely moves; the pseudo-count keeps a few stray pixels
    of a class that is absent from the label from looking like a missing object. With two classes the
    confident error equals the binary one (|p - L| = 1 - p[L]). Without probabilities every term is NaN.
    """
    cfg = cfg or ReviewParams()
    label = np.asarray(label)
    valid = np.asarray(valid, dtype=bool)
    n_classes = len(names)
    if class_probs is None:
        empty = {"model_disagreement": math.nan, "mismatch_share": math.nan, "confident_error": math.nan}
        return {**empty, **{class_column(name): math.nan for name in names}, "score": 0.0}
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.shape != (n_classes, *label.shape):
        raise ValueError(f"class probabilities have shape {probs.shape}, expected {(n_classes, *label.shape)}")
    pred = np.argmax(probs, axis=0) if predicted is None else np.asarray(predicted)
    scored = valid & (label != IGNORE_INDEX) & (label < n_classes)
    n_scored = int(scored.sum())
    terms: dict[str, float] = {}
    for k, name in enumerate(names):
        terms[class_column(name)] = 1.0 - mask_iou(scored & (label == k), scored & (pred == k), smooth_pixels)
    foreground = [terms[class_column(name)] for name in names[1:]] or [terms[class_column(names[0])]]
    model_disagreement = float(np.mean(foreground))
    mismatch = float(np.count_nonzero(scored & (label != pred)) / n_scored) if n_scored else 0.0
    confident = scored & (probs.max(axis=0) > confidence)
    if confident.any():
        given = np.take_along_axis(probs, label.astype(np.int64).clip(0, n_classes - 1)[None], axis=0)[0]
        confident_error = float(np.mean(1.0 - given[confident]))
    else:
        confident_error = 0.0
    score = cfg.model_weight * model_disagreement + cfg.confident_weight * confident_error
    return {
        "model_disagreement": model_disagreement,
        "mismatch_share": mismatch,
        "confident_error": confident_error,
        **terms,
        "score": score,
    }


def cleanlab_quality_multiclass(labels: np.ndarray, probs: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """cleanlab's per-chip label-quality score for a softmax model: `probs` (N, C, H, W), `labels` (N, H, W).

    `cleanlab.segmentation.rank.get_label_quality_scores(method="softmin")` takes the softmax probabilities
    as they are; unscored pixels (nodata, unlabelled) take the model's own top class, so they never look
    like label issues (as in `cleanlab_quality`).
    """
    from cleanlab.segmentation.rank import get_label_quality_scores

    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float32)
    scored = np.asarray(scored, dtype=bool)
    if probs.ndim != 4 or labels.shape != scored.shape or labels.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(
            f"labels {labels.shape}, probs {probs.shape} and scored {scored.shape} must be (N, H, W), "
            "(N, C, H, W) and (N, H, W)"
        )
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
    given = np.where(scored, labels, np.argmax(probs, axis=1)).astype(np.int64)
    scores, _ = get_label_quality_scores(given, probs, method="softmin", verbose=False)
    return np.asarray(scores, dtype=np.float64)

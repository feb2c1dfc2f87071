"""Review of softmax models: per-class disagreement, confident error, cleanlab on (N, C, H, W) probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cleanlab.segmentation.rank import get_label_quality_scores

from workbench.arrays import IGNORE_INDEX
from workbench.params import ReviewParams
from workbench.review.ranking import class_review_table, order_columns
from workbench.review.signals import (
    ReviewChip,
    class_noise_terms,
    cleanlab_quality,
    cleanlab_quality_multiclass,
)

NAMES = ["other", "lake", "snow_ice"]


def _one_hot(classes: np.ndarray, n: int = 3, sure: float = 0.94) -> np.ndarray:
    """(C, H, W) probabilities with `sure` on the given class and the rest shared by the others."""
    probs = np.full((n, *classes.shape), (1 - sure) / (n - 1))
    np.put_along_axis(probs, classes[None].astype(np.int64), sure, axis=0)
    return probs


def test_class_terms_match_a_hand_computation() -> None:
    label = np.zeros((10, 10), dtype=np.uint8)
    label[0:4, 0:5] = 1  # 20 lake pixels
    label[6:10, 6:10] = 2  # 16 snow pixels
    label[9, 0] = IGNORE_INDEX
    predicted = label.copy()
    predicted[0:4, 0:5] = 0  # the lake is missed
    predicted[9, 0] = 2  # an unlabelled pixel: never counted
    valid = np.ones((10, 10), dtype=bool)
    valid[5] = False  # 10 nodata pixels (all "other")
    probs = _one_hot(predicted)
    terms = class_noise_terms(label, valid, probs, NAMES, ReviewParams(), smooth_pixels=0.0)
    # scored pixels: 100 - 10 nodata - 1 unlabelled = 89; other: label 53, predicted 73, both 53
    assert terms["mismatch_share"] == pytest.approx(20 / 89)
    assert terms["disagree.other"] == pytest.approx(1 - 53 / 73)
    assert terms["disagree.lake"] == pytest.approx(1.0)
    assert terms["disagree.snow_ice"] == pytest.approx(0.0)
    assert terms["model_disagreement"] == pytest.approx(0.5)  # mean over lake and snow_ice
    # every scored pixel is confident (0.94 > 0.9); the 20 lake pixels give p[label] = 0.03
    assert terms["confident_error"] == pytest.approx(20 * 0.97 / 89 + 69 * 0.06 / 89)
    cfg = ReviewParams()  # the score weighs the terms with the review's weights (no index term here)
    expected = cfg.model_weight * terms["model_disagreement"] + cfg.confident_weight * terms["confident_error"]
    assert terms["score"] == pytest.approx(expected)
    # the smoothing pseudo-count: a class absent from the label with 2 stray predicted pixels barely counts
    stray = np.where(label == IGNORE_INDEX, 0, label)
    stray[0, 9] = 2
    smoothed = class_noise_terms(label, valid, _one_hot(stray), NAMES, smooth_pixels=8.0)
    assert smoothed["disagree.snow_ice"] == pytest.approx(1 - (16 + 8) / (17 + 8))
    assert math.isnan(class_noise_terms(label, valid, None, NAMES)["disagree.lake"])


def test_cleanlab_multiclass_matches_cleanlab_and_the_binary_score() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 3, 12, 12)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 3, size=(4, 12, 12))
    scored = np.ones(labels.shape, dtype=bool)
    expected, _ = get_label_quality_scores(labels, probs.astype(np.float32), method="softmin", verbose=False)
    assert np.allclose(cleanlab_quality_multiclass(labels, probs, scored), expected)
    # two classes: the same numbers as the binary review's cleanlab score
    p = rng.uniform(size=(3, 12, 12))
    binary = rng.integers(0, 2, size=(3, 12, 12))
    scored = rng.uniform(size=binary.shape) > 0.1
    two = np.stack([1 - p, p], axis=1)
    assert np.allclose(cleanlab_quality_multiclass(binary, two, scored), cleanlab_quality(binary, p, scored), atol=1e-6)


def test_class_review_table_ranks_the_corrupted_chip_first() -> None:
    rng = np.random.default_rng(3)
    chips = []
    for i in range(8):
        truth = np.zeros((32, 32), dtype=np.uint8)
        truth[:, 20:] = 2
        y, x = rng.integers(2, 14, size=2)
        truth[y : y + 8, x : x + 8] = 1
        label = truth.copy()
        if i == 5:
            label[label == 1] = 0  # the lake omitted from the label
        chips.append(
            ReviewChip(
                image=np.zeros((1, 32, 32)),
                band_names=["B03"],
                label=label,
                valid=np.ones((32, 32), dtype=bool),
                row={"chip_id": f"c{i}", "noisy": i == 5},
                class_probs=_one_hot(truth, sure=0.9 + 0.005 * (i % 4)),
            )
        )
    table = order_columns(class_review_table(chips, NAMES, ReviewParams(batch_size=3), progress=False))
    assert table.loc[0, "chip_id"] == "c5" and table.loc[0, "rank"] == 1
    assert {"disagree.other", "disagree.lake", "disagree.snow_ice", "cleanlab_quality", "score"} <= set(table)
    assert table.loc[0, "disagree.lake"] > 0.8 and table.loc[1:, "disagree.lake"].max() < 0.05
    assert table["cleanlab_quality"].idxmin() == 0  # cleanlab agrees: the lowest label quality

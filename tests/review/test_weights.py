"""The default review weights against injected label noise, on recorded signals of demo stores.

`data/demo_review_signals.csv` holds the review signals of four demo stores (320 chips of 64 px, 10 of them
with injected noise each): the demo model scoring its own store (generator seed 0, in sample) and three
fresh stores of generator seeds 1-3 (out of sample). Kept per store: the corrupted chips and the 60 most
suspicious chips by each signal, which holds every chip that can reach the top 10.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from workbench.params import ReviewParams
from workbench.review.ranking import rank_by_score, top_k_scores
from workbench.review.signals import combined_score

SIGNALS = pd.read_csv(Path(__file__).parent / "data" / "demo_review_signals.csv")
STORES = sorted(SIGNALS["store"].unique())


def ranked(store: str, cfg: ReviewParams) -> pd.DataFrame:
    table = SIGNALS[SIGNALS["store"] == store].reset_index(drop=True)
    table["score"] = combined_score(table, cfg)
    table["rank"] = rank_by_score(table)
    return table


@pytest.mark.parametrize("store", STORES)
def test_default_weights_find_the_injected_noise(store: str) -> None:
    result = top_k_scores(ranked(store, ReviewParams()), 10)
    assert result["n_true"] == 10
    assert result["precision"] >= 0.9 and result["recall"] >= 0.9


def test_old_weights_fell_short_and_the_choice_is_not_a_knife_edge() -> None:
    old = ReviewParams(model_weight=1.0, index_weight=0.5, confident_weight=1.0, cleanlab_weight=0.5)
    assert all(top_k_scores(ranked(store, old), 10)["precision"] == 0.8 for store in STORES)
    for model, cleanlab in ((0.5, 4.0), (0.25, 8.0), (0.1, 4.0)):  # neighbours of the defaults
        cfg = ReviewParams(model_weight=model, index_weight=0.25, cleanlab_weight=cleanlab)
        assert all(top_k_scores(ranked(store, cfg), 10)["precision"] >= 0.9 for store in STORES)

"""Ranking of the label-noise review: score a split chip by chip and rank the chips by suspicion.

`review_table` streams chips (bounded memory) into one row per chip with the water-index agreement
columns of `workbench.data.agreement`, the suspicion-score terms of `workbench.review.signals`, and a
rank (1 = review first). `iter_store_chips` reads the chips of an opened store for it. Where chips with
injected label noise are known, `top_k_scores` measures how many of them the top of the ranking finds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from workbench.data.agreement import (
    AGREEMENT_COLUMNS,
    ReviewInputError,
    agreement_from_masks,
    prepare_masks,
    require_columns,
)
from workbench.functional import precision, recall
from workbench.params import ReviewParams
from workbench.review.signals import SCORE_COLUMNS, ReviewChip, noise_terms_from_masks


def _as_review_chip(item: ReviewChip | Mapping[str, Any]) -> ReviewChip:
    if isinstance(item, ReviewChip):
        return item
    if isinstance(item, Mapping):
        missing = [key for key in ("image", "band_names", "label", "valid") if key not in item]
        if missing:
            raise ReviewInputError(f"review input is missing {missing}; expected image, band_names, label, valid")
        return ReviewChip(
            image=item["image"],
            band_names=item["band_names"],
            label=item["label"],
            valid=item["valid"],
            prob=item.get("prob"),
            row=item.get("row", {}),
        )
    raise ReviewInputError(f"review input must be a ReviewChip or a mapping, got {type(item).__name__}")


def review_row(
    chip: ReviewChip,
    cfg: ReviewParams,
    threshold: float = 0.5,
    confident_weight: float = 1.0,
    confidence: float = 0.9,
    smooth_pixels: float = 8.0,
    green: str = "B03",
    swir: str = "B11",
) -> dict[str, Any]:
    """One review-table row: the catalog row, the agreement columns and the score terms of one chip."""
    masks = prepare_masks(
        chip.image,
        chip.band_names,
        chip.label,
        chip.valid,
        chip.prob,
        cfg.water_index_threshold,
        threshold,
        green,
        swir,
        chip_id=chip.chip_id,
    )
    row = {key: value for key, value in dict(chip.row).items() if np.ndim(value) == 0}
    row.update(agreement_from_masks(masks, cfg))
    row.update(noise_terms_from_masks(masks, cfg, confident_weight, confidence, smooth_pixels))
    return row


def rank_by_score(table: pd.DataFrame) -> pd.Series:
    """Rank 1 = highest score (most suspicious); ties keep table order, missing scores rank last."""
    ranks = table["score"].rank(ascending=False, method="first", na_option="bottom")
    return ranks.astype("int64")


def review_table(
    chips: Iterable[ReviewChip | Mapping[str, Any]],
    cfg: ReviewParams | None = None,
    threshold: float = 0.5,
    confident_weight: float = 1.0,
    confidence: float = 0.9,
    smooth_pixels: float = 8.0,
    green: str = "B03",
    swir: str = "B11",
    progress: bool = True,
) -> pd.DataFrame:
    """Score chips one at a time (bounded memory) into a table with one row per chip, in input order.

    Columns: the catalog row's scalar fields (chip_id, region, year, lat, lon, split, noisy, ...), the
    `chip_agreement` columns, the `noise_score` terms, `score` and `rank` (1 = most suspicious).
    """
    cfg = cfg or ReviewParams()
    total = len(chips) if isinstance(chips, Sized) else None
    rows = [
        review_row(_as_review_chip(item), cfg, threshold, confident_weight, confidence, smooth_pixels, green, swir)
        for item in tqdm(chips, total=total, desc="label review", unit="chip", disable=not progress)
    ]
    if not rows:
        return pd.DataFrame(columns=["chip_id", *AGREEMENT_COLUMNS, *SCORE_COLUMNS, "rank"])
    table = pd.DataFrame(rows)
    table["prefilter_keep"] = table["prefilter_keep"].astype(bool)
    table["rank"] = rank_by_score(table)
    return table


def iter_store_chips(
    ds: Any,
    probabilities: Any = None,
    splits: Sequence[str] | None = None,
) -> Iterator[ReviewChip]:
    """Yield the chips of an opened chip store (`workbench.data.store.open_store`) one by one.

    `probabilities` is None, an array-like (chip, y, x) aligned with the store, or a mapping chip_id -> (y, x)
    array (chips missing from it get no probability). Only chips whose split is in `splits` are read.
    """
    band_names = [str(name) for name in ds["band"].values]
    chip_ids = [str(value) for value in ds["chip_id"].values]
    coords = {name: ds[name].values for name in ds["chip"].coords if name != "chip"}
    if probabilities is not None and not isinstance(probabilities, Mapping) and len(probabilities) != len(chip_ids):
        raise ReviewInputError(f"probabilities hold {len(probabilities)} chips but the store has {len(chip_ids)}")
    for position, chip_id in enumerate(chip_ids):
        row = {name: _scalar(values[position]) for name, values in coords.items()}
        row["chip_id"] = chip_id
        if splits is not None and row.get("split") not in splits:
            continue
        chip = ds.isel(chip=position)
        if probabilities is None:
            prob = None
        elif isinstance(probabilities, Mapping):
            prob = probabilities.get(chip_id)
        else:
            prob = np.asarray(probabilities[position])
        yield ReviewChip(
            image=chip["image"].values,
            band_names=band_names,
            label=chip["label"].values,
            valid=chip["valid"].values.astype(bool),
            prob=None if prob is None else np.asarray(prob),
            row=row,
        )


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def resolve_top_k(table: pd.DataFrame, cfg: ReviewParams, truth_column: str = "noisy") -> int:
    """cfg.top_k, else the number of chips flagged in `truth_column`, else 20."""
    if cfg.top_k is not None:
        return cfg.top_k
    if truth_column in table.columns:
        n_true = int(table[truth_column].fillna(False).astype(bool).sum())
        if n_true > 0:
            return n_true
    return 20


def top_k_scores(table: pd.DataFrame, k: int, truth_column: str = "noisy") -> dict[str, Any]:
    """Precision and recall of the k best-ranked chips against the known corrupted chips in `truth_column`.

    Returns k (the number of chips actually taken), precision (hits / k), recall (hits / n_true, NaN when
    nothing is corrupted), n_true and hits.
    """
    require_columns(table, ["rank", truth_column], "top_k_scores")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    truth = table[truth_column]
    if truth.isna().any():
        raise ReviewInputError(f"column {truth_column!r} has missing values; it must be True/False for every chip")
    truth = truth.astype(bool)
    top = table.sort_values("rank", kind="stable").head(k)
    hits = int(truth.loc[top.index].sum())
    n_true = int(truth.sum())
    taken = len(top)
    return {
        "k": taken,
        "precision": float(precision(hits, taken - hits, 0, 0)),
        "recall": float(recall(hits, 0, n_true - hits, 0)),
        "n_true": n_true,
        "hits": hits,
    }

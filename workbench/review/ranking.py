"""Ranking of the label-noise review: score a split chip by chip and rank the chips by suspicion.

`review_table` streams chips (bounded memory) into one row per chip with the water-index agreement
columns of `workbench.data.agreement`, the suspicion-score terms of `workbench.review.signals`, and a
rank (1 = review first). `iter_store_chips` reads the chips of an opened store for it. Where chips with
injected label noise are known, `top_k_scores` measures how many of them the top of the ranking finds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from workbench.arrays import IGNORE_INDEX
from workbench.data.agreement import (
    AGREEMENT_COLUMNS,
    ChipMasks,
    ReviewInputError,
    agreement_from_masks,
    index_plane,
    prepare_masks,
    require_columns,
)
from workbench.functional import precision, recall
from workbench.indices import expression_bands
from workbench.params import ReviewParams
from workbench.review.annotators import vote_signals
from workbench.review.signals import (
    SCORE_COLUMNS,
    SIGNAL_COLUMNS,
    ReviewChip,
    class_column,
    class_noise_terms,
    cleanlab_quality,
    cleanlab_quality_multiclass,
    combined_score,
    noise_terms_from_masks,
)


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
            votes=item.get("votes"),
            n_annotators=int(item.get("n_annotators", 0)),
        )
    raise ReviewInputError(f"review input must be a ReviewChip or a mapping, got {type(item).__name__}")


def review_row(
    chip: ReviewChip,
    cfg: ReviewParams,
    threshold: float = 0.5,
    confident_weight: float | None = None,
    confidence: float = 0.9,
    smooth_pixels: float = 8.0,
    green: str = "B03",
    swir: str = "B11",
    masks_out: list[ChipMasks] | None = None,
) -> dict[str, Any]:
    """One review-table row: the catalog row, the agreement columns, the score terms and vote signals of one chip.

    The index compared with the label is `cfg.index` (see `workbench.data.agreement.index_plane`).
    """
    index = (
        None if cfg.index == "none" else index_plane(chip.image, chip.band_names, cfg.index, green, swir, cfg.nir_band)
    )
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
        index_values=index,
        use_index=cfg.index != "none",
    )
    weight = cfg.confident_weight if confident_weight is None else confident_weight
    row = {key: value for key, value in dict(chip.row).items() if np.ndim(value) == 0}
    row.update(agreement_from_masks(masks, cfg))
    row.update(noise_terms_from_masks(masks, cfg, weight, confidence, smooth_pixels))
    if chip.votes is not None:
        if chip.n_annotators < 1:
            raise ReviewInputError(f"chip {chip.chip_id!r}: a votes plane needs n_annotators >= 1")
        row.update(vote_signals(chip.votes, chip.n_annotators, chip.valid))
    if masks_out is not None:
        masks_out.append(masks)
    return row


def rank_by_score(table: pd.DataFrame) -> pd.Series:
    """Rank 1 = highest score (most suspicious); ties keep table order, missing scores rank last."""
    ranks = table["score"].rank(ascending=False, method="first", na_option="bottom")
    return ranks.astype("int64")


def _cleanlab_batch(masks: list[ChipMasks]) -> list[float]:
    """cleanlab quality of a batch of chips (NaN for chips without a model probability)."""
    with_prob = [i for i, m in enumerate(masks) if m.prob is not None]
    out = [math.nan] * len(masks)
    if not with_prob:
        return out
    shapes = {masks[i].label.shape for i in with_prob}
    groups = {shape: [i for i in with_prob if masks[i].label.shape == shape] for shape in shapes}
    for members in groups.values():
        labels = np.stack([masks[i].label for i in members])
        probs = np.stack([masks[i].prob for i in members])  # type: ignore[misc]
        scored = np.stack([masks[i].scored for i in members])
        for i, quality in zip(members, cleanlab_quality(labels, probs, scored), strict=True):
            out[i] = float(quality)
    return out


def order_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The review table sorted by rank with rank, chip_id, score and the signals first."""
    signals = [*SIGNAL_COLUMNS, "mismatch_share", *sorted(c for c in table.columns if str(c).startswith("disagree."))]
    first = [c for c in ["rank", "chip_id", "score", *signals, "scored_by", "split", "region"] if c in table]
    rest = [c for c in table.columns if c not in first]
    return table.sort_values("rank", kind="stable")[first + rest].reset_index(drop=True)


def review_table(
    chips: Iterable[ReviewChip | Mapping[str, Any]],
    cfg: ReviewParams | None = None,
    threshold: float = 0.5,
    confident_weight: float | None = None,
    confidence: float = 0.9,
    smooth_pixels: float = 8.0,
    green: str = "B03",
    swir: str = "B11",
    progress: bool = True,
    cleanlab: bool = True,
) -> pd.DataFrame:
    """Score chips batch by batch (bounded memory) into a table with one row per chip, in input order.

    Columns: the catalog row's scalar fields (chip_id, region, year, lat, lon, split, noisy, scored_by, ...),
    the `chip_agreement` columns, the `noise_terms` terms, `cleanlab_quality` (chips with a model
    probability, `cfg.batch_size` chips per cleanlab call), `vote_entropy` and `contested_share` (chips with
    a votes plane), `score` (`workbench.review.signals.combined_score`) and `rank` (1 = most suspicious).
    Use `order_columns` for the ranking view.
    """
    cfg = cfg or ReviewParams()
    if confident_weight is not None:
        cfg = cfg.model_copy(update={"confident_weight": confident_weight})
    if cfg.index not in ("mndwi", "ndwi", "none"):
        expression_bands(cfg.index)  # a clear error before the first chip
    total = len(chips) if isinstance(chips, Sized) else None
    rows: list[dict[str, Any]] = []
    batch: list[ChipMasks] = []
    start = 0
    for item in tqdm(chips, total=total, desc="label review", unit="chip", disable=not progress):
        rows.append(
            review_row(_as_review_chip(item), cfg, threshold, None, confidence, smooth_pixels, green, swir, batch)
        )
        if len(batch) >= cfg.batch_size:
            for offset, quality in enumerate(_cleanlab_batch(batch) if cleanlab else [math.nan] * len(batch)):
                rows[start + offset]["cleanlab_quality"] = quality
            start, batch = len(rows), []
    if batch:
        for offset, quality in enumerate(_cleanlab_batch(batch) if cleanlab else [math.nan] * len(batch)):
            rows[start + offset]["cleanlab_quality"] = quality
    if not rows:
        return pd.DataFrame(columns=["chip_id", *AGREEMENT_COLUMNS, *SCORE_COLUMNS, "cleanlab_quality", "rank"])
    table = pd.DataFrame(rows)
    table["prefilter_keep"] = table["prefilter_keep"].astype(bool)
    table["score"] = combined_score(table, cfg)
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
    has_votes = "votes" in ds
    n_annotators = int(ds.attrs.get("n_annotators", 0)) if has_votes else 0
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
            votes=chip["votes"].values if has_votes else None,
            n_annotators=n_annotators,
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


# --------------------------------------------------------------------------- multiclass


def _class_cleanlab_batch(batch: list[ReviewChip], n_classes: int) -> list[float]:
    """cleanlab quality of a batch of softmax chips (NaN for chips without probabilities)."""
    out = [math.nan] * len(batch)
    members_by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, chip in enumerate(batch):
        if chip.class_probs is not None:
            members_by_shape.setdefault(np.shape(chip.label), []).append(i)
    for members in members_by_shape.values():
        labels = np.stack([np.asarray(batch[i].label) for i in members])
        probs = np.stack([np.asarray(batch[i].class_probs) for i in members])
        valid = np.stack([np.asarray(batch[i].valid, dtype=bool) for i in members])
        scored = valid & (labels != IGNORE_INDEX) & (labels < n_classes)
        for i, quality in zip(members, cleanlab_quality_multiclass(labels, probs, scored), strict=True):
            out[i] = float(quality)
    return out


def class_review_table(
    chips: Iterable[ReviewChip | Mapping[str, Any]],
    names: Sequence[str],
    cfg: ReviewParams | None = None,
    confidence: float = 0.9,
    smooth_pixels: float = 8.0,
    progress: bool = True,
    cleanlab: bool = True,
) -> pd.DataFrame:
    """The review table of a softmax model: one row per chip, the columns of `review_table` where they apply.

    Each chip needs `class_probs` (C, H, W calibrated probabilities) and optionally `predicted` (the decided
    class map). Columns: the catalog row's scalar fields, `class_noise_terms` (model_disagreement,
    mismatch_share, confident_error, one `disagree.<class>` column per class), `cleanlab_quality` (softmax
    probabilities (N, C, H, W), `cfg.batch_size` chips per call), `score`
    (`workbench.review.signals.combined_score`: the index and vote terms add 0) and `rank`.
    """
    cfg = cfg or ReviewParams()
    total = len(chips) if isinstance(chips, Sized) else None
    rows: list[dict[str, Any]] = []
    batch: list[ReviewChip] = []

    def flush() -> None:
        qualities = _class_cleanlab_batch(batch, len(names)) if cleanlab else [math.nan] * len(batch)
        for offset, quality in enumerate(qualities):
            rows[len(rows) - len(batch) + offset]["cleanlab_quality"] = quality
        batch.clear()

    for item in tqdm(chips, total=total, desc="label review", unit="chip", disable=not progress):
        chip = _as_review_chip(item)
        if isinstance(item, Mapping):
            chip.class_probs, chip.predicted = item.get("class_probs"), item.get("predicted")
        row = {key: value for key, value in dict(chip.row).items() if np.ndim(value) == 0}
        row.update(
            class_noise_terms(
                chip.label, chip.valid, chip.class_probs, names, cfg, chip.predicted, confidence, smooth_pixels
            )
        )
        rows.append(row)
        batch.append(chip)
        if len(batch) >= cfg.batch_size:
            flush()
    if batch:
        flush()
    columns = [class_column(name) for name in names]
    if not rows:
        return pd.DataFrame(columns=["chip_id", *SCORE_COLUMNS, "mismatch_share", *columns, "cleanlab_quality", "rank"])
    table = pd.DataFrame(rows)
    table["score"] = combined_score(table, cfg)
    table["rank"] = rank_by_score(table)
    return table

"""Label-noise review: find chips whose label disagrees with the imagery and with the model.

Three independent views of each chip are compared:

* the label (the supervision we want to audit),
* the MNDWI water index computed from the raw Sentinel-2 reflectance (physics, no learning),
* the model's (preferably out-of-sample) water probability.

`chip_agreement` gives the agreement numbers and the water-index pre-filter decision for one chip,
`noise_score` turns the disagreements into one suspicion score, `review_table` streams a whole split
chip by chip into a ranked table, and `ReviewLog` keeps the human decisions taken while looking at the
ranked chips. `corrected_metrics` recomputes the pooled IoU after dropping the chips judged mislabelled.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from workbench.arrays import IGNORE_INDEX
from workbench.functional import confusion_counts, iou_score, precision, recall
from workbench.params import ReviewParams

DECISIONS = ("keep", "drop", "fix", "unsure")

REASON_AGREES = "kept: label agrees with water index"
REASON_LOW_IOU = "dropped: label/water IoU too low"
REASON_WATER_EXCESS = "dropped: water index much larger than label"
REASON_LOW_IOU_AND_EXCESS = "dropped: low IoU and water index much larger than label"
REASON_EMPTY_DRY = "kept: empty label, little water"
REASON_EMPTY_WET = "dropped: empty label but water index finds water"

AGREEMENT_COLUMNS = [
    "n_pixels",
    "label_fraction",
    "water_fraction",
    "iou_label_water",
    "water_label_ratio",
    "model_fraction",
    "iou_label_model",
    "iou_model_water",
    "prefilter_keep",
    "prefilter_reason",
]
SCORE_COLUMNS = ["model_disagreement", "index_disagreement", "confident_error", "score"]


class ReviewInputError(ValueError):
    """A chip handed to the review does not have the expected arrays, shapes or values."""


# --------------------------------------------------------------------------- per-chip inputs


@dataclass
class ReviewChip:
    """One chip as the review reads it: raw image, band names, label, valid mask, model probability, catalog row."""

    image: np.ndarray  # (C, H, W) raw reflectance, not normalised
    band_names: Sequence[str]
    label: np.ndarray  # (H, W) class ids, IGNORE_INDEX = not labelled
    valid: np.ndarray  # (H, W) bool, False = nodata
    prob: np.ndarray | None = None  # (H, W) model water probability, out-of-sample where possible
    row: Mapping[str, Any] = field(default_factory=dict)  # chip_id, region, year, lat, lon, split, [noisy]

    @property
    def chip_id(self) -> str:
        return str(self.row.get("chip_id", ""))


@dataclass(frozen=True)
class _ChipMasks:
    """Boolean views of one chip restricted to scored pixels (valid and labelled)."""

    scored: np.ndarray
    label: np.ndarray
    water: np.ndarray
    prob: np.ndarray | None
    pred: np.ndarray | None


def _where(chip_id: str) -> str:
    return f"chip {chip_id!r}" if chip_id else "chip"


def _prepare(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    valid: np.ndarray,
    prob: np.ndarray | None,
    water_threshold: float,
    threshold: float,
    green: str,
    swir: str,
    chip_id: str = "",
) -> _ChipMasks:
    """Check shapes and values, compute MNDWI water and the thresholded prediction on scored pixels."""
    from workbench.indices import mndwi

    where = _where(chip_id)
    image = np.asarray(image)
    label = np.asarray(label)
    valid = np.asarray(valid)
    if image.ndim != 3:
        raise ReviewInputError(f"{where}: image has shape {image.shape}, expected (bands, height, width)")
    if len(band_names) != image.shape[0]:
        raise ReviewInputError(
            f"{where}: {len(band_names)} band names {list(band_names)} for an image with {image.shape[0]} bands"
        )
    shape = image.shape[1:]
    for name, plane in (("label", label), ("valid", valid)):
        if plane.shape != shape:
            raise ReviewInputError(f"{where}: {name} has shape {plane.shape}, expected {shape} like the image")
    if valid.dtype != bool:
        raise ReviewInputError(f"{where}: valid must be a bool mask, got dtype {valid.dtype}")
    scored = valid & (label != IGNORE_INDEX)
    index = np.asarray(mndwi(image, list(band_names), green=green, swir=swir), dtype=np.float64)
    water = scored & (index > water_threshold)
    positive = scored & (label > 0)
    probability: np.ndarray | None = None
    pred: np.ndarray | None = None
    if prob is not None:
        probability = np.asarray(prob, dtype=np.float64)
        if probability.shape != shape:
            raise ReviewInputError(f"{where}: prob has shape {probability.shape}, expected {shape} like the image")
        inside = probability[scored]
        if not np.isfinite(inside).all() or (inside < 0).any() or (inside > 1).any():
            raise ReviewInputError(f"{where}: prob must be a probability in [0, 1] on valid pixels (not logits)")
        probability = np.where(scored, probability, 0.0)
        pred = scored & (probability >= threshold)
    return _ChipMasks(scored=scored, label=positive, water=water, prob=probability, pred=pred)


def mask_iou(a: np.ndarray, b: np.ndarray, smooth: float = 0.0) -> float:
    """IoU of two boolean masks, (|a & b| + smooth) / (|a | b| + smooth); 1.0 when both are empty."""
    counts = confusion_counts(a, b, per_image=False)
    return float(iou_score(*counts, zero_division=1.0, smooth=smooth)[0])


# --------------------------------------------------------------------------- agreement and pre-filter


def prefilter_decision(
    n_label: int, n_water: int, iou_label_water: float, water_fraction: float, cfg: ReviewParams
) -> tuple[bool, str]:
    """The water-index pre-filter: keep a chip only when its label is plausible given MNDWI.

    Non-empty label: keep iff IoU(label, water) >= prefilter_min_iou and
    n_water / max(n_label, 1) <= prefilter_max_ratio. Empty label: keep iff the water fraction
    <= prefilter_empty_max_water.
    """
    if n_label > 0:
        low_iou = iou_label_water < cfg.prefilter_min_iou
        excess = n_water / max(n_label, 1) > cfg.prefilter_max_ratio
        if low_iou and excess:
            return False, REASON_LOW_IOU_AND_EXCESS
        if low_iou:
            return False, REASON_LOW_IOU
        if excess:
            return False, REASON_WATER_EXCESS
        return True, REASON_AGREES
    if water_fraction <= cfg.prefilter_empty_max_water:
        return True, REASON_EMPTY_DRY
    return False, REASON_EMPTY_WET


def _agreement(masks: _ChipMasks, cfg: ReviewParams) -> dict[str, Any]:
    n_pixels = int(np.count_nonzero(masks.scored))
    n_label = int(np.count_nonzero(masks.label))
    n_water = int(np.count_nonzero(masks.water))
    denominator = max(n_pixels, 1)
    iou_label_water = mask_iou(masks.label, masks.water)
    water_fraction = n_water / denominator
    keep, reason = prefilter_decision(n_label, n_water, iou_label_water, water_fraction, cfg)
    result: dict[str, Any] = {
        "n_pixels": n_pixels,
        "label_fraction": n_label / denominator,
        "water_fraction": water_fraction,
        "iou_label_water": iou_label_water,
        "water_label_ratio": n_water / max(n_label, 1),
        "model_fraction": math.nan,
        "iou_label_model": math.nan,
        "iou_model_water": math.nan,
        "prefilter_keep": keep,
        "prefilter_reason": reason,
    }
    if masks.pred is not None:
        result["model_fraction"] = int(np.count_nonzero(masks.pred)) / denominator
        result["iou_label_model"] = mask_iou(masks.label, masks.pred)
        result["iou_model_water"] = mask_iou(masks.pred, masks.water)
    return result


def chip_agreement(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    valid: np.ndarray,
    prob: np.ndarray | None = None,
    cfg: ReviewParams | None = None,
    threshold: float = 0.5,
    green: str = "B03",
    swir: str = "B11",
) -> dict[str, Any]:
    """Agreement between label, MNDWI water and model prediction for one chip, plus the pre-filter decision.

    Pixels counted are the scored ones (valid and labelled). Water is MNDWI > cfg.water_index_threshold,
    the prediction is prob >= threshold. IoUs of two empty masks are 1. Model columns are NaN without
    `prob`. Keys: n_pixels, label_fraction, water_fraction, iou_label_water, water_label_ratio
    (n_water / max(n_label, 1)), model_fraction, iou_label_model, iou_model_water, prefilter_keep,
    prefilter_reason.
    """
    cfg = cfg or ReviewParams()
    masks = _prepare(image, band_names, label, valid, prob, cfg.water_index_threshold, threshold, green, swir)
    return _agreement(masks, cfg)


# --------------------------------------------------------------------------- noise score


def _noise_terms(
    masks: _ChipMasks, cfg: ReviewParams, confident_weight: float, confidence: float, smooth_pixels: float
) -> dict[str, float]:
    if masks.pred is None or masks.prob is None:
        index_disagreement = 1.0 - mask_iou(masks.label, masks.water, smooth_pixels)
        return {
            "model_disagreement": math.nan,
            "index_disagreement": index_disagreement,
            "confident_error": math.nan,
            "score": cfg.index_weight * index_disagreement,
        }
    model_disagreement = 1.0 - mask_iou(masks.label, masks.pred, smooth_pixels)
    agree = masks.scored & (masks.pred == masks.water)
    index_disagreement = 1.0 - mask_iou(masks.label & agree, masks.water & agree, smooth_pixels)
    confident = masks.scored & ((masks.prob > confidence) | (masks.prob < 1.0 - confidence))
    errors = np.abs(masks.prob[confident] - masks.label[confident])
    confident_error = float(errors.mean()) if errors.size else 0.0
    score = (
        cfg.model_weight * model_disagreement
        + cfg.index_weight * index_disagreement
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
    masks = _prepare(image, band_names, label, valid, prob, cfg.water_index_threshold, threshold, green, swir)
    return _noise_terms(masks, cfg, confident_weight, confidence, smooth_pixels)


def noise_score(
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
    Without `prob` the score is cfg.index_weight * (1 - IoU_s(L, W)).
    """
    terms = noise_terms(
        image, band_names, label, valid, prob, cfg, threshold, confident_weight, confidence, smooth_pixels, green, swir
    )
    return terms["score"]


# --------------------------------------------------------------------------- tables


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
    masks = _prepare(
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
    row.update(_agreement(masks, cfg))
    row.update(_noise_terms(masks, cfg, confident_weight, confidence, smooth_pixels))
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


def _require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ReviewInputError(f"{what} needs columns {missing}; the table has {list(table.columns)}")


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
    _require_columns(table, ["rank", truth_column], "top_k_scores")
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


def prefilter_table(table: pd.DataFrame, near_zero_iou: float = 0.05) -> pd.DataFrame:
    """Chips kept and dropped by the water-index pre-filter, one row per reason.

    Columns: decision (kept/dropped), reason, n_chips, share (of all chips), median_iou_label_water and
    n_iou_below (chips with IoU(label, water) < `near_zero_iou`, the signature of misregistered labels).
    """
    _require_columns(table, ["prefilter_keep", "prefilter_reason", "iou_label_water"], "prefilter_table")
    total = max(len(table), 1)
    rows = []
    grouped = table.groupby(["prefilter_keep", "prefilter_reason"], sort=False)
    for (keep, reason), group in grouped:
        iou = group["iou_label_water"].astype(float)
        rows.append(
            {
                "decision": "kept" if keep else "dropped",
                "reason": reason,
                "n_chips": len(group),
                "share": len(group) / total,
                "median_iou_label_water": float(iou.median()),
                "n_iou_below": int((iou < near_zero_iou).sum()),
            }
        )
    columns = ["decision", "reason", "n_chips", "share", "median_iou_label_water", "n_iou_below"]
    result = pd.DataFrame(rows, columns=columns)
    return result.sort_values(["decision", "n_chips"], ascending=[False, False], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- human decisions


class ReviewLogWarning(UserWarning):
    """A line of a review log could not be read and was skipped."""


@dataclass(frozen=True)
class ReviewDecision:
    """One human decision about one chip."""

    chip_id: str
    decision: str
    note: str = ""
    reviewer: str = ""
    time: str = ""


def _parse_decision(text: str) -> ReviewDecision:
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    chip_id = record.get("chip_id")
    decision = record.get("decision")
    if not isinstance(chip_id, str) or not chip_id:
        raise ValueError("chip_id missing")
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r} is not one of {DECISIONS}")
    return ReviewDecision(
        chip_id=chip_id,
        decision=decision,
        note=str(record.get("note", "")),
        reviewer=str(record.get("reviewer", "")),
        time=str(record.get("time", "")),
    )


class ReviewLog:
    """Append-only JSON-lines file of review decisions; the latest line per chip wins.

    Every decision is written as one line, flushed and fsynced before `record` returns, so a crash loses
    at most the line being written. A damaged line (for example a half-written last line) is reported with
    a `ReviewLogWarning`, listed in `problems`, and skipped; the lines before and after it survive.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.problems: list[str] = []

    def record(self, chip_id: str, decision: str, note: str = "", reviewer: str = "") -> ReviewDecision:
        """Append one decision ("keep", "drop", "fix" or "unsure") for `chip_id`."""
        if not isinstance(chip_id, str) or not chip_id:
            raise ValueError(f"{self.path}: chip_id must be a non-empty string, got {chip_id!r}")
        if decision not in DECISIONS:
            raise ValueError(f"{self.path}: decision must be one of {DECISIONS}, got {decision!r}")
        entry = ReviewDecision(
            chip_id=chip_id,
            decision=decision,
            note=note,
            reviewer=reviewer,
            time=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._append(json.dumps(asdict(entry), ensure_ascii=False))
        return entry

    def _append(self, line: str) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            prefix = b""
            end = handle.seek(0, os.SEEK_END)
            if end > 0:
                handle.seek(end - 1)
                if handle.read(1) != b"\n":
                    prefix = b"\n"  # a damaged last line must not swallow this decision
            handle.write(prefix + line.encode("utf-8") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            _fsync_directory(self.path.parent)

    def read(self) -> list[ReviewDecision]:
        """All readable decisions in file order; unreadable lines are warned about and skipped."""
        self.problems = []
        if not self.path.exists():
            return []
        decisions = []
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    decisions.append(_parse_decision(text))
                except (ValueError, TypeError) as exc:
                    problem = f"{self.path}:{number}: skipped unreadable review decision ({exc})"
                    self.problems.append(problem)
                    warnings.warn(problem, ReviewLogWarning, stacklevel=2)
        return decisions

    def latest(self) -> dict[str, ReviewDecision]:
        """The latest decision for each chip (later lines override earlier ones)."""
        return {decision.chip_id: decision for decision in self.read()}

    def chip_ids(self, decision: str = "drop") -> set[str]:
        """Chips whose latest decision is `decision`."""
        return {chip_id for chip_id, entry in self.latest().items() if entry.decision == decision}


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def review_decisions(path: str | Path) -> pd.DataFrame:
    """The latest decision per chip in a review log as a table (chip_id, decision, note, reviewer, time)."""
    latest = ReviewLog(path).latest()
    columns = ["chip_id", "decision", "note", "reviewer", "time"]
    return pd.DataFrame([asdict(entry) for entry in latest.values()], columns=columns)


# --------------------------------------------------------------------------- corrected metrics


def _pooled_iou(stats: pd.DataFrame) -> float:
    tp, fp, fn = (float(stats[c].sum()) for c in ("tp", "fp", "fn"))
    return float(iou_score(tp, fp, fn, 0.0))


def corrected_metrics(
    per_chip_stats: pd.DataFrame, dropped: Iterable[str], group_column: str | None = None
) -> dict[str, Any]:
    """Pooled IoU = sum TP / sum (TP + FP + FN) before and after dropping the chips judged mislabelled.

    Returns iou, iou_corrected, delta, n_chips, n_dropped (dropped ids found in the table), n_kept and
    unmatched (dropped ids not in the table). With `group_column` (e.g. "region") also per_group:
    {group: {iou, iou_corrected, n_chips, n_dropped}}.
    """
    needed = ["chip_id", "tp", "fp", "fn"] + ([group_column] if group_column else [])
    _require_columns(per_chip_stats, needed, "corrected_metrics")
    dropped_ids = {str(chip_id) for chip_id in dropped}
    is_dropped = per_chip_stats["chip_id"].astype(str).isin(dropped_ids)
    kept = per_chip_stats[~is_dropped]
    matched = set(per_chip_stats.loc[is_dropped, "chip_id"].astype(str))
    iou = _pooled_iou(per_chip_stats)
    iou_corrected = _pooled_iou(kept)
    result: dict[str, Any] = {
        "iou": iou,
        "iou_corrected": iou_corrected,
        "delta": iou_corrected - iou,
        "n_chips": len(per_chip_stats),
        "n_dropped": int(is_dropped.sum()),
        "n_kept": len(kept),
        "unmatched": sorted(dropped_ids - matched),
    }
    if group_column:
        per_group = {}
        for group, stats in per_chip_stats.groupby(group_column, sort=True):
            group_dropped = is_dropped.loc[stats.index]
            per_group[str(group)] = {
                "iou": _pooled_iou(stats),
                "iou_corrected": _pooled_iou(stats[~group_dropped]),
                "n_chips": len(stats),
                "n_dropped": int(group_dropped.sum()),
            }
        result["per_group"] = per_group
    return result

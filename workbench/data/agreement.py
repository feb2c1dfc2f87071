"""Agreement between a chip's label and the water index of its imagery, and the CryoSentinel-style pre-filter.

The label of a water chip can be checked against physics without any model: the MNDWI water index of the
raw Sentinel-2 reflectance (`workbench.indices.mndwi`) marks open water. `chip_agreement` gives, for one
chip, the label, water-index and (optionally) model fractions on scored pixels (valid and labelled), the
IoUs between them and the pre-filter decision of `prefilter_decision`: keep the chip only when its label
is plausible given the water index. `prefilter_table` counts the kept and dropped chips per reason.

The data audit reports these numbers for a whole store before any model is trained; the label-noise
review builds its suspicion score on the same masks (`prepare_masks`, `agreement_from_masks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from workbench.arrays import IGNORE_INDEX
from workbench.functional import confusion_counts, iou_score
from workbench.params import ReviewParams

REASON_AGREES = "kept: label agrees with water index"
REASON_LOW_IOU = "dropped: label/water IoU too low"
REASON_WATER_EXCESS = "dropped: water index much larger than label"
REASON_LOW_IOU_AND_EXCESS = "dropped: low IoU and water index much larger than label"
REASON_EMPTY_DRY = "kept: empty label, little water"
REASON_EMPTY_WET = "dropped: empty label but water index finds water"
REASON_NO_INDEX = "kept: no index compared (review.index none)"

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


class ReviewInputError(ValueError):
    """A chip handed to the agreement or the label-noise review does not have the expected arrays, shapes or values."""


@dataclass(frozen=True)
class ChipMasks:
    """Boolean views of one chip restricted to scored pixels (valid and labelled)."""

    scored: np.ndarray
    label: np.ndarray
    water: np.ndarray
    prob: np.ndarray | None
    pred: np.ndarray | None
    has_index: bool = True


def _where(chip_id: str) -> str:
    return f"chip {chip_id!r}" if chip_id else "chip"


def prepare_masks(
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
    index_values: np.ndarray | None = None,
    use_index: bool = True,
) -> ChipMasks:
    """Check shapes and values, compute the index water mask and the thresholded prediction on scored pixels.

    The index is MNDWI of `green` and `swir` unless `index_values` (an (H, W) plane) is given; with
    `use_index=False` there is no index and `ChipMasks.has_index` is False.
    """
    from workbench.indices import mndwi, resolve_band

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
    if not use_index:
        index = np.zeros(shape)
    elif index_values is not None:
        index = np.asarray(index_values, dtype=np.float64)
        if index.shape != shape:
            raise ReviewInputError(f"{where}: index has shape {index.shape}, expected {shape} like the image")
    else:
        names = list(band_names)
        green, swir = resolve_band(names, green), resolve_band(names, swir)
        index = np.asarray(mndwi(image, names, green=green, swir=swir), dtype=np.float64)
    water = scored & (index > water_threshold) if use_index else np.zeros(shape, dtype=bool)
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
    return ChipMasks(scored=scored, label=positive, water=water, prob=probability, pred=pred, has_index=use_index)


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


def agreement_from_masks(masks: ChipMasks, cfg: ReviewParams) -> dict[str, Any]:
    """The `chip_agreement` columns of one chip from its prepared masks."""
    n_pixels = int(np.count_nonzero(masks.scored))
    n_label = int(np.count_nonzero(masks.label))
    n_water = int(np.count_nonzero(masks.water))
    denominator = max(n_pixels, 1)
    iou_label_water = mask_iou(masks.label, masks.water)
    water_fraction = n_water / denominator
    keep, reason = prefilter_decision(n_label, n_water, iou_label_water, water_fraction, cfg)
    if not masks.has_index:
        keep, reason = True, REASON_NO_INDEX
        iou_label_water = water_fraction = math.nan
    result: dict[str, Any] = {
        "n_pixels": n_pixels,
        "label_fraction": n_label / denominator,
        "water_fraction": water_fraction,
        "iou_label_water": iou_label_water,
        "water_label_ratio": n_water / max(n_label, 1) if masks.has_index else math.nan,
        "model_fraction": math.nan,
        "iou_label_model": math.nan,
        "iou_model_water": math.nan,
        "prefilter_keep": keep,
        "prefilter_reason": reason,
    }
    if masks.pred is not None:
        result["model_fraction"] = int(np.count_nonzero(masks.pred)) / denominator
        result["iou_label_model"] = mask_iou(masks.label, masks.pred)
        result["iou_model_water"] = mask_iou(masks.pred, masks.water) if masks.has_index else math.nan
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
    masks = prepare_masks(image, band_names, label, valid, prob, cfg.water_index_threshold, threshold, green, swir)
    return agreement_from_masks(masks, cfg)


# --------------------------------------------------------------------------- tables


def require_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise `ReviewInputError` naming the columns `what` needs that `table` lacks."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ReviewInputError(f"{what} needs columns {missing}; the table has {list(table.columns)}")


def prefilter_table(table: pd.DataFrame, near_zero_iou: float = 0.05) -> pd.DataFrame:
    """Chips kept and dropped by the water-index pre-filter, one row per reason.

    Columns: decision (kept/dropped), reason, n_chips, share (of all chips), median_iou_label_water and
    n_iou_below (chips with IoU(label, water) < `near_zero_iou`, the signature of misregistered labels).
    """
    require_columns(table, ["prefilter_keep", "prefilter_reason", "iou_label_water"], "prefilter_table")
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


def index_plane(
    image: np.ndarray, band_names: Sequence[str], index: str, green: str = "B03", swir: str = "B11", nir: str = "B08"
) -> np.ndarray | None:
    """The (H, W) index a use case compares with its labels: 'mndwi', 'ndwi', a band expression, or None for 'none'.

    Band names resolve to their first time step (``B03`` -> ``B03_t0``) in multi-temporal stacks.
    """
    from workbench.indices import band_expression, mndwi, ndwi, resolve_band

    names = [str(name) for name in band_names]
    if index == "none":
        return None
    if index == "mndwi":
        return np.asarray(mndwi(image, names, resolve_band(names, green), resolve_band(names, swir)), np.float64)
    if index == "ndwi":
        return np.asarray(ndwi(image, names, resolve_band(names, green), resolve_band(names, nir)), np.float64)
    return band_expression(image, names, index)


def index_label(index: str, green: str = "B03", swir: str = "B11", nir: str = "B08") -> str:
    """Short name of an index for titles and tables."""
    return {"mndwi": f"MNDWI ({green}, {swir})", "ndwi": f"NDWI ({green}, {nir})", "none": "no index"}.get(index, index)

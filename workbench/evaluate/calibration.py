"""Probability calibration and operating-threshold choice for binary segmentation.

Temperature scaling fits one scalar T > 0 so that ``sigmoid(logit / T)`` minimises the negative
log-likelihood on a calibration split that is spatially disjoint from train and test. Thresholds
are chosen after calibrating, from a `ThresholdHistogram` of calibrated probabilities.

Calibration quality is reported as ECE (L1, equal-width or equal-mass bins), MCE, Brier score and
reliability tables (drawn by `workbench.figures.calibration`). All of them score the positive-class
probability against the observed positive frequency (the reliability of P(y = 1)), which is what a
threshold acts on; only pixels where ``valid`` is True and ``label != 255`` count.

The result is a `Calibration` saved as ``calibration.json`` beside the model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar

from workbench.arrays import IGNORE_INDEX, sigmoid, softmax
from workbench.evaluate.metrics import ThresholdHistogram
from workbench.functional import as_numpy
from workbench.io import read_json, write_json_atomic
from workbench.run import CALIBRATION_FILE

ThresholdRule = Literal["best_iou", "best_f1", "target_precision", "fixed"]
BinStrategy = Literal["uniform", "quantile"]
_LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


class CalibrationError(ValueError):
    """Calibration inputs or a calibration file are not what is expected."""


# --------------------------------------------------------------------------- inputs


def _usable_pairs(
    values: Any, label: Any, valid: Any = None, weights: Any = None, name: str = "prob"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten to (values, targets, weights) over valid pixels with label != 255.

    Integer labels give targets 1 where the label is neither 0 nor 255; float labels are soft
    targets in [0, 1].
    """
    values_arr = as_numpy(values, name).astype(np.float64).reshape(-1)
    label_arr = as_numpy(label, "label").reshape(-1)
    if label_arr.size != values_arr.size:
        raise CalibrationError(f"{name} has {values_arr.size} values but label has {label_arr.size}")
    keep = np.ones(values_arr.size, dtype=bool)
    if valid is not None:
        valid_arr = as_numpy(valid, "valid").astype(bool).reshape(-1)
        if valid_arr.size != values_arr.size:
            raise CalibrationError(f"valid has {valid_arr.size} values but {name} has {values_arr.size}")
        keep &= valid_arr
    if label_arr.dtype.kind == "f":
        targets = label_arr.astype(np.float64)
        keep &= np.isfinite(targets)
        if np.any((targets[keep] < 0) | (targets[keep] > 1)):
            raise CalibrationError("soft labels must lie in [0, 1]")
    else:
        keep &= label_arr != IGNORE_INDEX
        targets = ((label_arr != 0) & (label_arr != IGNORE_INDEX)).astype(np.float64)
    w = np.ones(values_arr.size) if weights is None else as_numpy(weights, "weights").astype(np.float64).reshape(-1)
    if w.size != values_arr.size:
        raise CalibrationError(f"weights has {w.size} values but {name} has {values_arr.size}")
    keep &= w > 0
    if not np.isfinite(values_arr[keep]).all():
        raise CalibrationError(f"{name} holds non-finite values on valid pixels")
    if not keep.any():
        raise CalibrationError("no valid, labelled pixels to calibrate on")
    return values_arr[keep], targets[keep], w[keep]


def _check_prob(prob: np.ndarray) -> None:
    if prob.size and (prob.min() < 0 or prob.max() > 1):
        raise CalibrationError(f"probabilities must lie in [0, 1]; found {prob.min()}..{prob.max()}")


# --------------------------------------------------------------------------- temperature


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities sigmoid(logit / T)."""
    if not temperature > 0:
        raise CalibrationError(f"temperature must be > 0, got {temperature}")
    return sigmoid(as_numpy(logits, "logits").astype(np.float64) / temperature)


def _nll(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray, temperature: float) -> float:
    """Mean weighted binary cross-entropy of sigmoid(logit / T): softplus(z) - y z."""
    z = logits / temperature
    return float(np.sum(weights * (np.logaddexp(0.0, z) - targets * z)) / np.sum(weights))


def fit_temperature(logits: Any, labels: Any, weights: Any = None, valid: Any = None) -> float:
    """Temperature T > 0 minimising the NLL of sigmoid(logit / T) over valid, labelled pixels.

    Optimises log T with a bounded scalar minimiser in float64 (T within 0.01..100).
    `labels` are class ids (255 ignored) or soft targets in [0, 1]; `weights` are per-pixel.
    """
    z, y, w = _usable_pairs(logits, labels, valid, weights, name="logits")
    result = minimize_scalar(
        lambda log_t: _nll(z, y, w, math.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-7},
    )
    log_t = float(result.x)
    if min(abs(log_t - b) for b in _LOG_T_BOUNDS) < 1e-3:
        warnings.warn(f"fitted temperature {math.exp(log_t):.3g} is at the search bound", stacklevel=2)
    return math.exp(log_t)


# --------------------------------------------------------------------------- calibration error


def _bin_assignment(prob: np.ndarray, bins: int, strategy: BinStrategy) -> np.ndarray:
    if bins < 1:
        raise CalibrationError(f"bins must be >= 1, got {bins}")
    if strategy == "uniform":
        return np.minimum((prob * bins).astype(np.int64), bins - 1)
    if strategy == "quantile":
        # equal mass: split the probability ranks into `bins` runs of (nearly) equal length
        order = np.argsort(prob, kind="stable")
        assignment = np.empty(prob.size, dtype=np.int64)
        assignment[order] = (np.arange(prob.size) * bins) // max(prob.size, 1)
        return assignment
    raise CalibrationError(f"unknown bin strategy {strategy!r}; expected 'uniform' or 'quantile'")


def reliability_table(
    prob: Any, label: Any, bins: int = 15, strategy: BinStrategy = "uniform", valid: Any = None
) -> pd.DataFrame:
    """Per-bin mean predicted probability ("confidence") and observed positive frequency.

    Columns: lower, upper (bin edges; for equal-mass bins the smallest and largest probability in
    the bin), confidence, frequency, count. Empty bins have count 0 and NaN means.
    """
    p, y, w = _usable_pairs(prob, label, valid)
    _check_prob(p)
    assignment = _bin_assignment(p, bins, strategy)
    count = np.bincount(assignment, weights=w, minlength=bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        confidence = np.bincount(assignment, weights=w * p, minlength=bins) / count
        frequency = np.bincount(assignment, weights=w * y, minlength=bins) / count
    if strategy == "uniform":
        lower, upper = np.arange(bins) / bins, np.arange(1, bins + 1) / bins
    else:
        lower = np.full(bins, np.nan)
        upper = np.full(bins, np.nan)
        np.fmin.at(lower, assignment, p)
        np.fmax.at(upper, assignment, p)
    return pd.DataFrame(
        {"lower": lower, "upper": upper, "confidence": confidence, "frequency": frequency, "count": count}
    )


def _gaps(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    filled = table[table["count"] > 0]
    return np.abs(filled["confidence"].to_numpy() - filled["frequency"].to_numpy()), filled["count"].to_numpy()


def ece(prob: Any, label: Any, bins: int = 15, strategy: BinStrategy = "uniform", valid: Any = None) -> float:
    """Expected calibration error: sum over bins of (bin share) x |confidence - frequency| (L1)."""
    gaps, counts = _gaps(reliability_table(prob, label, bins, strategy, valid))
    return float(np.sum(gaps * counts) / np.sum(counts))


def mce(prob: Any, label: Any, bins: int = 15, strategy: BinStrategy = "uniform", valid: Any = None) -> float:
    """Maximum calibration error: the largest |confidence - frequency| over non-empty bins."""
    gaps, _ = _gaps(reliability_table(prob, label, bins, strategy, valid))
    return float(gaps.max())


def brier(prob: Any, label: Any, valid: Any = None) -> float:
    """Brier score: mean squared difference between probability and the 0/1 (or soft) target."""
    p, y, w = _usable_pairs(prob, label, valid)
    _check_prob(p)
    return float(np.sum(w * (p - y) ** 2) / np.sum(w))


# --------------------------------------------------------------------------- thresholds


def choose_threshold(
    hist: ThresholdHistogram,
    rule: ThresholdRule = "best_iou",
    target_precision: float = 0.8,
    thresholds: ArrayLike | None = None,
    fixed_threshold: float = 0.5,
    class_index: int = 0,
) -> dict[str, Any]:
    """Pick an operating threshold from a histogram of (calibrated) probabilities.

    Rules: ``best_iou`` / ``best_f1`` take the threshold of highest IoU / F1 (the lowest such on
    ties); ``target_precision`` takes the LOWEST threshold whose precision reaches
    `target_precision` (most recall at that precision) - when none does, the threshold of highest
    precision is returned with ``reached=False``; ``fixed`` reports `fixed_threshold`.
    Returns dict(threshold, precision, recall, iou, f1, rule, reached).
    """
    grid = np.linspace(0.01, 0.99, 99) if thresholds is None else np.atleast_1d(np.asarray(thresholds, float))
    if rule == "fixed":
        grid = np.array([fixed_threshold], dtype=np.float64)
    table = hist.sweep(grid, class_index)
    reached = True
    if rule == "fixed":
        pick = 0
    elif rule in ("best_iou", "best_f1"):
        values = table["iou" if rule == "best_iou" else "f1"].to_numpy()
        reached = bool(np.isfinite(values).any())
        pick = int(np.nanargmax(values)) if reached else 0
    elif rule == "target_precision":
        precision = table["precision"].to_numpy()
        hits = np.flatnonzero(precision >= target_precision)
        reached = hits.size > 0
        best_available = int(np.nanargmax(precision)) if np.isfinite(precision).any() else 0
        pick = int(hits[0]) if reached else best_available
    else:
        raise CalibrationError(f"unknown threshold rule {rule!r}; expected best_iou, best_f1, target_precision, fixed")
    chosen = table.iloc[pick]
    return {
        "threshold": float(chosen["threshold"]),
        "precision": float(chosen["precision"]),
        "recall": float(chosen["recall"]),
        "iou": float(chosen["iou"]),
        "f1": float(chosen["f1"]),
        "rule": rule,
        "reached": bool(reached),
    }


def choose_thresholds_by_group(hists: Mapping[str, ThresholdHistogram], **kwargs: Any) -> dict[str, dict[str, Any]]:
    """`choose_threshold` for each group (e.g. region); keyword arguments are passed through."""
    return {str(group): choose_threshold(hist, **kwargs) for group, hist in hists.items()}


# --------------------------------------------------------------------------- the calibration record


@dataclass
class Calibration:
    """What calibration decided: the temperature, operating threshold(s) and before/after scores."""

    temperature: float
    threshold: float
    rule: str = "best_iou"
    target_precision: float | None = None
    per_region: dict[str, float] = field(default_factory=dict)
    ece_before: float = float("nan")
    ece_after: float = float("nan")
    brier_before: float = float("nan")
    brier_after: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise CalibrationError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.threshold <= 1:
            raise CalibrationError(f"threshold must lie in [0, 1], got {self.threshold}")

    def threshold_for(self, region: str | None = None) -> float:
        """The region's own threshold when one was chosen, else the global one."""
        return self.per_region.get(region, self.threshold) if region is not None else self.threshold

    def probabilities(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities for raw logits."""
        return apply_temperature(logits, self.temperature)

    def save(self, path: Path | str) -> Path:
        """Write atomically as JSON; a directory gets ``calibration.json`` inside it."""
        target = Path(path)
        if target.is_dir() or target.suffix == "":
            target = target / CALIBRATION_FILE
        return write_json_atomic(target, asdict(self))

    @classmethod
    def load(cls, path: Path | str) -> Calibration:
        """Read a calibration file (or ``calibration.json`` inside a directory)."""
        target = Path(path)
        if target.is_dir():
            target = target / CALIBRATION_FILE
        data = read_json(target)
        if not isinstance(data, dict):
            raise CalibrationError(f"{target} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted({"temperature", "threshold"} - set(data))
        if unknown or missing:
            raise CalibrationError(
                f"{target}: unknown keys {unknown}, missing keys {missing}; expected keys from {sorted(known)}"
            )
        data = {k: (float("nan") if v is None and k.startswith(("ece", "brier")) else v) for k, v in data.items()}
        try:
            return cls(**data)
        except (TypeError, CalibrationError) as exc:
            raise CalibrationError(f"{target}: {exc}") from exc


# --------------------------------------------------------------------------- softmax models


def _temperatures(calibration: Mapping[str, Any] | None, n_classes: int) -> np.ndarray:
    """The temperature(s) of a calibration as a (C,) vector (a single T repeated; 1 without calibration)."""
    value = 1.0 if calibration is None else calibration.get("temperature", 1.0)
    temps = np.asarray(value, dtype=np.float64).reshape(-1)
    if temps.size == 1:
        temps = np.repeat(temps, n_classes)
    if temps.size != n_classes or (temps <= 0).any():
        raise CalibrationError(f"temperature {value!r} does not fit {n_classes} classes (one T > 0, or one per class)")
    return temps


def class_probabilities(logits: Any, calibration: Mapping[str, Any] | None = None) -> np.ndarray:
    """Calibrated softmax probabilities of (C, H, W) or (N, C, H, W) logits: softmax(logit_c / T_c).

    `calibration` is a softmax model's `calibration.json` content (`temperature` a number or a per-class
    list); None = temperature 1. The one place probabilities of a softmax model are made.
    """
    arr = as_numpy(logits, "logits").astype(np.float64)
    if arr.ndim not in (3, 4):
        raise CalibrationError(f"logits must be (C, H, W) or (N, C, H, W), got shape {arr.shape}")
    axis = arr.ndim - 3
    temps = _temperatures(calibration, arr.shape[axis])
    shape = [1] * arr.ndim
    shape[axis] = -1
    return softmax(arr / temps.reshape(shape), axis=axis)


def predict_classes(logits: Any, calibration: Mapping[str, Any] | None = None, class_names: Any = None) -> np.ndarray:
    """The decided class map (H, W) or (N, H, W), uint8: argmax of the calibrated probabilities.

    With `class_thresholds` {class name: t} in the calibration (a class of interest; `class_names` needed
    to find its index) a pixel whose probability of that class reaches t takes it, before the argmax
    of the rest decides the other pixels.
    """
    prob = class_probabilities(logits, calibration)
    axis = prob.ndim - 3
    decided = np.argmax(prob, axis=axis).astype(np.uint8)
    thresholds = dict((calibration or {}).get("class_thresholds") or {})
    if thresholds:
        names = list(class_names or [])
        for name, threshold in thresholds.items():
            if name not in names:
                raise CalibrationError(f"class_thresholds names {name!r}, not one of the classes {names}")
            c = names.index(name)
            decided[np.take(prob, c, axis=axis) >= float(threshold)] = c
    return decided


def _softmax_nll(logits: np.ndarray, labels: np.ndarray, temps: np.ndarray) -> float:
    scaled = logits / temps[None, :]
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(scaled).sum(axis=1))
    return float((log_z - scaled[np.arange(len(labels)), labels]).mean())


def fit_class_temperature(logits: Any, labels: Any, valid: Any = None, per_class: bool = False) -> float | list[float]:
    """Temperature scaling of a softmax model: the T (or per-class vector T_c) minimising the NLL of
    softmax(logit / T) on labelled valid pixels.

    `logits` (N, C, H, W) or pixels (P, C); `labels` class ids with 255 ignored. One T is found by a bounded
    scalar search on log T; the per-class vector by L-BFGS on log T_c starting from that T.
    """
    arr = as_numpy(logits, "logits").astype(np.float64)
    lab = as_numpy(labels, "label").astype(np.int64)
    if arr.ndim == 4:
        pixels = np.moveaxis(arr, 1, -1).reshape(-1, arr.shape[1])
        lab = lab.reshape(-1)
        keep = lab != IGNORE_INDEX
        if valid is not None:
            keep &= as_numpy(valid, "valid").astype(bool).reshape(-1)
    else:
        pixels, keep = arr, lab != IGNORE_INDEX
    pixels, lab = pixels[keep], lab[keep]
    if lab.size == 0:
        raise CalibrationError("no labelled valid pixel to fit a temperature on")
    n_classes = pixels.shape[1]
    if lab.max() >= n_classes:
        raise CalibrationError(f"label value {int(lab.max())} is not a class of a {n_classes}-class model")
    result = minimize_scalar(
        lambda log_t: _softmax_nll(pixels, lab, np.full(n_classes, math.exp(log_t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
    )
    single = float(math.exp(result.x))
    if not per_class:
        return single
    from scipy.optimize import minimize

    start = np.full(n_classes, math.log(single))
    fitted = minimize(
        lambda log_t: _softmax_nll(pixels, lab, np.exp(np.clip(log_t, *_LOG_T_BOUNDS))), start, method="L-BFGS-B"
    )
    return [float(t) for t in np.exp(np.clip(fitted.x, *_LOG_T_BOUNDS))]


def multiclass_ece(
    prob: Any, labels: Any, bins: int = 15, kind: Literal["top_label", "classwise"] = "top_label"
) -> float:
    """Expected calibration error of a softmax model over labelled pixels (equal-width bins, L1).

    top_label: confidence max_c p_c against whether the argmax is right; classwise: the mean over classes
    of the ECE of p_c against 1{y = c} (Kull et al. 2019). `prob` (N, C, H, W) or pixels (P, C).
    """
    arr = as_numpy(prob, "prob").astype(np.float64)
    lab = as_numpy(labels, "label").astype(np.int64).reshape(-1)
    pixels = np.moveaxis(arr, 1, -1).reshape(-1, arr.shape[1]) if arr.ndim == 4 else arr
    keep = lab != IGNORE_INDEX
    pixels, lab = pixels[keep], lab[keep]
    if kind == "top_label":
        confidence = pixels.max(axis=1)
        correct = (pixels.argmax(axis=1) == lab).astype(np.float64)
        return ece(confidence, correct, bins)
    return float(np.mean([ece(pixels[:, c], (lab == c).astype(np.float64), bins) for c in range(pixels.shape[1])]))

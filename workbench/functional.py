"""Confusion counts to metrics: the one place where IoU, F1, precision, recall and accuracy are computed.

The pattern of segmentation-models-pytorch's ``metrics/functional.py``: count first, then score.

* `confusion_counts` turns predictions and targets into ``tp, fp, fn, tn`` once, per image and
  per class: shape (B, 1) for binary masks (``num_classes=None``), (B, C) for class-id maps.
  Only pixels where ``valid`` is True and the target is not `ignore_index` (255) count.
* Every metric (`iou_score`, `f1_score`, `precision`, `recall`, `accuracy`) is a function of
  those counts with a `reduction` and an explicit zero-division policy:

  ============================ =====================================================================
  ``"none"``                   the metric of each count as given (any shape, e.g. (B, C) or scalars)
  ``"per-class"``              counts pooled over images, one value per class (C,)
  ``"per-class-imagewise"``    the metric per image and class, mean over images per class (C,)
  ``"micro"``                  counts pooled over images and classes, one value
  ``"macro"``                  per-class values, mean over classes
  ``"micro-imagewise"``        counts pooled over classes per image, mean over images
  ``"macro-imagewise"``        per image, mean over classes, then mean over images
  ============================ =====================================================================

  Reductions other than ``"none"`` read the counts as (B, C) (a 1-D array is one image).
* **0/0 is NaN by default.** A ratio whose denominator is zero (e.g. the IoU of a class that is
  neither present nor predicted) is undefined: it takes `zero_division` (NaN unless a caller asks
  for another value) and NaN values are left out of every mean (images, classes). A mean over
  nothing is NaN. With NaN this matches torchmetrics' macro Jaccard index, which drops classes
  with no support and no prediction.
* `smooth` adds a constant to numerator and denominator, ``(num + smooth) / (den + smooth)``;
  `zero_division` then applies only where ``den + smooth == 0``.

numpy only: torch tensors are accepted and converted (`as_numpy`), so engines on every floor can use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from workbench.arrays import IGNORE_INDEX

METRICS = ("iou", "f1", "precision", "recall", "accuracy")
Metric = Literal["iou", "f1", "precision", "recall", "accuracy"]
Reduction = Literal["none", "per-class", "per-class-imagewise", "micro", "macro", "micro-imagewise", "macro-imagewise"]
REDUCTIONS = ("none", "per-class", "per-class-imagewise", "micro", "macro", "micro-imagewise", "macro-imagewise")


class MetricInputError(ValueError):
    """Arrays handed to a metric do not have the shape, dtype or value range it expects."""


# --------------------------------------------------------------------------- input handling


def as_numpy(x: Any, name: str = "array") -> np.ndarray:
    """Return `x` as a numpy array; torch tensors are detached and moved to the CPU."""
    if x is None:
        raise MetricInputError(f"{name} is None")
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_batch(x: Any, name: str) -> np.ndarray:
    """(H, W) -> (1, H, W); (B, 1, H, W) -> (B, H, W); (B, H, W) unchanged."""
    arr = as_numpy(x, name)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    if arr.ndim != 3:
        raise MetricInputError(f"{name} must have shape (H, W), (B, H, W) or (B, 1, H, W); got {arr.shape}")
    return arr


def valid_or_all(valid: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`valid` as a (B, H, W) bool array of `shape`; None means every pixel is valid."""
    if valid is None:
        return np.ones(shape, dtype=bool)
    arr = as_batch(valid, "valid").astype(bool, copy=False)
    if arr.shape != shape:
        raise MetricInputError(f"valid has shape {arr.shape}, expected {shape} like label")
    return arr


def label_batch(label: Any, num_classes: int | None = None, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Labels as a (B, H, W) integer array (bool becomes 0/1), checked to hold class ids or `ignore_index`."""
    arr = as_batch(label, "label")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    _check_label_range(arr, num_classes, ignore_index)
    return arr


def _check_label_range(label: np.ndarray, num_classes: int | None, ignore_index: int) -> None:
    if not np.issubdtype(label.dtype, np.integer):
        raise MetricInputError(f"label must hold integer class ids ({ignore_index} = ignore); got dtype {label.dtype}")
    if label.size == 0:
        return
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi > max(ignore_index, IGNORE_INDEX):
        raise MetricInputError(f"label values must lie in 0..{max(ignore_index, IGNORE_INDEX)}; found {lo}..{hi}")
    if num_classes is not None:
        bad = (label >= num_classes) & (label != ignore_index)
        if bad.any():
            raise MetricInputError(
                f"label holds class {int(label[bad].max())} but num_classes={num_classes} "
                f"({ignore_index} marks ignored pixels)"
            )


def safe_divide(num: ArrayLike, den: ArrayLike, zero_division: float = float("nan"), smooth: float = 0.0) -> np.ndarray:
    """``(num + smooth) / (den + smooth)`` in float64, `zero_division` where ``den + smooth == 0``."""
    num_arr = np.asarray(num, dtype=np.float64)
    den_arr = np.asarray(den, dtype=np.float64)
    if smooth:
        num_arr, den_arr = num_arr + smooth, den_arr + smooth
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num_arr / den_arr
    return np.where(den_arr == 0, zero_division, out)


def nanmean(values: ArrayLike, axis: int | None = None) -> np.ndarray:
    """Mean that skips NaN (undefined values); NaN, without a warning, when nothing is left."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean(np.asarray(values, dtype=np.float64), axis=axis))


# --------------------------------------------------------------------------- confusion counts


def confusion_counts(
    pred: Any,
    target: Any,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    valid: Any = None,
    per_image: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``tp, fp, fn, tn`` per image and class over valid pixels whose target is not `ignore_index`.

    `pred`, `target` and `valid` (bool, None = all valid) have shape (H, W), (B, H, W) or (B, 1, H, W).

    * ``num_classes=None`` (binary): `pred` is a mask (bool, or 0/1); a target pixel is positive
      when it is neither 0 nor `ignore_index`. Counts have shape (B, 1).
    * ``num_classes=C >= 2``: `pred` and `target` hold class ids 0..C-1, each class is scored one
      against the rest. Counts have shape (B, C).

    With ``per_image=False`` the counts are summed over the images: shape (1,) or (C,). All int64.
    """
    pred_arr = as_batch(pred, "pred")
    target_arr = label_batch(target, num_classes, ignore_index)
    if pred_arr.shape != target_arr.shape:
        raise MetricInputError(f"pred has shape {pred_arr.shape} but label has shape {target_arr.shape}")
    valid_arr = valid_or_all(valid, target_arr.shape)
    if not np.issubdtype(pred_arr.dtype, np.integer) and pred_arr.dtype != bool:
        raise MetricInputError(f"pred must hold integer class ids; got dtype {pred_arr.dtype} (threshold first)")
    usable = valid_arr & (target_arr != ignore_index)
    if num_classes is None:
        tp, fp, fn, tn = _binary_counts(pred_arr, target_arr, usable)
    else:
        tp, fp, fn, tn = _multiclass_counts(pred_arr, target_arr, usable, num_classes)
    if not per_image:
        return tp.sum(axis=0), fp.sum(axis=0), fn.sum(axis=0), tn.sum(axis=0)
    return tp, fp, fn, tn


def _binary_counts(
    pred: np.ndarray, target: np.ndarray, usable: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if pred.dtype != bool:
        used = pred[usable]
        if used.size and (used.min() < 0 or used.max() > 1):
            raise MetricInputError(f"a binary pred must be a mask (bool or 0/1); found {used.min()}..{used.max()}")
        pred = pred.astype(bool)
    pred = pred & usable
    truth = (target != 0) & usable
    axes = (1, 2)
    tp = np.count_nonzero(pred & truth, axis=axes).astype(np.int64)
    fp = np.count_nonzero(pred & ~truth, axis=axes).astype(np.int64)
    fn = np.count_nonzero(~pred & truth, axis=axes).astype(np.int64)
    tn = np.count_nonzero(usable, axis=axes).astype(np.int64) - tp - fp - fn
    return tp[:, None], fp[:, None], fn[:, None], tn[:, None]


def confusion_matrix(
    pred: Any,
    target: Any,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    valid: Any = None,
    per_image: bool = False,
) -> np.ndarray:
    """Confusion matrix counts [label class, predicted class] over valid pixels whose target is not ignored.

    Shape (C, C), or (B, C, C) with `per_image`; int64. Rows are the labels (as scikit-learn's
    `confusion_matrix`), so row sums are each class's labelled pixels and column sums its predicted ones.
    `confusion_counts` derives tp / fp / fn / tn from the same matrix.
    """
    pred_arr = as_batch(pred, "pred")
    target_arr = label_batch(target, num_classes, ignore_index)
    if pred_arr.shape != target_arr.shape:
        raise MetricInputError(f"pred has shape {pred_arr.shape} but label has shape {target_arr.shape}")
    if not np.issubdtype(pred_arr.dtype, np.integer) and pred_arr.dtype != bool:
        raise MetricInputError(f"pred must hold integer class ids; got dtype {pred_arr.dtype} (argmax first)")
    usable = valid_or_all(valid, target_arr.shape) & (target_arr != ignore_index)
    confmat = _confusion(pred_arr, target_arr, usable, num_classes)
    return confmat if per_image else confmat.sum(axis=0)


def _confusion(pred: np.ndarray, target: np.ndarray, usable: np.ndarray, num_classes: int) -> np.ndarray:
    if num_classes < 2:
        raise MetricInputError(f"num_classes must be >= 2 (binary = 2, or None for a mask), got {num_classes}")
    pred_used = pred[usable].astype(np.int64)
    if pred_used.size and (pred_used.min() < 0 or pred_used.max() >= num_classes):
        found = f"{pred_used.min()}..{pred_used.max()}"
        raise MetricInputError(f"pred values must lie in 0..{num_classes - 1}; found {found}")
    batch = target.shape[0]
    image_index = np.broadcast_to(np.arange(batch)[:, None, None], target.shape)[usable]
    cells = (image_index * num_classes + target[usable].astype(np.int64)) * num_classes + pred_used
    return np.bincount(cells, minlength=batch * num_classes * num_classes).reshape(batch, num_classes, num_classes)


def counts_from_confusion(confmat: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """tp, fp, fn, tn per class from a (C, C) or (B, C, C) confusion matrix [label, prediction]."""
    cm = np.asarray(confmat, dtype=np.int64)
    tp = np.einsum("...ii->...i", cm).copy()
    fp = cm.sum(axis=-2) - tp  # predicted as the class, labelled otherwise
    fn = cm.sum(axis=-1) - tp  # labelled as the class, predicted otherwise
    tn = cm.sum(axis=(-2, -1))[..., None] - tp - fp - fn
    return tp, fp, fn, tn


def multiclass_summary(confmat: ArrayLike, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of a softmax model from one pooled (C, C) confusion matrix [label, prediction].

    Keys: ``miou`` (mean IoU over classes where it is defined), ``miou_no_background`` (classes 1..C-1),
    ``overall_accuracy``, and per class ``iou.<name>``, ``f1.<name>``, ``precision.<name>``,
    ``recall.<name>``. A class absent from both label and prediction has every metric NaN (0/0, not 0
    or 1) and is listed in ``absent_classes``; the means leave it out.
    """
    cm = np.asarray(confmat, dtype=np.int64)
    names = list(class_names)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(names):
        raise MetricInputError(f"confusion matrix of shape {cm.shape} does not match {len(names)} class names")
    tp, fp, fn, tn = counts_from_confusion(cm)
    out: dict[str, Any] = {}
    per_class = {m: score(m, tp, fp, fn, tn) for m in ("iou", "f1", "precision", "recall")}  # type: ignore[arg-type]
    absent = [name for name, t, p in zip(names, cm.sum(axis=1), cm.sum(axis=0), strict=True) if t == 0 and p == 0]
    for i, name in enumerate(names):
        for metric, values in per_class.items():
            out[f"{metric}.{name}"] = float("nan") if name in absent else float(values[i])
    iou = np.array([out[f"iou.{name}"] for name in names])
    out["miou"] = float(nanmean(iou))
    out["miou_no_background"] = float(nanmean(iou[1:]))
    out["overall_accuracy"] = float(safe_divide(np.trace(cm), cm.sum()))
    out["absent_classes"] = absent
    return out


def _multiclass_counts(
    pred: np.ndarray, target: np.ndarray, usable: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return counts_from_confusion(_confusion(pred, target, usable, num_classes))


# --------------------------------------------------------------------------- metrics from counts


def _ratio(metric: str, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> tuple[Any, Any]:
    """(numerator, denominator) of `metric`, in float64."""
    if metric == "iou":
        return tp, tp + fp + fn
    if metric == "f1":
        return 2 * tp, 2 * tp + fp + fn
    if metric == "precision":
        return tp, tp + fp
    if metric == "recall":
        return tp, tp + fn
    if metric == "accuracy":
        return tp + tn, tp + fp + fn + tn
    raise MetricInputError(f"unknown metric {metric!r}; expected one of {METRICS}")


def score(
    metric: Metric,
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike,
    reduction: Reduction = "none",
    zero_division: float = float("nan"),
    smooth: float = 0.0,
) -> np.ndarray:
    """`metric` (one of `METRICS`) of the counts under `reduction` (see the module docstring)."""
    if metric not in METRICS:
        raise MetricInputError(f"unknown metric {metric!r}; expected one of {METRICS}")
    counts = [np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn)]

    def value(tp_a: np.ndarray, fp_a: np.ndarray, fn_a: np.ndarray, tn_a: np.ndarray) -> np.ndarray:
        num, den = _ratio(metric, tp_a, fp_a, fn_a, tn_a)
        return safe_divide(num, den, zero_division, smooth)

    if reduction == "none":
        return value(*counts)
    if reduction not in REDUCTIONS:
        raise MetricInputError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    per_image = [np.atleast_2d(v) for v in counts]
    if reduction == "per-class":
        return value(*(v.sum(axis=0) for v in per_image))
    if reduction == "per-class-imagewise":
        return nanmean(value(*per_image), axis=0)
    if reduction == "micro":
        return value(*(v.sum() for v in per_image))
    if reduction == "macro":
        return nanmean(value(*(v.sum(axis=0) for v in per_image)))
    if reduction == "micro-imagewise":
        return nanmean(value(*(v.sum(axis=1) for v in per_image)))
    return nanmean(nanmean(value(*per_image), axis=1))  # macro-imagewise


def iou_score(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike,
    reduction: Reduction = "none",
    zero_division: float = float("nan"),
    smooth: float = 0.0,
) -> np.ndarray:
    """Intersection over union (Jaccard index), ``tp / (tp + fp + fn)``."""
    return score("iou", tp, fp, fn, tn, reduction, zero_division, smooth)


def f1_score(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike,
    reduction: Reduction = "none",
    zero_division: float = float("nan"),
    smooth: float = 0.0,
) -> np.ndarray:
    """F1 score (Dice coefficient), ``2 tp / (2 tp + fp + fn)``."""
    return score("f1", tp, fp, fn, tn, reduction, zero_division, smooth)


def precision(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike,
    reduction: Reduction = "none",
    zero_division: float = float("nan"),
    smooth: float = 0.0,
) -> np.ndarray:
    """Precision (positive predictive value), ``tp / (tp + fp)``."""
    return score("precision", tp, fp, fn, tn, reduction, zero_division, smooth)


def recall(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike,
    reduction: Reduction = "none",
    zero_division: float = float("nan"),
    smooth: float = 0.0,
) -> np.ndarray:
    """Recall (sensitivity, true positive rate), ``tp / (tp + fn)``."""
    return score("recall", tp, fp, fn, tn, reduction, zero_division, smooth)


def accuracy(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike,
    reduction: Reduction = "none",
    zero_division: float = float("nan"),
    smooth: float = 0.0,
) -> np.ndarray:
    """Accuracy of the one-vs-rest decision of a class, ``(tp + tn) / (tp + fp + fn + tn)``."""
    return score("accuracy", tp, fp, fn, tn, reduction, zero_division, smooth)


def pixel_accuracy(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike,
    reduction: Literal["micro", "micro-imagewise"] = "micro",
) -> float:
    """Fraction of counted pixels whose predicted class equals the label, from (B, C) counts of all classes.

    ``"micro"`` pools the images; ``"micro-imagewise"`` is the mean of the per-image accuracies.
    """
    tp_a = np.atleast_2d(np.asarray(tp))
    n_pixels = (tp_a + np.atleast_2d(fp) + np.atleast_2d(fn) + np.atleast_2d(tn))[:, 0]
    if reduction == "micro":
        return float(safe_divide(tp_a.sum(), n_pixels.sum()))
    if reduction == "micro-imagewise":
        return float(nanmean(safe_divide(tp_a.sum(axis=1), n_pixels)))
    raise MetricInputError(f"unknown reduction {reduction!r}; expected 'micro' or 'micro-imagewise'")


def metrics_from_counts(
    tp: float,
    fp: float,
    fn: float,
    tn: float,
    metrics: Sequence[str] = METRICS,
    zero_division: float = float("nan"),
) -> dict[str, float]:
    """IoU, F1, precision, recall and accuracy (or the chosen `metrics`) from pooled counts of one class."""
    return {m: float(score(m, tp, fp, fn, tn, zero_division=zero_division)) for m in metrics}  # type: ignore[arg-type]


def segmentation_summary(
    tp: ArrayLike,
    fp: ArrayLike,
    fn: ArrayLike,
    tn: ArrayLike,
    class_names: Sequence[str] | None = None,
    imagewise: bool = False,
) -> dict[str, float]:
    """Per-class IoU (``iou/<name>``), mIoU (mean over classes where IoU is defined) and pixel accuracy.

    `tp`, ... are (B, C) counts of all classes. Counts are pooled over the images, or with
    `imagewise` each value is computed per image and averaged over the images where it is defined.
    For two classes the positive class's IoU, F1, precision and recall are added under plain names.
    """
    reduction: Reduction = "per-class-imagewise" if imagewise else "per-class"
    iou = iou_score(tp, fp, fn, tn, reduction)
    names = list(class_names) if class_names is not None else [str(i) for i in range(iou.size)]
    if len(names) != iou.size:
        raise MetricInputError(f"class_names has {len(names)} names for {iou.size} classes")
    out = {f"iou/{name}": float(value) for name, value in zip(names, iou)}
    out["miou"] = float(nanmean(iou))
    out["pixel_accuracy"] = pixel_accuracy(tp, fp, fn, tn, "micro-imagewise" if imagewise else "micro")
    if iou.size == 2:
        for metric in ("iou", "f1", "precision", "recall"):
            out[metric] = float(score(metric, tp, fp, fn, tn, reduction)[1])  # type: ignore[arg-type]
    return out


POSITIVE_CLASS_METRICS = ("iou", "f1", "recall", "iou/foreground", "mean_chip_iou", "mean_chip_f1")


def mark_undefined_without_positives(metrics: dict[str, Any], tp: float, fn: float) -> dict[str, Any]:
    """Set the positive-class metrics to NaN (undefined) when the labels hold no positive pixel.

    With no positive pixel, IoU and F1 of the positive class are 0 for any false positive and 0/0
    otherwise, and recall is 0/0: a number there would only describe the absence of positives.
    `no_positive_pixels` records the case so reports can say why the value is missing.
    """
    out = dict(metrics)
    out["no_positive_pixels"] = bool(tp + fn == 0)
    if out["no_positive_pixels"]:
        for key in POSITIVE_CLASS_METRICS:
            if key in out:
                out[key] = float("nan")
    return out

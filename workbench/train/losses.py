"""Segmentation losses that count only the pixels a mask marks as valid.

Conventions shared by every loss here:

* ``logits`` is ``(B, 1, H, W)`` for binary segmentation (one logit per pixel). ``dice`` and
  ``generalized_dice`` also accept ``(B, K, H, W)`` with ``K > 1`` (softmax over classes; the target
  then holds class indices as floats).
* ``target`` is ``(B, H, W)`` float in ``[0, 1]``: hard labels as 0/1, soft labels allowed. For a softmax
  model (``K >= 2`` channels) it is ``(B, H, W)`` integer class indices 0..K-1 (a float target holding
  class indices is accepted too).
* ``mask`` is ``(B, H, W)`` bool, True where a pixel counts (valid data and label != 255). Masked-out
  pixels never enter a loss: not in sums, not in means, not in normalisation, and they get zero gradient.

`CompositeLoss` combines weighted terms described by `workbench.params.LossTerm`; with ``num_classes >= 2``
the terms are the softmax losses of the section "softmax losses" (cross-entropy, smp's Dice / Tversky /
Lovasz-softmax in multiclass mode, generalised Dice, softmax focal), optionally weighted per class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss, TverskyLoss
from torch import nn

from workbench.arrays import IGNORE_INDEX
from workbench.params import LossTerm

Weighting = Literal["none", "linear", "sqrt", "log"]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LossInputError(ValueError):
    """Logits, target or mask do not have the shapes or types a loss expects."""


# --------------------------------------------------------------------------- input checks and helpers


def check_inputs(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str = "loss") -> None:
    """Raise `LossInputError` unless logits is (B,C,H,W), target (B,H,W) float and mask (B,H,W) bool."""
    if logits.ndim != 4:
        raise LossInputError(f"{loss}: logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise LossInputError(f"{loss}: target must be (B, H, W) = {expected}, got shape {tuple(target.shape)}")
    if tuple(mask.shape) != expected:
        raise LossInputError(f"{loss}: mask must be (B, H, W) = {expected}, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise LossInputError(f"{loss}: mask must be a bool tensor (True = pixel counts), got {mask.dtype}")
    if logits.shape[1] > 1 and not target.is_floating_point() and target.dtype != torch.bool:
        return  # class indices of a softmax model
    if not target.is_floating_point():
        raise LossInputError(f"{loss}: target must be float in [0, 1], got {target.dtype}")


def _binary_pixels(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and targets of the counted pixels of a one-logit prediction, as flat vectors."""
    check_inputs(logits, target, mask, loss)
    if logits.shape[1] != 1:
        raise LossInputError(f"{loss}: expects binary logits (B, 1, H, W), got {logits.shape[1]} channels")
    return logits[:, 0][mask], target[mask].to(logits.dtype)


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A zero loss that is still connected to the graph (for batches without a counted pixel)."""
    return logits.sum() * 0.0


def class_ratio_weight(ratio: float, weighting: Weighting = "linear") -> float:
    """Turn a background/foreground ratio into a positive-class weight (linear, square root or logarithmic).

    linear: ratio; sqrt: sqrt(ratio); log: log(ratio); 'none' behaves like linear.
    """
    if ratio <= 0 or math.isnan(ratio):
        raise ValueError(f"class ratio must be positive, got {ratio}")
    if weighting == "sqrt":
        return math.sqrt(ratio)
    if weighting == "log":
        return math.log(ratio)
    if weighting in ("linear", "none"):
        return ratio
    raise ValueError(f"class_weighting must be one of none, linear, sqrt, log; got {weighting!r}")


def pos_weight_from_counts(n_pos: float, n_neg: float, cap: float, weighting: Weighting = "linear") -> float:
    """BCE positive weight from train-split pixel counts: clamp(f(n_neg / n_pos), 1, cap).

    `f` is the class weighting (linear / sqrt / log). The weight never drops below 1 (the positive class
    is the rare one it exists for) and never exceeds `cap`: an uncapped 42x weight made one model
    over-predict badly, so always pass a cap. No positive pixel at all gives `cap`.
    """
    if n_pos < 0 or n_neg < 0:
        raise ValueError(f"pixel counts must be >= 0, got n_pos={n_pos}, n_neg={n_neg}")
    if cap < 1:
        raise ValueError(f"pos_weight cap must be >= 1, got {cap}")
    if n_pos == 0 and n_neg == 0:
        raise ValueError("cannot compute pos_weight: the split has no labelled pixel (n_pos = n_neg = 0)")
    if n_pos == 0:
        return float(cap)
    if n_neg == 0:
        return 1.0
    return float(min(cap, max(1.0, class_ratio_weight(n_neg / n_pos, weighting))))


def batch_pos_weight(
    target: torch.Tensor, mask: torch.Tensor, cap: float, weighting: Weighting = "linear"
) -> torch.Tensor:
    """Per-batch positive weight clamp(f(neg / pos), 1, cap) over the counted pixels (no gradient)."""
    with torch.no_grad():
        counted = target[mask].float()
        n_pos = float(counted.sum())
        n_neg = float(counted.numel()) - n_pos
    if counted.numel() == 0:
        return torch.tensor(1.0, device=target.device)
    return torch.tensor(pos_weight_from_counts(n_pos, n_neg, cap, weighting), device=target.device)


# --------------------------------------------------------------------------- pixel-wise losses


def _pixel_bce(x: torch.Tensor, t: torch.Tensor, pos_weight: float | torch.Tensor | None) -> torch.Tensor:
    weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=x.dtype, device=x.device)
    return F.binary_cross_entropy_with_logits(x, t, pos_weight=weight, reduction="none")


def bce_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, pos_weight: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean binary cross-entropy over counted pixels; positives weighted by `pos_weight`.

    Per pixel: -[w t log s(x) + (1 - t) log(1 - s(x))], the same as torch's BCEWithLogitsLoss.
    """
    x, t = _binary_pixels(logits, target, mask, "bce")
    if x.numel() == 0:
        return _zero(logits)
    return _pixel_bce(x, t, pos_weight).mean()


def ohem_count(n_pixels: int, keep_ratio: float, min_kept: int) -> int:
    """How many hardest pixels OHEM keeps: k = min(N, max(min_kept, floor(keep_ratio * N)))."""
    return min(n_pixels, max(min_kept, math.floor(keep_ratio * n_pixels)))


def ohem_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    keep_ratio: float = 0.5,
    min_kept: int = 4096,
    pos_weight: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Online hard example mining: mean of the k largest per-pixel BCE values over the whole batch."""
    x, t = _binary_pixels(logits, target, mask, "ohem_bce")
    if x.numel() == 0:
        return _zero(logits)
    per_pixel = _pixel_bce(x, t, pos_weight)
    k = ohem_count(per_pixel.numel(), keep_ratio, min_kept)
    return torch.topk(per_pixel, k, sorted=False).values.mean()


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, alpha: float | None = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss FL = -alpha_t (1 - p_t)^gamma log(p_t), mean over counted pixels.

    `alpha` weights positives (alpha_t = alpha for t = 1, 1 - alpha for t = 0; None = no weighting).
    For soft targets p_t = p t + (1 - p)(1 - t) and -log(p_t) is replaced by the BCE of the soft target.
    """
    x, t = _binary_pixels(logits, target, mask, "focal")
    if x.numel() == 0:
        return _zero(logits)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = (1 - p_t).pow(gamma) * ce
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss.mean()


# --------------------------------------------------------------------------- overlap losses


def dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Flat, batch-global soft Dice: 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth).

    Sums run over every counted pixel of the whole batch (not per image), so chips without foreground
    do not produce undefined per-image terms. With K > 1 channels: softmax, one-hot targets, mean over classes.
    """
    probs, onehot = _class_probabilities(logits, target, mask, "dice", with_background=False)
    if probs.shape[1] == 0:
        return _zero(logits)
    intersection = (probs * onehot).sum(dim=1)
    total = probs.sum(dim=1) + onehot.sum(dim=1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def generalized_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Generalised Dice (Sudre et al. 2017) with class weights w_c = 1 / (sum t_c)^2.

    Binary logits are scored as two classes (foreground p, background 1 - p):
    GD = 1 - 2 sum_c w_c sum(p_c t_c) / sum_c w_c sum(p_c + t_c). An absent class gets weight 0
    instead of an infinite one.
    """
    probs, onehot = _class_probabilities(logits, target, mask, "generalized_dice", with_background=True)
    if probs.shape[1] == 0:
        return _zero(logits)
    volume = onehot.sum(dim=1)
    weights = torch.where(volume > 0, 1.0 / volume.clamp_min(eps) ** 2, torch.zeros_like(volume)).detach()
    numerator = 2 * (weights * (probs * onehot).sum(dim=1)).sum()
    denominator = (weights * (probs + onehot).sum(dim=1)).sum()
    return 1 - numerator / denominator.clamp_min(eps)


def _class_probabilities(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str, with_background: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and targets of the counted pixels as (C, N) matrices.

    Binary: foreground only, or [foreground, background] with `with_background`.
    K > 1 channels: softmax over channels and one-hot of the (float) class-index target.
    """
    check_inputs(logits, target, mask, loss)
    n_classes = logits.shape[1]
    x = logits.movedim(1, -1)[mask]  # (N, C)
    t = target[mask].to(logits.dtype)
    if n_classes == 1:
        p = torch.sigmoid(x[:, 0])
        if with_background:
            return torch.stack([p, 1 - p]), torch.stack([t, 1 - t])
        return p[None], t[None]
    labels = t.round().long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise LossInputError(f"{loss}: class indices in target must lie in [0, {n_classes - 1}]")
    probs = torch.softmax(x, dim=1).T
    onehot = F.one_hot(labels, n_classes).to(logits.dtype).T
    return probs, onehot


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.25,
    beta: float = 0.75,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Tversky loss TL = 1 - (TP + s) / (TP + alpha FP + beta FN + s), batch-global soft counts.

    Parameter mapping (also for the 'tversky' LossTerm): ``alpha`` weights FALSE POSITIVES and ``beta``
    weights FALSE NEGATIVES, as in smp's TverskyLoss and CryoSentinel's "Tversky(FP .25, FN .75)"
    default (alpha=0.25, beta=0.75, which favours recall). Seed 001 documents the opposite naming
    ("alpha on FN"); to penalise false positives more, set alpha > beta here.
    TP = sum(p t), FP = sum(p (1 - t)), FN = sum((1 - p) t) over counted pixels.
    """
    x, t = _binary_pixels(logits, target, mask, "tversky")
    if x.numel() == 0:
        return _zero(logits)
    p = torch.sigmoid(x)
    tp = (p * t).sum()
    fp = (p * (1 - t)).sum()
    fn = ((1 - p) * t).sum()
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


# --------------------------------------------------------------------------- Lovasz hinge


def _lovasz_gradient(sorted_labels: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss for labels sorted by decreasing error."""
    total = sorted_labels.sum()
    intersection = total - sorted_labels.cumsum(0)
    union = total + (1 - sorted_labels).cumsum(0)
    jaccard = 1.0 - intersection / union
    if sorted_labels.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def _lovasz_hinge_flat(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    signs = 2.0 * labels - 1.0
    errors = 1.0 - x * signs
    errors_sorted, order = torch.sort(errors, descending=True)
    return torch.dot(F.relu(errors_sorted), _lovasz_gradient(labels[order]))


def lovasz_hinge_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary Lovasz hinge (Berman et al. 2018), computed per image on its counted pixels, then averaged.

    Targets are binarised at 0.5. Images without a counted pixel are left out of the average.
    """
    check_inputs(logits, target, mask, "lovasz")
    if logits.shape[1] != 1:
        raise LossInputError(f"lovasz: expects binary logits (B, 1, H, W), got {logits.shape[1]} channels")
    per_image = [
        _lovasz_hinge_flat(logits[i, 0][mask[i]], (target[i][mask[i]] >= 0.5).to(logits.dtype))
        for i in range(logits.shape[0])
        if mask[i].any()
    ]
    if not per_image:
        return _zero(logits)
    return torch.stack(per_image).mean()


# --------------------------------------------------------------------------- boundary loss


def signed_distance_map(foreground: np.ndarray, counted: np.ndarray | None = None) -> np.ndarray:
    """Kervadec's signed distance of one image: negative inside the object, positive outside.

    Outside pixels get their Euclidean distance to the nearest foreground pixel; inside pixels get
    -(distance to the nearest background pixel - 1), so the object's own edge is 0. Only counted pixels
    define foreground and background (ignored pixels are neither). An image without counted foreground
    or without counted background gets zeros.
    """
    foreground = np.asarray(foreground, dtype=bool)
    counted = np.ones_like(foreground) if counted is None else np.asarray(counted, dtype=bool)
    fg = foreground & counted
    bg = ~foreground & counted
    if not fg.any() or not bg.any():
        return np.zeros(foreground.shape, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~fg)  # distance to the nearest foreground pixel
    inside = ndimage.distance_transform_edt(~bg)  # distance to the nearest background pixel
    result = np.where(fg, -(inside - 1.0), np.where(bg, outside, 0.0))
    return result.astype(np.float32)


def boundary_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boundary loss (Kervadec et al. 2019): mean over counted pixels of sigmoid(logit) * signed distance.

    Distance maps are computed on the CPU per image with scipy (targets binarised at 0.5).
    """
    x, _ = _binary_pixels(logits, target, mask, "boundary")
    if x.numel() == 0:
        return _zero(logits)
    foreground = (target >= 0.5).detach().cpu().numpy()
    counted = mask.detach().cpu().numpy()
    distances = np.stack([signed_distance_map(fg, c) for fg, c in zip(foreground, counted)])
    sdm = torch.from_numpy(distances).to(device=logits.device, dtype=logits.dtype)[mask]
    return (torch.sigmoid(x) * sdm).mean()


# --------------------------------------------------------------------------- softmax losses


def _class_target(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str) -> torch.Tensor:
    """Long class indices (B, H, W) with every pixel outside `mask` set to IGNORE_INDEX (smp's ignore_index).

    Refuses class indices outside 0..K-1 on counted pixels (a label the class map did not cover).
    """
    check_inputs(logits, target, mask, loss)
    n_classes = logits.shape[1]
    if n_classes < 2:
        raise LossInputError(f"{loss}: expects softmax logits (B, K >= 2, H, W), got {n_classes} channel")
    labels = target.round().long() if target.is_floating_point() else target.long()
    counted = labels[mask]
    if counted.numel() and (counted.min() < 0 or counted.max() >= n_classes):
        raise LossInputError(
            f"{loss}: class indices in target must lie in [0, {n_classes - 1}], found "
            f"{int(counted.min())}..{int(counted.max())}"
        )
    return torch.where(mask, labels, torch.full_like(labels, IGNORE_INDEX))


def _weights_tensor(weights: Sequence[float] | None, logits: torch.Tensor) -> torch.Tensor | None:
    return None if weights is None else torch.as_tensor(list(weights), dtype=logits.dtype, device=logits.device)


def cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Softmax cross-entropy over counted pixels, as torch's `cross_entropy` with `ignore_index`.

    With `class_weights` the mean is weighted (sum w_y l / sum w_y, torch's convention); `label_smoothing`
    mixes the one-hot target with the uniform distribution.
    """
    labels = _class_target(logits, target, mask, "ce")
    if not mask.any():
        return _zero(logits)
    return F.cross_entropy(
        logits,
        labels,
        weight=_weights_tensor(class_weights, logits),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 2.0,
    class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Softmax focal loss -w_y (1 - p_y)^gamma log p_y, mean over counted pixels (w = 1 without weights).

    smp's FocalLoss scores each class one-vs-rest through a sigmoid, which does not fit a softmax model;
    gamma = 0 without weights is exactly the cross-entropy.
    """
    labels = _class_target(logits, target, mask, "focal")
    if not mask.any():
        return _zero(logits)
    log_p = F.log_softmax(logits.movedim(1, -1)[mask], dim=1)  # (N, K)
    y = labels[mask]
    log_p_y = log_p.gather(1, y[:, None])[:, 0]
    loss = -((1 - log_p_y.exp()).pow(gamma)) * log_p_y
    weights = _weights_tensor(class_weights, logits)
    if weights is not None:
        loss = loss * weights[y]
    return loss.mean()


def softmax_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    smooth: float = 1.0,
    class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """smp's multiclass DiceLoss on counted pixels: per class 1 - (I + s) / (I + (FP + FN) / 2 + s) from
    batch-global soft counts, classes absent from the target count 0; the class mean is weighted by
    `class_weights`."""
    labels = _class_target(logits, target, mask, "dice")
    if not mask.any():
        return _zero(logits)
    fn = DiceLoss("multiclass", smooth=smooth, ignore_index=IGNORE_INDEX, class_weights=_as_list(class_weights))
    result: torch.Tensor = fn(logits, labels)
    return result


def softmax_tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.25,
    beta: float = 0.75,
    smooth: float = 1.0,
    class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """smp's multiclass TverskyLoss (alpha weights false positives, beta false negatives, as for binary)."""
    labels = _class_target(logits, target, mask, "tversky")
    if not mask.any():
        return _zero(logits)
    fn = TverskyLoss(
        "multiclass",
        smooth=smooth,
        ignore_index=IGNORE_INDEX,
        alpha=alpha,
        beta=beta,
        gamma=1.0,
        class_weights=_as_list(class_weights),
    )
    result: torch.Tensor = fn(logits, labels)
    return result


def lovasz_softmax_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Lovasz-softmax (Berman et al. 2018) over the counted pixels of the batch, classes present only (smp)."""
    labels = _class_target(logits, target, mask, "lovasz")
    if not mask.any():
        return _zero(logits)
    # smp builds the Lovasz gradient in float32, so the probabilities must be float32 too
    result: torch.Tensor = LovaszLoss("multiclass", per_image=False, ignore_index=IGNORE_INDEX)(logits.float(), labels)
    return result.to(logits.dtype)


def _as_list(weights: Sequence[float] | None) -> list[float] | None:
    return None if weights is None else [float(w) for w in weights]


def frequency_class_weights(pixel_counts: Sequence[float], cap: float) -> list[float]:
    """Inverse-frequency class weights min(cap, N / (K n_c)): 1 for every class of a balanced split.

    A class without a pixel gets `cap` (it cannot be estimated; the cap bounds what it can do).
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) < 2 or (counts < 0).any():
        raise ValueError(f"pixel counts must be >= 0, one per class (>= 2 classes), got {list(pixel_counts)}")
    total = counts.sum()
    if total == 0:
        raise ValueError("cannot compute class weights: the train split has no labelled pixel")
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, total / (len(counts) * counts), np.inf)
    return [float(w) for w in np.minimum(weights, cap)]


def resolve_class_weights(term: LossTerm, class_pixel_counts: Sequence[float] | None) -> list[float] | None:
    """A term's class weights: the given list, 'frequency' from the train split's class pixel counts, or None."""
    if term.class_weights is None or isinstance(term.class_weights, list):
        return term.class_weights
    if class_pixel_counts is None:
        raise ValueError(
            f"loss term {term.name!r} has class_weights='frequency' but no class pixel counts of the train "
            "split were given; pass class_pixel_counts to build_loss"
        )
    return frequency_class_weights(class_pixel_counts, term.class_weight_max)


def _softmax_term_function(term: LossTerm, class_pixel_counts: Sequence[float] | None) -> LossFn:
    """Bind a LossTerm's options to its softmax loss function."""
    w = resolve_class_weights(term, class_pixel_counts)
    if term.name == "ce":
        return lambda lo, ta, ma: cross_entropy_loss(lo, ta, ma, w, term.label_smoothing)
    if term.name == "dice":
        return lambda lo, ta, ma: softmax_dice_loss(lo, ta, ma, smooth=term.smooth, class_weights=w)
    if term.name == "generalized_dice":
        if w is not None:
            raise ValueError("generalized_dice weights classes by 1 / volume^2 itself; drop its class_weights")
        return generalized_dice_loss
    if term.name == "focal":
        return lambda lo, ta, ma: softmax_focal_loss(lo, ta, ma, gamma=term.gamma, class_weights=w)
    if term.name == "tversky":
        return lambda lo, ta, ma: softmax_tversky_loss(lo, ta, ma, term.alpha, term.beta, term.smooth, w)
    if term.name == "lovasz":
        if w is not None:
            raise ValueError("lovasz takes no class_weights; drop them")
        return lovasz_softmax_loss
    raise ValueError(
        f"loss term {term.name!r} is for binary models (one logit); a softmax model uses "
        "ce, dice, generalized_dice, focal, tversky or lovasz"
    )


# --------------------------------------------------------------------------- composite


def resolve_pos_weight(
    term: LossTerm, data_pos_weight: float | None
) -> float | tuple[Literal["batch"], Weighting] | None:
    """The fixed positive weight of a BCE-type term, or a marker that it is computed per batch.

    * a number: used as given (class_weighting must then be 'none');
    * 'data': `data_pos_weight` is the train split's raw neg/pos pixel ratio; the term's
      class_weighting (linear if 'none') and pos_weight_max are applied to it;
    * 'batch': clamp(f(neg/pos), 1, pos_weight_max) over each batch's counted pixels;
    * None with class_weighting != 'none': like 'data'; None otherwise: no weighting.
    """
    mode = term.pos_weight
    if isinstance(mode, (int, float)):
        if term.class_weighting != "none":
            raise ValueError(
                f"loss term {term.name!r}: class_weighting={term.class_weighting!r} applies to pos_weight "
                f"'data' or 'batch', not to the fixed pos_weight {mode}; drop one of them"
            )
        return float(mode)
    if mode == "batch":
        return ("batch", term.class_weighting)
    if mode == "data" or term.class_weighting != "none":
        if data_pos_weight is None:
            raise ValueError(
                f"loss term {term.name!r} needs the train split's neg/pos ratio (pos_weight='data' or "
                f"class_weighting={term.class_weighting!r}); pass data_pos_weight to build_loss"
            )
        weighting: Weighting = "linear" if term.class_weighting == "none" else term.class_weighting
        return min(term.pos_weight_max, max(1.0, class_ratio_weight(data_pos_weight, weighting)))
    return None


def _term_function(term: LossTerm, data_pos_weight: float | None) -> LossFn:
    """Bind a LossTerm's options to its loss function."""
    if term.name in ("bce", "ohem_bce"):
        weight = resolve_pos_weight(term, data_pos_weight)

        def weighted(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            pos_weight: float | torch.Tensor | None
            if isinstance(weight, tuple):
                pos_weight = batch_pos_weight(target, mask, term.pos_weight_max, weight[1])
            else:
                pos_weight = weight
            if term.name == "bce":
                return bce_loss(logits, target, mask, pos_weight)
            return ohem_bce_loss(logits, target, mask, term.keep_ratio, term.min_kept, pos_weight)

        return weighted
    if term.name == "dice":
        return lambda lo, ta, ma: dice_loss(lo, ta, ma, smooth=term.smooth)
    if term.name == "generalized_dice":
        return generalized_dice_loss
    if term.name == "focal":
        return lambda lo, ta, ma: focal_loss(lo, ta, ma, alpha=term.alpha, gamma=term.gamma)
    if term.name == "tversky":
        return lambda lo, ta, ma: tversky_loss(lo, ta, ma, alpha=term.alpha, beta=term.beta, smooth=term.smooth)
    if term.name == "lovasz":
        return lovasz_hinge_loss
    if term.name == "boundary":
        return boundary_loss
    raise ValueError(f"unknown loss term {term.name!r}")


def _unique_names(terms: Sequence[LossTerm]) -> list[str]:
    """Term names for logging; a repeated name gets a suffix (bce, bce_2, ...)."""
    seen: dict[str, int] = {}
    names = []
    for term in terms:
        seen[term.name] = seen.get(term.name, 0) + 1
        names.append(term.name if seen[term.name] == 1 else f"{term.name}_{seen[term.name]}")
    return names


class CompositeLoss(nn.Module):
    """Weighted sum of loss terms: total = sum_i weight_i * loss_i(logits, target, mask).

    forward returns (total, {term name: detached unweighted term value}). A batch without a counted
    pixel gives a zero total that keeps the graph (so DDP and the optimiser see every parameter).
    """

    def __init__(
        self,
        terms: Sequence[LossTerm],
        data_pos_weight: float | None = None,
        num_classes: int = 1,
        class_pixel_counts: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("train.loss must list at least one loss term, e.g. [{name: bce}, {name: dice}]")
        self.terms = list(terms)
        self.names = _unique_names(self.terms)
        self.data_pos_weight = data_pos_weight
        self.num_classes = int(num_classes)
        if self.num_classes >= 2:
            self._functions = [_softmax_term_function(term, class_pixel_counts) for term in self.terms]
        else:
            self._functions = [_term_function(term, data_pos_weight) for term in self.terms]

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_inputs(logits, target, mask, "CompositeLoss")
        if not mask.any():
            zero = _zero(logits)
            return zero, {name: zero.detach() for name in self.names}
        total = _zero(logits)
        parts: dict[str, torch.Tensor] = {}
        for name, term, function in zip(self.names, self.terms, self._functions):
            value = function(logits, target, mask)
            parts[name] = value.detach()
            if term.weight != 0:
                total = total + term.weight * value
        return total, parts

    def extra_repr(self) -> str:
        return " + ".join(f"{term.weight:g}*{name}" for term, name in zip(self.terms, self.names))


def build_loss(
    terms: Sequence[LossTerm],
    data_pos_weight: float | None = None,
    num_classes: int = 1,
    class_pixel_counts: Sequence[float] | None = None,
) -> CompositeLoss:
    """The training loss described by `train.loss`.

    `data_pos_weight` is the train split's raw negative/positive pixel ratio (n_neg / n_pos, not capped
    and not weighted); terms with pos_weight='data' apply their own class_weighting and pos_weight_max.
    `num_classes` >= 2 selects the softmax losses; `class_pixel_counts` (train-split pixels per class)
    feed class_weights='frequency'.
    """
    return CompositeLoss(
        terms, data_pos_weight=data_pos_weight, num_classes=num_classes, class_pixel_counts=class_pixel_counts
    )

"""Array primitives every floor of the package shares: the ignore label, the logistic and
softmax functions and window tiling.

They live at the foundation so that data readers, training, evaluation and inference agree on one
definition of each instead of keeping private copies.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

IGNORE_INDEX = 255
"""Label value of pixels without a usable label; excluded from losses and metrics."""


def sigmoid(x: ArrayLike, dtype: type[np.floating] = np.float64) -> np.ndarray:
    """Numerically stable logistic function 1 / (1 + exp(-x)) in `dtype`.

    The tanh form never overflows and keeps float32 inputs in float32 when asked to.
    """
    arr = np.asarray(x, dtype=dtype)
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * arr)), dtype=dtype)


def softmax(x: ArrayLike, axis: int = 1, dtype: type[np.floating] = np.float64) -> np.ndarray:
    """Numerically stable softmax of `x` along `axis` (the class axis: 1 for (N, C, H, W), 0 for (C, H, W)).

    The one softmax of the package, beside `sigmoid`: the maximum is subtracted first so large logits
    never overflow; the result sums to 1 along `axis`.
    """
    arr = np.asarray(x, dtype=dtype)
    shifted = arr - np.max(arr, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / np.sum(exp, axis=axis, keepdims=True), dtype=dtype)


def window_starts(size: int, window: int, stride: int, allow_gaps: bool = False) -> list[int]:
    """Offsets of windows of `window` pixels every `stride` pixels along one axis of `size` pixels.

    The last window is flush with the end, so every pixel lies in at least one window; a side no
    longer than the window gives [0]. `stride > window` leaves pixels between windows uncovered and
    is refused unless `allow_gaps` (sparse chip sampling at ingest).

    >>> window_starts(500, 224, 112)
    [0, 112, 224, 276]
    """
    if size < 1 or window < 1 or stride < 1:
        raise ValueError(f"size, window and stride must be positive, got {size}, {window}, {stride}")
    if stride > window and not allow_gaps:
        raise ValueError(f"stride {stride} exceeds window {window}: pixels between windows would get no prediction")
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts

"""Sliding-window prediction of an in-memory image: Gaussian-blended window logits.

A model trained on small chips predicts an image of any size by sliding a window over it with
overlap and blending the window LOGITS with a Gaussian weight (high in the window centre, where
the model sees context on every side); `predict_array` normalises a raw image with a model
bundle's statistics and turns the blended logits into probabilities with its calibrated
temperature. Invalid pixels come back as NaN; windows holding only invalid pixels are not run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.arrays import window_starts
from workbench.infer.tta import predict_with_tta, tta_transforms
from workbench.models.bundle import ModelBundle

DEFAULT_WINDOW = 224
PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_context(device: str | torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager[Any]:
    """Autocast for the model's forward: bf16/fp16 on CUDA, bf16 on CPU; fp32 runs as is.

    fp16 autocast on a CPU is refused: CPU kernels gain nothing from it and some lack fp16 support.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    if kind == "cpu" and precision == "fp16":
        raise ValueError("fp16 autocast needs a CUDA device; on a CPU use --precision bf16 or fp32")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"autocast at {precision} is supported on cpu and cuda, not {kind!r}; use fp32")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# --------------------------------------------------------------------------- window geometry


def gaussian_weight(window: int, sigma_factor: float = 0.25) -> np.ndarray:
    """(window, window) blending weight: a Gaussian centred on the window, sigma = window * sigma_factor, peak 1."""
    if window < 1 or sigma_factor <= 0:
        raise ValueError(f"window must be positive and sigma_factor > 0, got {window}, {sigma_factor}")
    profile = gaussian_profile(window, sigma_factor)
    return np.outer(profile, profile)


def gaussian_profile(window: int, sigma_factor: float = 0.25) -> np.ndarray:
    """The 1-D factor of `gaussian_weight` (the 2-D weight is its outer product with itself)."""
    sigma = window * sigma_factor
    offsets = np.arange(window, dtype=np.float64) - (window - 1) / 2.0
    profile = np.exp(-(offsets**2) / (2.0 * sigma**2))
    # a floor keeps pixels that only window corners cover from dividing by (almost) zero
    return np.maximum(profile / profile.max(), 1e-2).astype(np.float32)


# --------------------------------------------------------------------------- sliding window on an array


def _as_image(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image, dtype=np.float32))
    if tensor.ndim != 3:
        raise ValueError(f"expected an image (C, H, W), got shape {tuple(tensor.shape)}")
    return tensor.float()


def _as_valid(valid: np.ndarray | torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
    """Valid mask (H, W): given, or where every band is finite."""
    finite = torch.isfinite(image).all(dim=0)
    if valid is None:
        return finite
    mask = torch.as_tensor(np.asarray(valid) if not isinstance(valid, torch.Tensor) else valid).bool()
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"valid mask shape {tuple(mask.shape)} does not match image {tuple(image.shape[-2:])}")
    return mask & finite


def _pad_to(image: torch.Tensor, valid: torch.Tensor, window: int, pad_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right up to the window size; padded pixels are invalid (they never reach the output)."""
    height, width = image.shape[-2:]
    pad_h, pad_w = max(0, window - height), max(0, window - width)
    if pad_h == pad_w == 0:
        return image, valid
    if pad_mode not in ("reflect", "zero"):
        raise ValueError(f"pad_mode must be 'reflect' or 'zero', got {pad_mode!r}")
    widths = ((0, 0), (0, pad_h), (0, pad_w))
    array = image.numpy()
    padded = np.pad(array, widths, mode="reflect") if pad_mode == "reflect" else np.pad(array, widths)
    return torch.from_numpy(padded), torch.from_numpy(np.pad(valid.numpy(), widths[1:]))


def _window_offsets(
    valid: torch.Tensor, row_starts: Sequence[int], col_starts: Sequence[int], window: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Offsets of windows holding a valid pixel, and of those holding none (counted with an integral image)."""
    integral = np.zeros((valid.shape[0] + 1, valid.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = valid.numpy().cumsum(axis=0).cumsum(axis=1)
    rows, cols = np.asarray(row_starts)[:, None], np.asarray(col_starts)[None, :]
    counts = (
        integral[rows + window, cols + window] - integral[rows, cols + window] - integral[rows + window, cols]
    ) + integral[rows, cols]
    run = [(int(row_starts[i]), int(col_starts[j])) for i, j in zip(*np.nonzero(counts > 0))]
    skipped = [(int(row_starts[i]), int(col_starts[j])) for i, j in zip(*np.nonzero(counts == 0))]
    return run, skipped


def _weight_sum(
    shape: tuple[int, int], rows: Sequence[int], cols: Sequence[int], skipped: Sequence[tuple[int, int]], window: int
) -> torch.Tensor:
    """Sum of the separable window weights over the grid (outer product of 1-D sums), minus skipped windows."""
    profile = torch.from_numpy(gaussian_profile(window))
    row_cover = torch.zeros(shape[0], dtype=torch.float32)
    col_cover = torch.zeros(shape[1], dtype=torch.float32)
    for r in rows:
        row_cover[r : r + window] += profile
    for c in cols:
        col_cover[c : c + window] += profile
    total = torch.outer(row_cover, col_cover)
    weight = torch.outer(profile, profile)
    for r, c in skipped:
        total[r : r + window, c : c + window] -= weight
    return total


def _grid_logits(
    model: nn.Module,
    image: torch.Tensor,
    valid: torch.Tensor,
    row_starts: Sequence[int] | None,
    col_starts: Sequence[int] | None,
    window: int,
    stride: int,
    batch_size: int,
    tta: str,
    device: str | torch.device,
    pad_mode: str,
    progress: bool,
    precision: str = "fp32",
) -> torch.Tensor:
    """Blend window logits over `image` (C, H, W): sum(w * logit) / sum(w); NaN where no window ran."""
    height, width = image.shape[-2:]
    padded, padded_valid = _pad_to(image, valid, window, pad_mode)
    rows = list(row_starts) if row_starts is not None else window_starts(int(height), window, stride)
    cols = list(col_starts) if col_starts is not None else window_starts(int(width), window, stride)
    weight = torch.from_numpy(gaussian_weight(window))
    tta_transforms(tta, window, window)  # reject an unusable mode before any work
    logit_sum: torch.Tensor | None = None
    run, skipped = _window_offsets(padded_valid, rows, cols, window)
    batches = [run[i : i + batch_size] for i in range(0, len(run), batch_size)]
    for batch in tqdm(batches, desc="windows", unit="batch", disable=not progress, leave=False):
        stack = torch.stack([padded[:, r : r + window, c : c + window] for r, c in batch]).to(device)
        with autocast_context(device, precision):
            logits = predict_with_tta(model, stack, tta)
        logits = logits.float().cpu()
        if logits.ndim != 4 or tuple(logits.shape[-2:]) != (window, window):
            raise ValueError(
                f"the model returned shape {tuple(logits.shape)} for windows of {window}x{window}; it must keep "
                "the spatial size (smp models need windows divisible by 32)"
            )
        if logit_sum is None:
            logit_sum = torch.zeros((logits.shape[1], *padded.shape[-2:]), dtype=torch.float32)
        for (r, c), window_logits in zip(batch, logits):
            logit_sum[:, r : r + window, c : c + window].addcmul_(window_logits, weight)
    if logit_sum is None:  # nothing valid: the number of classes is unknown, report one NaN channel
        return torch.full((1, int(height), int(width)), float("nan"))
    weight_sum = _weight_sum((int(padded.shape[-2]), int(padded.shape[-1])), rows, cols, skipped, window)
    # pixels covered only by skipped windows keep a weight sum of (almost) zero (the smallest real weight is 1e-4)
    blended = torch.where(weight_sum > 5e-5, logit_sum / weight_sum.clamp_min(5e-5), float("nan"))
    return blended[:, :height, :width]


def _resize(tensor: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    kwargs: dict[str, Any] = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor[None], size=size, mode=mode, **kwargs)[0]


def _multiscale_logits(
    model: nn.Module,
    image: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    stride: int,
    batch_size: int,
    tta: str,
    device: str | torch.device,
    scales: Sequence[float],
    pad_mode: str,
    progress: bool,
    row_starts: Sequence[int] | None = None,
    col_starts: Sequence[int] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Average (NaN-aware) the blended logits of each scale, resized back to the input grid."""
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")

    def grid(
        img: torch.Tensor, ok: torch.Tensor, rows: Sequence[int] | None, cols: Sequence[int] | None
    ) -> torch.Tensor:
        """Blended logits of one scale's image (the window options are those of the call)."""
        return _grid_logits(
            model, img, ok, rows, cols, window, stride, batch_size, tta, device, pad_mode, progress, precision
        )

    if list(scales) == [1.0]:
        return grid(image, valid, row_starts, col_starts).masked_fill_(~valid, float("nan"))
    height, width = int(image.shape[-2]), int(image.shape[-1])
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None
    for scale in scales:
        if scale == 1.0:
            logits = grid(image, valid, row_starts, col_starts)
        else:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            small = _resize(image, size, "bilinear")
            small_valid = _resize(valid[None].float(), size, "nearest")[0] > 0.5
            coarse = grid(small, small_valid, None, None)
            covered = _resize(torch.isfinite(coarse[:1]).float(), (height, width), "bilinear")[0]
            logits = _resize(torch.nan_to_num(coarse, nan=0.0), (height, width), "bilinear")
            logits = torch.where(covered > 0.999, logits, float("nan"))
        finite = torch.isfinite(logits)
        total = torch.where(finite, logits, 0.0) if total is None else total + torch.where(finite, logits, 0.0)
        count = finite.float() if count is None else count + finite.float()
    assert total is not None and count is not None
    averaged = torch.where(count > 0, total / count.clamp_min(1.0), float("nan"))
    return torch.where(valid, averaged, float("nan"))


def sliding_window_logits(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    batch_size: int = 8,
    tta: str = "none",
    device: str | torch.device = "cpu",
    valid: np.ndarray | torch.Tensor | None = None,
    scales: Sequence[float] = (1.0,),
    pad_mode: str = "reflect",
    progress: bool = True,
    precision: str = "fp32",
) -> np.ndarray:
    """Logits (K, H, W) of `model` over an image (C, H, W) of any size, blended across overlapping windows.

    The model must already be on `device` and in eval mode. Pixels that are invalid (given by `valid`,
    or non-finite in any band) are filled with 0 for the model and come back as NaN; windows without a
    valid pixel are skipped. With several `scales` the image is resized, predicted and resized back,
    and the logits are averaged. `precision` bf16/fp16 runs the model's forward under autocast
    (`autocast_context`); blending stays in float32.
    """
    tensor = _as_image(image)
    mask = _as_valid(valid, tensor)
    tensor = torch.where(mask, tensor, 0.0)
    with torch.inference_mode():
        logits = _multiscale_logits(
            model,
            tensor,
            mask,
            window,
            stride or window // 2,
            batch_size,
            tta,
            device,
            scales,
            pad_mode,
            progress,
            precision=precision,
        )
    return logits.numpy()


# --------------------------------------------------------------------------- bundle-aware prediction


def logits_to_probabilities(logits: np.ndarray, temperature: float | Sequence[float] = 1.0) -> np.ndarray:
    """sigmoid (one channel) or softmax over channels of logits / temperature; NaN stays NaN.

    A softmax model's temperature may be one per class (channel c divided by T_c), as calibration.json
    holds it with calibrate.per_class_temperature.
    """
    values = np.asarray(temperature, dtype=np.float64).reshape(-1)
    divisor: float | torch.Tensor = float(values[0])
    if values.size > 1:
        if values.size != logits.shape[0]:
            raise ValueError(f"{values.size} temperatures for {logits.shape[0]} classes")
        divisor = torch.as_tensor(values, dtype=torch.float32).reshape(-1, *([1] * (np.ndim(logits) - 1)))
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float32)) / divisor
    probs = torch.sigmoid(scaled) if scaled.shape[0] == 1 else torch.softmax(scaled, dim=0)
    return probs.numpy()


def predict_array(
    bundle: ModelBundle,
    image: np.ndarray,
    valid: np.ndarray | None = None,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    batch_size: int = 8,
    tta: str = "none",
    device: str | torch.device = "cpu",
    scales: Sequence[float] = (1.0,),
    progress: bool = True,
    row_starts: Sequence[int] | None = None,
    col_starts: Sequence[int] | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Calibrated probabilities (K, H, W) for a raw image (C, H, W) in the bundle's band order.

    Normalises with the bundle's statistics and divides logits by its temperature. Pixels invalid
    in the input (`valid` False, or non-finite) are NaN in the output. `row_starts` / `col_starts`
    replace the window grid (block-wise prediction uses the grid of the whole raster).
    """
    raw = np.asarray(image)
    if raw.ndim != 3 or raw.shape[0] != len(bundle.bands):
        raise ValueError(f"expected an image ({len(bundle.bands)}, H, W) for bands {bundle.bands}, got {raw.shape}")
    tensor = bundle.normalization.apply(torch.from_numpy(raw.astype(np.float32, copy=False)))
    mask = _as_valid(valid, tensor)
    tensor = torch.where(mask, tensor, 0.0)
    model = bundle.model.to(device).eval()
    with torch.inference_mode():
        logits = _multiscale_logits(
            model,
            tensor,
            mask,
            window,
            stride or window // 2,
            batch_size,
            tta,
            device,
            scales,
            "reflect",
            progress,
            row_starts,
            col_starts,
            precision,
        )
    temperature = bundle.calibration.get("temperature", 1.0) if bundle.num_classes >= 2 else bundle.temperature
    return logits_to_probabilities(logits.numpy(), temperature)

"""Large-raster inference: Gaussian-blended sliding windows, processed block by block.

A model trained on small chips predicts a scene by sliding a window over it with overlap and
blending the window LOGITS with a Gaussian weight (high in the window centre, where the model sees
context on every side), then turning the blended logits into probabilities with the calibrated
temperature. A scene larger than memory is processed in row blocks: each block reads the rows of
every window that touches it (a halo), so the result does not depend on the block size, and its
rows are written into tiled GeoTIFFs with windowed writes before the next block is read. When a
dask distributed Client is active, blocks run on its workers.

Nodata is never turned into silent zeros: a pixel that is nodata in any input band is NaN in
`probability.tif` and 255 in `mask.tif`; windows holding only nodata are not run at all.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.windows
import torch
import torch.nn.functional as F
from affine import Affine
from torch import nn
from tqdm.auto import tqdm

from workbench.arrays import window_starts
from workbench.evaluate.tta import predict_with_tta, tta_transforms
from workbench.io import write_text_atomic
from workbench.models.bundle import BuildModel, ModelBundle, check_bands, load_bundle

DEFAULT_WINDOW = 224
DEFAULT_MEMORY_LIMIT_MB = 1024
OUTPUT_TILE = 256
MASK_NODATA = 255
MIB = 1024 * 1024


class RasterInputError(ValueError):
    """A raster cannot be used for inference (bands, georeference); the message names the file."""


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
        logits = predict_with_tta(model, stack, tta).float().cpu()
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
) -> torch.Tensor:
    """Average (NaN-aware) the blended logits of each scale, resized back to the input grid."""
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    if list(scales) == [1.0]:
        logits = _grid_logits(
            model, image, valid, row_starts, col_starts, window, stride, batch_size, tta, device, pad_mode, progress
        )
        return logits.masked_fill_(~valid, float("nan"))
    height, width = int(image.shape[-2]), int(image.shape[-1])
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None
    for scale in scales:
        if scale == 1.0:
            logits = _grid_logits(
                model,
                image,
                valid,
                row_starts,
                col_starts,
                window,
                stride,
                batch_size,
                tta,
                device,
                pad_mode,
                progress,
            )
        else:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            small = _resize(image, size, "bilinear")
            small_valid = _resize(valid[None].float(), size, "nearest")[0] > 0.5
            coarse = _grid_logits(
                model, small, small_valid, None, None, window, stride, batch_size, tta, device, pad_mode, progress
            )
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
) -> np.ndarray:
    """Logits (K, H, W) of `model` over an image (C, H, W) of any size, blended across overlapping windows.

    The model must already be on `device` and in eval mode. Pixels that are invalid (given by `valid`,
    or non-finite in any band) are filled with 0 for the model and come back as NaN; windows without a
    valid pixel are skipped. With several `scales` the image is resized, predicted and resized back,
    and the logits are averaged.
    """
    tensor = _as_image(image)
    mask = _as_valid(valid, tensor)
    tensor = torch.where(mask, tensor, 0.0)
    with torch.inference_mode():
        logits = _multiscale_logits(
            model, tensor, mask, window, stride or window // 2, batch_size, tta, device, scales, pad_mode, progress
        )
    return logits.numpy()


# --------------------------------------------------------------------------- bundle-aware prediction


def logits_to_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """sigmoid (one channel) or softmax over channels of logits / temperature; NaN stays NaN."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float32)) / float(temperature)
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
        )
    return logits_to_probabilities(logits.numpy(), bundle.temperature)


# --------------------------------------------------------------------------- memory measurement


class PeakMemory:
    """Samples this process's resident memory in a background thread; use as a context manager."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mb() -> float:
        """Current resident set size in MiB."""
        import psutil

        return float(psutil.Process().memory_info().rss) / MIB

    @property
    def increase_mb(self) -> float:
        return max(0.0, self.peak_mb - self.baseline_mb)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.baseline_mb = self.peak_mb = self.rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())


# --------------------------------------------------------------------------- raster sources


@dataclass(frozen=True)
class RasterInfo:
    """What inference needs to know about an input raster."""

    name: str
    height: int
    width: int
    band_names: list[str]
    crs: Any
    transform: Affine
    nodata: list[float | None]
    itemsize: int


Span = tuple[int, int]


@dataclass(frozen=True)
class FileReader:
    """Reads windows of a GeoTIFF (re-opened per call, so it can run in another process)."""

    path: str

    def __call__(self, rows: Span, cols: Span) -> np.ndarray:
        with rasterio.open(self.path) as src:
            return src.read(window=rasterio.windows.Window.from_slices(rows, cols))


@dataclass(frozen=True)
class ArrayReader:
    """Reads windows of a (band, y, x) DataArray; a dask-backed array loads only that window."""

    array: Any

    def __call__(self, rows: Span, cols: Span) -> np.ndarray:
        _, y_dim, x_dim = self.array.dims
        return np.asarray(self.array.isel({y_dim: slice(*rows), x_dim: slice(*cols)}).values)


def _names(source: str, count: int, descriptions: Sequence[str | None], band_names: Sequence[str] | None) -> list[str]:
    if band_names is not None:
        if len(band_names) != count:
            raise RasterInputError(f"raster {source} has {count} bands but band_names lists {len(band_names)}")
        return [str(name) for name in band_names]
    if any(not name for name in descriptions):
        raise RasterInputError(
            f"raster {source} does not name its bands (GeoTIFF band descriptions are empty); pass band_names"
        )
    return [str(name) for name in descriptions]


def _open_file(path: Path, band_names: Sequence[str] | None) -> tuple[RasterInfo, FileReader]:
    if not path.is_file():
        raise FileNotFoundError(f"raster {path} does not exist")
    with rasterio.open(path) as src:
        if src.crs is None or src.transform == Affine.identity():
            raise RasterInputError(
                f"raster {path} has no georeference (CRS and geotransform); outputs could not be placed on a map"
            )
        info = RasterInfo(
            name=str(path),
            height=src.height,
            width=src.width,
            band_names=_names(str(path), src.count, src.descriptions, band_names),
            crs=src.crs,
            transform=src.transform,
            nodata=[None if v is None else float(v) for v in src.nodatavals],
            itemsize=np.dtype(src.dtypes[0]).itemsize,
        )
    return info, FileReader(str(path))


def _open_array(array: Any, band_names: Sequence[str] | None) -> tuple[RasterInfo, ArrayReader]:
    if array.ndim == 2:
        array = array.expand_dims("band")
    if array.ndim != 3:
        raise RasterInputError(f"DataArray {array.name!r} must be (band, y, x), got dims {array.dims}")
    name = f"DataArray {array.name!r}"
    y_dim, x_dim = array.rio.y_dim, array.rio.x_dim
    band_dim = next(dim for dim in array.dims if dim not in (y_dim, x_dim))
    array = array.transpose(band_dim, y_dim, x_dim)
    if array.rio.crs is None:
        raise RasterInputError(f"{name} has no georeference (set one with .rio.write_crs); outputs need a CRS")
    descriptions = array.attrs.get("long_name")
    if isinstance(descriptions, str):
        descriptions = [descriptions]
    if descriptions is None and array[band_dim].dtype.kind in "UO":
        descriptions = [str(v) for v in array[band_dim].values]
    nodata = array.rio.nodata
    info = RasterInfo(
        name=name,
        height=int(array.shape[1]),
        width=int(array.shape[2]),
        band_names=_names(name, int(array.shape[0]), list(descriptions or [None] * array.shape[0]), band_names),
        crs=array.rio.crs,
        transform=array.rio.transform(),
        nodata=[None if nodata is None else float(nodata)] * int(array.shape[0]),
        itemsize=array.dtype.itemsize,
    )
    return info, ArrayReader(array)


def open_raster(raster: str | Path | Any, band_names: Sequence[str] | None = None) -> tuple[RasterInfo, Any]:
    """Describe a GeoTIFF path or a rioxarray DataArray and return a picklable window reader."""
    if isinstance(raster, str | Path):
        return _open_file(Path(raster), band_names)
    if hasattr(raster, "rio"):
        return _open_array(raster, band_names)
    raise TypeError(f"expected a GeoTIFF path or an xarray DataArray, got {type(raster).__name__}")


def input_valid(raw: np.ndarray, nodata: Sequence[float | None]) -> np.ndarray:
    """(H, W) True where every band is finite and differs from its nodata value."""
    valid = np.isfinite(raw).all(axis=0) if raw.dtype.kind == "f" else np.ones(raw.shape[1:], dtype=bool)
    for band, value in enumerate(nodata):
        if value is not None and not math.isnan(value):
            valid &= raw[band] != value
    return valid


# --------------------------------------------------------------------------- block plan


@dataclass(frozen=True)
class AxisSpan:
    """One axis of a block: [core0, core1) is written, [read0, read1) is read; starts are relative to read0."""

    core0: int
    core1: int
    read0: int
    read1: int
    starts: tuple[int, ...]


@dataclass(frozen=True)
class Block:
    """One block of the raster: its row span and column span."""

    rows: AxisSpan
    cols: AxisSpan


def _axis_spans(size: int, window: int, stride: int, block: int, halo: int) -> list[AxisSpan]:
    """Split one axis into cores of `block` pixels; each reads every window of the global grid touching it."""
    if size <= window:
        return [AxisSpan(0, size, 0, size, (0,))]
    starts = window_starts(size, window, stride)
    spans = []
    for core0 in range(0, size, block):
        core1 = min(size, core0 + block)
        touching = [s for s in starts if s < core1 and s + window > core0]
        read0 = min(min(touching), max(0, core0 - halo))
        read1 = max(max(touching) + window, min(size, core1 + halo))
        spans.append(AxisSpan(core0, core1, read0, read1, tuple(s - read0 for s in touching)))
    return spans


def plan_blocks(
    height: int, width: int, window: int, stride: int, block_size: int, scales: Sequence[float] = (1.0,)
) -> list[Block]:
    """Row-major blocks of `block_size` pixels whose reads include every window touching their core.

    Because the window grid is the whole raster's, the blended result does not depend on block_size
    (exactly at scale 1; other scales read a halo of window / scale pixels and match closely).
    """
    halo = math.ceil(window / min(scales)) if any(s != 1.0 for s in scales) else 0
    row_spans = _axis_spans(height, window, stride, block_size, halo)
    col_spans = _axis_spans(width, window, stride, block_size, halo)
    return [Block(rows, cols) for rows in row_spans for cols in col_spans]


def default_model_memory_mb(channels: int, classes: int, window: int, batch_size: int) -> float:
    """Rough working memory of one batch forward: inputs, outputs and 64 float32 feature maps per window."""
    return batch_size * window * window * 4 * (2 * channels + 2 * classes + 64) / MIB


def gdal_cache_mb(memory_limit_mb: float) -> int:
    """GDAL block cache for reads and tiled writes: a tenth of the limit, at least 16 MiB."""
    return max(16, int(memory_limit_mb / 10))


def block_size_for_memory(
    memory_limit_mb: float,
    channels: int,
    classes: int,
    window: int,
    batch_size: int,
    itemsize: int = 4,
    model_memory_mb: float | None = None,
) -> int:
    """Side of square blocks (a multiple of the output tile) whose arrays stay under the memory limit.

    From the limit are taken the model's working memory (`model_memory_mb`, default
    `default_model_memory_mb`) and the GDAL cache; the rest holds one block's read (core plus a
    window-wide halo on each side): per pixel the raw values, a float32 copy and the normalisation
    temporaries per band, and logit/weight sums, probabilities and masks per class. Blocks never
    shrink below one output tile.
    """
    if model_memory_mb is None:
        model_memory_mb = default_model_memory_mb(channels, classes, window, batch_size)
    per_pixel = channels * (itemsize + 16) + classes * 24 + 16
    available_mb = memory_limit_mb - model_memory_mb - gdal_cache_mb(memory_limit_mb)
    budget = max(available_mb, memory_limit_mb / 4) * MIB
    side = math.isqrt(int(budget // per_pixel)) - 2 * window
    if side < OUTPUT_TILE:
        smallest_mb = model_memory_mb + (OUTPUT_TILE + 2 * window) ** 2 * per_pixel / MIB
        warnings.warn(
            f"memory limit {memory_limit_mb:.0f} MB is below the smallest block for {channels} bands "
            f"(about {smallest_mb:.0f} MB with window {window}); raise the limit or use a smaller window",
            RuntimeWarning,
            stacklevel=2,
        )
    return max(OUTPUT_TILE, side // OUTPUT_TILE * OUTPUT_TILE)


# --------------------------------------------------------------------------- block execution


@dataclass
class BlockJob:
    """Everything a worker needs to predict one block (picklable for a dask distributed cluster)."""

    bundle: ModelBundle
    reader: Callable[[Span, Span], np.ndarray]
    nodata: list[float | None]
    window: int
    stride: int
    batch_size: int
    tta: str
    device: str
    scales: tuple[float, ...]

    def __call__(self, block: Block) -> tuple[Block, np.ndarray]:
        rows, cols = block.rows, block.cols
        raw = self.reader((rows.read0, rows.read1), (cols.read0, cols.read1))
        valid = input_valid(raw, self.nodata)
        probs = predict_array(
            self.bundle,
            raw,
            valid,
            window=self.window,
            stride=self.stride,
            batch_size=self.batch_size,
            tta=self.tta,
            device=self.device,
            scales=self.scales,
            progress=False,
            row_starts=rows.starts,
            col_starts=cols.starts,
        )
        core = probs[
            :, rows.core0 - rows.read0 : rows.core1 - rows.read0, cols.core0 - cols.read0 : cols.core1 - cols.read0
        ]
        classes = self.bundle.num_classes
        if core.shape[0] != classes:  # every window was nodata: the model never ran
            core = np.full((classes, *core.shape[1:]), np.nan, dtype=np.float32)
        return block, np.ascontiguousarray(core)


def _active_client() -> Any | None:
    """The dask distributed Client of this session, if one is running."""
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:
        return None


def run_blocks(job: BlockJob, blocks: Sequence[Block], max_in_flight: int = 4) -> Iterator[tuple[Block, np.ndarray]]:
    """Yield (block, probabilities) one block at a time, locally or on an active distributed cluster."""
    client = _active_client()
    if client is None:
        for block in blocks:
            yield job(block)
        return
    from distributed import as_completed

    remote_job = client.scatter(job, broadcast=True)
    pending = iter(blocks)
    futures = as_completed()
    for block in [b for _, b in zip(range(max_in_flight), pending)]:
        futures.add(client.submit(_call_job, remote_job, block, pure=False))
    for future in futures:
        yield future.result()
        following = next(pending, None)
        if following is not None:
            futures.add(client.submit(_call_job, remote_job, following, pure=False))


def _call_job(job: BlockJob, block: Block) -> tuple[Block, np.ndarray]:
    return job(block)


# --------------------------------------------------------------------------- outputs


def probability_to_mask(probs: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 mask (H, W): prob > threshold for one channel, argmax for several; 255 where probs are NaN."""
    nodata = ~np.isfinite(probs).all(axis=0)
    if probs.shape[0] == 1:
        mask = (np.nan_to_num(probs[0], nan=0.0) > threshold).astype(np.uint8)
    else:
        mask = np.nan_to_num(probs, nan=-1.0).argmax(axis=0).astype(np.uint8)
    mask[nodata] = MASK_NODATA
    return mask


@dataclass
class _Polygons:
    """Pixel-space polygons of each block; pieces cut by block seams are merged at the end."""

    height: int
    width: int
    inner: list[tuple[Any, int]] = field(default_factory=list)
    seam: dict[int, list[Any]] = field(default_factory=dict)

    def _on_seam(self, polygon: Any, row0: int, col0: int, shape: tuple[int, ...]) -> bool:
        row1, col1 = row0 + shape[0], col0 + shape[1]
        minx, miny, maxx, maxy = polygon.bounds
        return (
            (row0 > 0 and miny <= row0)
            or (row1 < self.height and maxy >= row1)
            or (col0 > 0 and minx <= col0)
            or (col1 < self.width and maxx >= col1)
        )

    def add_block(self, mask: np.ndarray, row0: int, col0: int) -> None:
        from shapely.geometry import shape

        foreground = (mask != MASK_NODATA) & (mask > 0)
        if not foreground.any():
            return
        offset = Affine.translation(col0, row0)
        for geometry, value in rasterio.features.shapes(mask, mask=foreground, connectivity=4, transform=offset):
            polygon = shape(geometry)
            if self._on_seam(polygon, row0, col0, mask.shape):
                self.seam.setdefault(int(value), []).append(polygon)
            else:
                self.inner.append((polygon, int(value)))

    def merged(self) -> list[tuple[Any, int]]:
        from shapely import unary_union

        result = list(self.inner)
        for value, pieces in self.seam.items():
            union = unary_union(pieces)
            parts = getattr(union, "geoms", [union])
            result.extend((part, value) for part in parts if not part.is_empty)
        return result


def _area_m2(frame: Any) -> np.ndarray:
    """Polygon areas in square metres: in the raster CRS when projected, else in a local equal-area projection."""
    crs = frame.crs
    if crs.is_geographic:
        centre = frame.to_crs(4326).union_all().centroid
        laea = f"+proj=laea +lat_0={centre.y} +lon_0={centre.x} +datum=WGS84 +units=m"
        return np.asarray(frame.to_crs(laea).area, dtype=np.float64)
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return np.asarray(frame.area, dtype=np.float64) * factor**2


def polygons_geojson(
    polygons: list[tuple[Any, int]], transform: Affine, crs: Any, min_area_m2: float
) -> tuple[str, int]:
    """GeoJSON (EPSG:4326) of pixel-space polygons placed with `transform`, with id, class and area_m2.

    Returns the GeoJSON text and the number of features kept (area >= min_area_m2).
    """
    import geopandas as gpd
    from shapely import affinity

    coefficients = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    geometries = [affinity.affine_transform(polygon, coefficients) for polygon, _ in polygons]
    frame = gpd.GeoDataFrame(
        {"class": [value for _, value in polygons]}, geometry=geometries, crs=crs.to_wkt() if crs else None
    )
    frame["area_m2"] = _area_m2(frame) if len(frame) else np.zeros(0)
    frame = frame[frame["area_m2"] >= min_area_m2].reset_index(drop=True)
    frame.insert(0, "id", np.arange(len(frame)))
    return str(frame.to_crs(4326).to_json(drop_id=True)), len(frame)


@dataclass
class PredictionResult:
    """Where predict_raster wrote its outputs and what the run cost."""

    probability: Path
    mask: Path
    polygons: Path
    n_polygons: int
    n_blocks: int
    block_size: int
    peak_rss_mb: float
    peak_increase_mb: float
    seconds: float

    @property
    def paths(self) -> dict[str, Path]:
        return {"probability": self.probability, "mask": self.mask, "polygons": self.polygons}


def _output_profile(info: RasterInfo, count: int, dtype: str, nodata: float) -> dict[str, Any]:
    return {
        "driver": "GTiff",
        "height": info.height,
        "width": info.width,
        "count": count,
        "dtype": dtype,
        "crs": info.crs,
        "transform": info.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": OUTPUT_TILE,
        "blockysize": OUTPUT_TILE,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }


def _temporary_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp creates owner-only files; outputs are ordinary readable files
    return Path(name)


def _resolve_bundle(model: str | Path | ModelBundle, build_model: BuildModel | None) -> ModelBundle:
    return model if isinstance(model, ModelBundle) else load_bundle(model, build_model)


def predict_raster(
    model_dir: str | Path | ModelBundle,
    raster: str | Path | Any,
    out_dir: str | Path,
    window: int | None = None,
    stride: int | None = None,
    memory_limit_mb: float | None = None,
    min_area_m2: float = 0.0,
    scales: Sequence[float] = (1.0,),
    tta: str = "none",
    band_names: Sequence[str] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    block_size: int | None = None,
    model_memory_mb: float | None = None,
    build_model: BuildModel | None = None,
    progress: bool = True,
) -> PredictionResult:
    """Predict a georeferenced raster block by block into probability.tif, mask.tif and polygons.geojson.

    The raster's bands (GeoTIFF band descriptions, or `band_names`) must be the model's bands in its
    order. Square blocks (`block_size` pixels, by default sized so that one block stays under
    `memory_limit_mb`, 1024 MiB when not given; `model_memory_mb` is one batch forward's working
    memory, estimated when not given) are read, predicted and written with windowed writes
    one at a time, so rasters larger than memory work; the result does not depend on the block size.
    Outputs replace earlier files only once complete.
    """
    started = time.perf_counter()
    bundle = _resolve_bundle(model_dir, build_model)
    info, reader = open_raster(raster, band_names)
    check_bands(bundle, info.band_names, source=f"raster {info.name}")
    window = window or DEFAULT_WINDOW
    stride = stride or window // 2
    classes = bundle.num_classes
    limit_mb = memory_limit_mb or DEFAULT_MEMORY_LIMIT_MB
    side = block_size or block_size_for_memory(
        limit_mb, len(bundle.bands), classes, window, batch_size, info.itemsize, model_memory_mb
    )
    blocks = plan_blocks(info.height, info.width, window, stride, side, scales)
    job = BlockJob(bundle, reader, info.nodata, window, stride, batch_size, tta, device, tuple(scales))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = {"probability": out / "probability.tif", "mask": out / "mask.tif", "polygons": out / "polygons.geojson"}
    temporary = {key: _temporary_beside(path) for key, path in final.items() if key != "polygons"}
    polygons = _Polygons(info.height, info.width)
    try:
        with rasterio.Env(GDAL_CACHEMAX=gdal_cache_mb(limit_mb)), PeakMemory() as memory, ExitStack() as stack:
            prob_dst = stack.enter_context(
                rasterio.open(temporary["probability"], "w", **_output_profile(info, classes, "float32", float("nan")))
            )
            mask_dst = stack.enter_context(
                rasterio.open(temporary["mask"], "w", **_output_profile(info, 1, "uint8", MASK_NODATA))
            )
            prob_dst.descriptions = ("probability",) if classes == 1 else tuple(f"class_{k}" for k in range(classes))
            mask_dst.descriptions = ("mask",)
            for block, probs in tqdm(
                run_blocks(job, blocks), total=len(blocks), desc="blocks", unit="block", disable=not progress
            ):
                rows, cols = block.rows, block.cols
                target = rasterio.windows.Window.from_slices((rows.core0, rows.core1), (cols.core0, cols.core1))
                mask = probability_to_mask(probs, bundle.threshold)
                prob_dst.write(probs.astype(np.float32, copy=False), window=target)
                mask_dst.write(mask[None], window=target)
                polygons.add_block(mask, rows.core0, cols.core0)
                del probs, mask
        merged = polygons.merged()
        geojson, n_polygons = polygons_geojson(merged, info.transform, info.crs, min_area_m2)
        for key, path in temporary.items():
            os.replace(path, final[key])
        write_text_atomic(final["polygons"], geojson)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return PredictionResult(
        probability=final["probability"],
        mask=final["mask"],
        polygons=final["polygons"],
        n_polygons=n_polygons,
        n_blocks=len(blocks),
        block_size=side,
        peak_rss_mb=memory.peak_mb,
        peak_increase_mb=memory.increase_mb,
        seconds=time.perf_counter() - started,
    )

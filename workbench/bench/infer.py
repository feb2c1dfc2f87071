"""Benchmark: sliding-window overhead, threshold-sweep throughput and bounded-memory raster inference.

(a) The same smp U-Net (resnet18, 15 bands, random weights) runs over the same windows with the same
    batch size twice: as bare batched forwards over pre-cut windows, and through
    `sliding_window_logits` (cutting, Gaussian blending). Goal: overhead ratio <= 1.15.
(b) The threshold-sweep throughput of `workbench.evaluate.metrics.bench_sweep`.
(c) `predict_raster` on a generated GeoTIFF four times larger than a memory limit, with a cheap
    1x1-convolution model and 64-pixel windows, so the run measures reading, blending, writing and
    memory rather than the network; reports the peak resident memory above the level before the run
    (after a warm-up run on a small raster, so one-off library initialisation is not counted) and
    whether it stayed under the limit. Many bands keep the pixel count, and so the run time, modest
    while the raster is still four times the limit.

The full run takes a few minutes on a laptop CPU; `quick` is a smoke run of a few seconds.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.transform import from_origin
from torch import nn

from workbench.arrays import window_starts
from workbench.data.normalize import NormalizationStats
from workbench.infer import predict_raster, sliding_window_logits
from workbench.models.bundle import ModelBundle
from workbench.params import ModelParams

OVERHEAD_GOAL = 1.15


def unet15(in_channels: int = 15) -> nn.Module:
    """smp U-Net with a resnet18 encoder and random weights (no download)."""
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, in_channels=in_channels, classes=1).eval()


def _cut_windows(image: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    rows = window_starts(int(image.shape[1]), window, stride)
    cols = window_starts(int(image.shape[2]), window, stride)
    return torch.stack([image[:, r : r + window, c : c + window] for r in rows for c in cols])


def _bare_forward_seconds(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for offset in range(0, len(windows), batch_size):
            model(windows[offset : offset + batch_size])
    return time.perf_counter() - start


def bench_overhead(
    image_size: int, window: int, stride: int, batch_size: int, in_channels: int = 15, repeats: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Best-of-`repeats` seconds of bare batched forwards vs the sliding window over the same windows."""
    torch.manual_seed(seed)
    model = unet15(in_channels)
    image = torch.randn(in_channels, image_size, image_size)
    windows = _cut_windows(image, window, stride)
    _bare_forward_seconds(model, windows[:batch_size], batch_size)  # warm-up
    bare, sliding = math.inf, math.inf
    for _ in range(repeats):
        bare = min(bare, _bare_forward_seconds(model, windows, batch_size))
        start = time.perf_counter()
        sliding_window_logits(model, image, window, stride, batch_size=batch_size, progress=False)
        sliding = min(sliding, time.perf_counter() - start)
    ratio = sliding / bare
    return {
        "model": f"smp Unet resnet18, {in_channels} bands, random weights",
        "image_size": image_size,
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "n_windows": len(windows),
        "repeats": repeats,
        "bare_forward_s": bare,
        "sliding_window_s": sliding,
        "overhead_ratio": ratio,
        "goal_ratio": OVERHEAD_GOAL,
        "meets_goal": ratio <= OVERHEAD_GOAL,
    }


def bench_threshold_sweep(n_pixels: int) -> dict[str, Any]:
    """Histogram-sweep throughput, or a note when the metrics module does not provide it."""
    try:
        from workbench.evaluate.metrics import bench_sweep
    except ImportError as exc:
        return {"skipped": f"workbench.evaluate.metrics.bench_sweep is not available ({exc})"}
    return dict(bench_sweep(n_pixels=n_pixels))


def write_test_raster(path: Path, side: int, bands: int, block_rows: int = 256, seed: int = 0) -> Path:
    """A float32 GeoTIFF (UTM, 10 m) written row block by row block: noisy background, square lakes every 500 px."""
    import rasterio

    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff",
        "height": side,
        "width": side,
        "count": bands,
        "dtype": "float32",
        "crs": "EPSG:32643",
        "transform": from_origin(500_000.0, 4_800_000.0, 10.0, 10.0),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "BIGTIFF": "IF_SAFER",
    }
    columns = np.arange(side)
    with rasterio.open(path, "w", **profile) as dst:
        dst.descriptions = tuple(f"band{i}" for i in range(bands))
        for row0 in range(0, side, block_rows):
            rows = np.arange(row0, min(side, row0 + block_rows))
            block = rng.normal(0.0, 0.5, (bands, len(rows), side)).astype(np.float32)
            lakes = ((rows[:, None] % 500) < 40) & ((columns[None, :] % 500) < 40)
            block[0] += np.where(lakes, 4.0, -4.0).astype(np.float32)
            dst.write(block, window=rasterio.windows.Window(0, row0, side, len(rows)))
    return path


def _first_band_bundle(bands: int) -> ModelBundle:
    """A 1x1 convolution returning band 0 as the logit, with identity normalisation."""
    model = nn.Conv2d(bands, 1, kernel_size=1)
    weight = torch.zeros_like(model.weight)
    weight[0, 0] = 1.0
    model.weight = nn.Parameter(weight)
    model.bias = nn.Parameter(torch.zeros(1))
    names = [f"band{i}" for i in range(bands)]
    stats = NormalizationStats(bands=names, method="none")
    return ModelBundle(model.eval(), ModelParams(), names, ["demo"] * bands, stats)


def _max_rss_mb() -> float:
    """Lifetime peak RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def bench_large_raster(
    out_dir: Path,
    memory_limit_mb: float,
    factor: float,
    bands: int,
    window: int,
    stride: int,
    batch_size: int,
    warm_up: bool = True,
) -> dict[str, Any]:
    """predict_raster on a raster `factor` times larger than `memory_limit_mb` (uncompressed float32)."""
    side = int(math.sqrt(factor * memory_limit_mb * 1024 * 1024 / (4 * bands)))
    bundle = _first_band_bundle(bands)
    options: dict[str, Any] = {
        "window": window,
        "stride": stride,
        "memory_limit_mb": memory_limit_mb,
        "batch_size": batch_size,
        "model_memory_mb": 3 * batch_size * window * window * 4 * (bands + 1) / 2**20,  # input, output, conv buffers
        "progress": False,
    }
    if warm_up:
        small = write_test_raster(out_dir / "warm_up.tif", max(2 * window, 256), bands)
        predict_raster(bundle, small, out_dir / "warm_up_output", **options)
    raster = write_test_raster(out_dir / "large_input.tif", side, bands)
    raster_mb = bands * side * side * 4 / (1024 * 1024)  # the array; the tiled file pads to whole tiles
    result = predict_raster(bundle, raster, out_dir / "large_output", **options)
    return {
        "raster_shape": [bands, side, side],
        "raster_mb": raster_mb,
        "raster_file_mb": raster.stat().st_size / (1024 * 1024),
        "memory_limit_mb": memory_limit_mb,
        "raster_to_limit": raster_mb / memory_limit_mb,
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "seconds": result.seconds,
        "megapixels_per_s": side * side / 1e6 / result.seconds,
        "n_blocks": result.n_blocks,
        "block_size": result.block_size,
        "n_polygons": result.n_polygons,
        "peak_rss_mb": result.peak_rss_mb,
        "peak_increase_mb": result.peak_increase_mb,
        "within_limit": result.peak_increase_mb <= memory_limit_mb,
        "process_max_rss_mb": _max_rss_mb(),
    }


def summarise(results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The three headline numbers: overhead ratio, sweep throughput, peak memory against the limit."""
    overhead, sweep, raster = results["sliding_window"], results["threshold_sweep"], results["large_raster"]
    return {
        "overhead_ratio": overhead["overhead_ratio"],
        "overhead_meets_goal": overhead["meets_goal"],
        "sweep_pixels_per_s": sweep.get("pixels_per_s"),
        "raster_to_limit": raster["raster_to_limit"],
        "peak_increase_mb": raster["peak_increase_mb"],
        "memory_limit_mb": raster["memory_limit_mb"],
        "within_limit": raster["within_limit"],
        "total_seconds": seconds,
    }


def bench_infer(
    out_dir: Path,
    quick: bool = False,
    image_size: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    repeats: int | None = None,
    sweep_pixels: int | None = None,
    memory_limit_mb: float | None = None,
    raster_factor: float = 4.0,
    raster_bands: int | None = None,
    raster_window: int | None = None,
    raster_batch_size: int = 32,
) -> dict[str, Any]:
    """Run the three inference measurements; `quick` uses tiny sizes (a smoke run, not a measurement).

    The full run: a 448-pixel image (3 x 3 windows of 224 pixels) for the overhead, 10^8 pixels for
    the sweep, and a 15-band float32 raster (S2 + S1 + DEM) four times a 100 MiB limit with 64-pixel windows.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    window = window or (64 if quick else 224)
    stride = stride or window // 2
    raster_window = raster_window or min(window, 64)
    results = {
        "sliding_window": bench_overhead(
            image_size or (96 if quick else 448), window, stride, batch_size, repeats=repeats or (1 if quick else 3)
        ),
        "threshold_sweep": bench_threshold_sweep(sweep_pixels or (10**5 if quick else 10**8)),
        "large_raster": bench_large_raster(
            out_dir,
            memory_limit_mb or (8.0 if quick else 100.0),
            raster_factor,
            raster_bands or (4 if quick else 15),
            raster_window,
            raster_window // 2,
            raster_batch_size,
            warm_up=not quick,
        ),
    }
    results["summary"] = summarise(results, time.perf_counter() - started)
    return results

"""Benchmark: sliding-window overhead, threshold-sweep throughput and real larger-than-memory raster inference.

(a) The same smp U-Net (resnet18, 15 bands, random weights) runs over the same windows with the same
    batch size: as bare batched forwards over pre-cut windows, and through `sliding_window_logits`
    (cutting, Gaussian blending), paired with `workbench.bench.pairing`. Goal: overhead ratio <= 1.15.
(b) The threshold-sweep throughput of `workbench.evaluate.metrics.bench_sweep`.
(c) The demo model (smp Unet resnet18 as in params/demo.yaml: a trained demo bundle when one is
    given, else the same architecture with random weights, which costs the same to run) predicts a
    generated 15-band float32 GeoTIFF in a child process whose address space is limited with
    ``setrlimit(RLIMIT_AS)`` to what it had mapped after start-up (Python, torch, the model, one
    warm-up prediction) plus a memory budget; the raster is several times that budget. Reported:
    the child's peak resident memory (its ``ru_maxrss`` and a 10 ms sampler), the increase over its
    start-up level, megapixels per second, and the throughput of `predict_raster` against the bare
    batched forward of the same model over the same windows (paired, on a smaller raster, in the same
    limited child).

The full run takes a few minutes on a two-core CPU; `quick` is a smoke run of a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.transform import from_origin
from torch import nn

from workbench.arrays import window_starts
from workbench.bench.pairing import paired_ratio, ratio_text
from workbench.infer import predict_raster, sliding_window_logits
from workbench.io import write_json_atomic
from workbench.models.bundle import ModelBundle

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
    image_size: int, window: int, stride: int, batch_size: int, in_channels: int = 15, pairs: int = 6, seed: int = 0
) -> dict[str, Any]:
    """Paired seconds of the sliding window against bare batched forwards over the same windows."""
    torch.manual_seed(seed)
    model = unet15(in_channels)
    image = torch.randn(in_channels, image_size, image_size)
    windows = _cut_windows(image, window, stride)

    def sliding() -> None:
        sliding_window_logits(model, image, window, stride, batch_size=batch_size, progress=False)

    def bare() -> None:
        _bare_forward_seconds(model, windows, batch_size)

    paired = paired_ratio(sliding, bare, pairs, names=("sliding_window", "bare_forward"))
    ratio = paired["ratio"]
    return {
        **paired,
        "model": f"smp Unet resnet18, {in_channels} bands, random weights",
        "image_size": image_size,
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "n_windows": len(windows),
        "overhead_ratio": ratio,
        "goal_ratio": OVERHEAD_GOAL,
        "meets_goal": None if ratio is None else ratio <= OVERHEAD_GOAL,
        "summary": ratio_text(paired, "sliding window / bare forward"),
    }


def bench_threshold_sweep(n_pixels: int) -> dict[str, Any]:
    """Histogram-sweep throughput, or a note when the metrics module does not provide it."""
    try:
        from workbench.evaluate.metrics import bench_sweep
    except ImportError as exc:
        return {"skipped": f"workbench.evaluate.metrics.bench_sweep is not available ({exc})"}
    return dict(bench_sweep(n_pixels=n_pixels))


def write_test_raster(path: Path, side: int, bands: int | Sequence[str], block_rows: int = 256, seed: int = 0) -> Path:
    """A float32 GeoTIFF (UTM, 10 m) written row block by row block: noisy background, square lakes every 500 px.

    `bands` is a band count (descriptions band0, band1, ...) or the band names to write as descriptions.
    """
    names = [f"band{i}" for i in range(bands)] if isinstance(bands, int) else list(bands)
    bands = len(names)
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
        dst.descriptions = tuple(names)
        for row0 in range(0, side, block_rows):
            rows = np.arange(row0, min(side, row0 + block_rows))
            block = rng.normal(0.0, 0.5, (bands, len(rows), side)).astype(np.float32)
            lakes = ((rows[:, None] % 500) < 40) & ((columns[None, :] % 500) < 40)
            block[0] += np.where(lakes, 4.0, -4.0).astype(np.float32)
            dst.write(block, window=rasterio.windows.Window(0, row0, side, len(rows)))
    return path


# --------------------------------------------------------------------------- (c) larger than memory


def demo_bundle(model_dir: Path | None = None) -> tuple[ModelBundle, str]:
    """The demo's trained bundle from `model_dir`, else the demo architecture with random weights; and which."""
    if model_dir is not None:
        from workbench.models.bundle import load_bundle

        return load_bundle(model_dir), f"trained demo bundle {model_dir}"
    from workbench.bench.data import demo_params_file
    from workbench.data.normalize import NormalizationStats
    from workbench.data.synthetic import synthetic_bands
    from workbench.models.factory import build_model
    from workbench.params import load_params

    params = load_params(demo_params_file())
    bands = synthetic_bands()
    names = [band.name for band in bands]
    torch.manual_seed(0)
    model = build_model(params.model, len(bands), names, [band.modality for band in bands]).eval()
    stats = NormalizationStats(names, "zscore", mean=[0.0] * len(names), std=[1.0] * len(names))
    what = (
        f"demo architecture (smp {params.model.architecture} {params.model.encoder}, params/demo.yaml) with random "
        "weights: no trained demo bundle was given; a forward costs the same with trained weights"
    )
    return ModelBundle(model, params.model, names, [band.modality for band in bands], stats), what


def find_demo_model(reports: Path) -> Path | None:
    """The newest `<reports>/<run>/model` bundle trained with the demo parameters (experiment 'demo'), if any."""
    found = []
    for info in Path(reports).glob("*/model/run_info.json"):
        try:
            if json.loads(info.read_text()).get("experiment") == "demo":
                found.append(info.parent)
        except (OSError, ValueError):
            continue
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def _address_space_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().vms) / 2**20


def _max_rss_mb() -> float:
    """Lifetime peak RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_limited_child(config_file: str, out_file: str) -> None:
    """Child process: warm up, limit the address space, predict the large raster, pair predict vs bare forward."""
    config = json.loads(Path(config_file).read_text())
    torch.set_num_threads(int(config["threads"]))
    bundle, what = demo_bundle(Path(config["model_dir"]) if config["model_dir"] else None)
    out = Path(config["out_dir"])
    window, stride, batch = int(config["window"]), int(config["stride"]), int(config["batch_size"])
    options: dict[str, Any] = {
        "window": window,
        "stride": stride,
        "batch_size": batch,
        "memory_limit_mb": float(config["predict_memory_mb"]),
        "progress": False,
    }
    small = Path(config["small_raster"])
    predict_raster(bundle, small, out / "warm_up", **options)  # threads, allocator pools, GDAL drivers
    threading.stack_size(1024 * 1024)  # the samplers' threads reserve 1 MiB of address space, not 8
    start_rss = _max_rss_mb()
    start_vms = _address_space_mb()
    limit_mb = start_vms + float(config["budget_mb"])
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_mb * 2**20), resource.getrlimit(resource.RLIMIT_AS)[1]))
    result: dict[str, Any] = {"model": what, "start_address_space_mb": start_vms, "address_space_limit_mb": limit_mb}
    try:
        large = predict_raster(bundle, Path(config["large_raster"]), out / "large", **options)
        result |= {
            "seconds": large.seconds,
            "n_blocks": large.n_blocks,
            "block_size": large.block_size,
            "n_polygons": large.n_polygons,
            "sampled_peak_rss_mb": large.peak_rss_mb,
            "sampled_peak_increase_mb": large.peak_increase_mb,
        }
        image = _read_all(small)
        windows = _cut_windows(bundle.normalization.apply(image), window, stride)

        def predict() -> None:
            predict_raster(bundle, small, out / "paired", **options)

        def bare() -> None:
            _bare_forward_seconds(bundle.model, windows, batch)

        result["predict_vs_bare"] = paired_ratio(predict, bare, int(config["pairs"]), names=("predict_raster", "bare"))
        result["small_raster_megapixels"] = image.shape[1] * image.shape[2] / 1e6
    except MemoryError as exc:
        result["error"] = f"MemoryError under the address-space limit: {exc}"
    except Exception as exc:  # a thread or library allocation refused under the limit: report, do not lose the run
        result["error"] = f"{type(exc).__name__} under the address-space limit: {exc}"
    result["lifetime_max_rss_mb_before_limit"] = start_rss
    result["lifetime_max_rss_mb"] = _max_rss_mb()
    result["address_space_at_end_mb"] = _address_space_mb()
    write_json_atomic(Path(out_file), result)


def _read_all(path: Path) -> torch.Tensor:
    import rasterio

    with rasterio.open(path) as src:
        return torch.from_numpy(src.read().astype(np.float32))


def bench_large_raster(
    out_dir: Path,
    budget_mb: float,
    factor: float,
    window: int,
    stride: int,
    batch_size: int,
    model_dir: Path | None = None,
    small_side: int = 512,
    pairs: int = 5,
    threads: int = 1,
) -> dict[str, Any]:
    """The demo model on a 15-band raster `factor` times `budget_mb`, in a child limited to start-up + budget."""
    from workbench.data.synthetic import synthetic_bands

    names = [band.name for band in synthetic_bands()]
    side = int(math.sqrt(factor * budget_mb * 2**20 / (4 * len(names))))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    large = write_test_raster(out_dir / "large_input.tif", side, names)
    small = write_test_raster(out_dir / "small_input.tif", small_side, names, seed=1)
    raster_mb = len(names) * side * side * 4 / 2**20
    config = {
        "threads": threads,
        "model_dir": str(model_dir) if model_dir else None,
        "out_dir": str(out_dir),
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "predict_memory_mb": 0.85 * budget_mb,  # predict_raster's own block sizing, inside the enforced budget
        "budget_mb": budget_mb,
        "large_raster": str(large),
        "small_raster": str(small),
        "pairs": pairs,
    }
    result_file = out_dir / "child.json"
    config_file = write_json_atomic(out_dir / "child_config.json", config)
    # few malloc arenas (each thread's arena reserves address space) and a small GDAL cache in the child
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "GDAL_CACHEMAX": "32"}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    # one malloc arena: each new thread's arena would otherwise reserve 64 MiB of address space at random
    # moments and break the address-space budget without using the memory
    env["MALLOC_ARENA_MAX"] = "1"
    code = (
        "import sys; from workbench.bench.infer import run_limited_child; run_limited_child(sys.argv[1], sys.argv[2])"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(config_file), str(result_file)], env=env, capture_output=True, text=True
    )
    if not result_file.is_file():
        return {
            "error": f"the limited child process exited with code {child.returncode} without a result",
            "stderr_tail": child.stderr[-2000:],
        }
    child_result = json.loads(result_file.read_text())
    result: dict[str, Any] = {
        "raster_shape": [len(names), side, side],
        "raster_mb": raster_mb,
        "raster_file_mb": large.stat().st_size / 2**20,
        "budget_mb": budget_mb,
        "raster_to_budget": raster_mb / budget_mb,
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "threads": threads,
        "child_exit_code": child.returncode,
        **child_result,
    }
    if "seconds" in child_result:
        result["megapixels_per_s"] = side * side / 1e6 / child_result["seconds"]
        result["peak_rss_mb"] = child_result["sampled_peak_rss_mb"]
        result["peak_increase_mb"] = child_result["sampled_peak_increase_mb"]
        result["within_budget"] = result["peak_increase_mb"] <= budget_mb
        result["raster_to_peak_increase"] = raster_mb / max(result["peak_increase_mb"], 1e-9)
        paired = child_result.get("predict_vs_bare")
        if paired is None:  # the large raster finished, the paired comparison did not (see "error")
            return result
        if paired["ratio"] is not None:
            pixels = child_result["small_raster_megapixels"]
            result["bare_megapixels_per_s"] = pixels / paired["bare_median_seconds"]
        result["predict_vs_bare_summary"] = ratio_text(paired, "predict_raster / bare forward")
    return result


def summarise(results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The headline numbers: overhead ratio, sweep throughput, peak memory against the budget and the raster."""
    overhead, sweep, raster = results["sliding_window"], results["threshold_sweep"], results["large_raster"]
    return {
        "overhead_ratio": overhead["overhead_ratio"],
        "overhead_refused": overhead["refused"],
        "overhead_meets_goal": overhead["meets_goal"],
        "sweep_pixels_per_s": sweep.get("pixels_per_s"),
        "raster_to_budget": raster.get("raster_to_budget"),
        "peak_increase_mb": raster.get("peak_increase_mb"),
        "peak_rss_mb": raster.get("peak_rss_mb"),
        "budget_mb": raster.get("budget_mb"),
        "within_budget": raster.get("within_budget"),
        "megapixels_per_s": raster.get("megapixels_per_s"),
        "predict_vs_bare": raster.get("predict_vs_bare", {}).get("ratio"),
        "total_seconds": seconds,
    }


def bench_infer(out_dir: Path, quick: bool = False, model_dir: Path | None = None) -> dict[str, Any]:
    """Run the three inference measurements; `quick` uses tiny sizes (a smoke run, not a measurement).

    Full: a 320-pixel image (windows of 128, stride 64) for the overhead, 10^8 pixels for the sweep,
    and a 15-band float32 raster three times a 128 MiB budget, predicted with 128-pixel windows.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "sliding_window": bench_overhead(
            64 if quick else 320, 32 if quick else 128, 16 if quick else 64, 4, pairs=2 if quick else 6
        ),
        "threshold_sweep": bench_threshold_sweep(10**5 if quick else 10**8),
    }
    if quick:
        results["large_raster"] = bench_large_raster(
            out_dir,
            budget_mb=96,
            factor=0.125,
            window=64,
            stride=48,
            batch_size=2,
            model_dir=model_dir,
            small_side=64,
            pairs=2,
        )
    else:
        results["large_raster"] = bench_large_raster(
            out_dir, budget_mb=128, factor=3.0, window=128, stride=96, batch_size=4, model_dir=model_dir
        )
    results["summary"] = summarise(results, time.perf_counter() - started)
    return results

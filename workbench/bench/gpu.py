"""GPU check: TerraMind-base training and tiled inference speed and peak memory at bf16 on one CUDA device.

`python -m workbench.bench.gpu` (or ``tools/gpu_check.sh``) builds the ImpactMesh-Flood recipe's model
through the model factory with random weights (the speed and memory of a step do not depend on the values of
the weights, and the check must run without downloads), trains it for a few steps on random tensors of the
recipe's input shape under ``torch.autocast(bfloat16)``, runs the workbench's sliding-window inference over a
random raster, optionally repeats both in fp32, and writes the timings to ``reports/bench/gpu-<time>.json``.
Timings start after warm-up steps and are fenced with ``torch.cuda.synchronize``; peak memory is
``torch.cuda.max_memory_allocated``. The reference point is the published ImpactMesh-Flood reproduction
(huggingface.co/msradam/TerraMind-base-Flood-AMD-reproduction): 4.69 training it/s and 7.30 tiled-inference
it/s on one MI300X, batch 16, fp16-mixed.

On a machine without CUDA it prints why and exits with :data:`EXIT_NO_CUDA`. CI does not run it.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.io import write_json_atomic

EXIT_NO_CUDA = 2
RECIPE = Path(__file__).resolve().parents[2] / "params" / "impactmesh_flood.yaml"
REFERENCE = {
    "source": "huggingface.co/msradam/TerraMind-base-Flood-AMD-reproduction (model card)",
    "hardware": "1x AMD Instinct MI300X",
    "precision": "fp16-mixed",
    "batch_size": 16,
    "train_it_per_s": 4.69,
    "infer_it_per_s": 7.30,
}
NO_CUDA_MESSAGE = (
    "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False), so nothing was measured. "
    "Run it on a machine with an NVIDIA GPU and a CUDA build of torch; `workbench bench` measures the CPU paths."
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA allocations on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def measure_training(
    model: nn.Module,
    in_channels: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None,
    batch_size: int,
    size: int,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """Optimiser steps per second (AdamW, cross-entropy or BCE) on random batches after `warmup` untimed steps."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, in_channels, size, size, generator=generator).to(device)
    y = torch.randint(0, max(num_classes, 2), (batch_size, size, size), generator=generator).to(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            logits = model(x).float()
            if num_classes == 1:  # one logit per pixel: binary cross-entropy
                loss = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float())
            else:
                loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    return {
        "batch_size": batch_size,
        "input_shape": [batch_size, in_channels, size, size],
        "steps": steps,
        "warmup_steps": warmup,
        "seconds": seconds,
        "it_per_s": steps / seconds,
        "samples_per_s": steps * batch_size / seconds,
        "peak_memory_mb": _peak_mb(device),
        "last_loss": loss,
    }


def measure_inference(
    model: nn.Module,
    in_channels: int,
    device: torch.device,
    dtype: torch.dtype | None,
    raster: int,
    window: int,
    stride: int,
    batch_size: int,
) -> dict[str, Any]:
    """Batches of windows per second of the workbench's sliding-window inference over a random raster."""
    from workbench.arrays import window_starts
    from workbench.infer import sliding_window_logits

    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(1)
    image = torch.randn(in_channels, raster, raster, generator=generator)
    warm = torch.randn(in_channels, window, window, generator=generator)
    with _autocast(device, dtype):
        sliding_window_logits(model, warm, window, stride, batch_size, device=device, progress=False)
        _sync(device)
        _reset_peak(device)
        start = time.perf_counter()
        logits = sliding_window_logits(model, image, window, stride, batch_size, device=device, progress=False)
        _sync(device)
    seconds = time.perf_counter() - start
    windows = len(window_starts(raster, window, stride)) ** 2
    batches = math.ceil(windows / batch_size)
    return {
        "raster_shape": [in_channels, raster, raster],
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "windows": windows,
        "batches": batches,
        "seconds": seconds,
        "it_per_s": batches / seconds,
        "windows_per_s": windows / seconds,
        "megapixels_per_s": raster * raster / 1e6 / seconds,
        "peak_memory_mb": _peak_mb(device),
        "finite_fraction": float(torch.isfinite(torch.from_numpy(logits)).float().mean()),
    }


def measure(
    model: nn.Module,
    in_channels: int,
    num_classes: int,
    device: str | torch.device = "cuda",
    precisions: Sequence[str] = ("bf16", "fp32"),
    batch_size: int = 16,
    size: int = 256,
    steps: int = 20,
    warmup: int = 5,
    raster: int = 1536,
    window: int | None = None,
    stride: int | None = None,
) -> dict[str, Any]:
    """Training and tiled-inference timings of `model` for each precision ('bf16', 'fp32'), plus the speed-up."""
    device = torch.device(device)
    model.to(device)
    window = window or size
    stride = stride or window // 2
    results: dict[str, Any] = {}
    for precision in precisions:
        dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
        results[precision] = {
            "train": measure_training(model, in_channels, num_classes, device, dtype, batch_size, size, steps, warmup),
            "infer": measure_inference(model, in_channels, device, dtype, raster, window, stride, batch_size),
        }
    if "bf16" in results and "fp32" in results:
        results["bf16_speedup"] = {
            part: results["bf16"][part]["it_per_s"] / results["fp32"][part]["it_per_s"] for part in ("train", "infer")
        }
    return results


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the check: device name, torch and CUDA versions, host."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            device_memory_mb=props.total_memory / 2**20,
            cuda=torch.version.cuda,
            hip=getattr(torch.version, "hip", None),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info.update(device=platform.processor() or "cpu", threads=torch.get_num_threads())
    return info


def write_report(result: dict[str, Any], reports: Path) -> Path:
    """Write `result` atomically to `reports`/bench/gpu-<UTC time>.json; the path."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return write_json_atomic(Path(reports) / "bench" / f"gpu-{stamp}.json", result)


def build_recipe_model(params_file: Path, overrides: Sequence[str] = ()) -> tuple[nn.Module, int, int, dict[str, Any]]:
    """(model, in_channels, num_classes, recipe description) of a TerraMind recipe, with random weights."""
    from workbench.models.factory import build_model, describe_model
    from workbench.models.terramind import MODALITY_BANDS, normalise_modality
    from workbench.params import load_params

    params = load_params(params_file, list(overrides))
    model_params = params.model
    if model_params.architecture.lower() != "terramind":
        raise ValueError(f"{params_file} uses model.architecture={model_params.architecture!r}, not terramind")
    config = model_params.terramind
    model_params = model_params.model_copy(
        update={"terramind": config.model_copy(update={"checkpoint": None})}
    )  # random weights: speed and memory only
    per_step = sum(len(MODALITY_BANDS[normalise_modality(m)]) for m in config.modalities)
    in_channels = per_step * config.timesteps
    model = build_model(model_params, in_channels)
    recipe = {
        "params": str(params_file),
        "architecture": "terramind",
        "size": config.size,
        "modalities": list(config.modalities),
        "timesteps": config.timesteps,
        "temporal_pooling": config.temporal_pooling,
        "decoder": config.decoder,
        "decoder_channels": config.decoder_channels,
        "in_channels": in_channels,
        "num_classes": model_params.num_classes,
        "batch_size": params.data.batch_size,
        "weights": "random (pretrained=False, no checkpoint): timings and memory only, no accuracy",
        "parameters": describe_model(model),
    }
    return model, in_channels, model_params.num_classes, recipe


def main(argv: list[str] | None = None) -> int:
    """Command line of the GPU check; exit code EXIT_NO_CUDA on a machine without CUDA."""
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=RECIPE, help="TerraMind recipe (default: ImpactMesh-Flood)")
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="results go to REPORTS/bench/")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's data.batch_size")
    parser.add_argument("--size", type=int, default=256, help="chip size in pixels (also the inference window)")
    parser.add_argument("--raster", type=int, default=1536, help="side of the random raster for tiled inference")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 comparison")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return EXIT_NO_CUDA
    device = torch.device("cuda")
    model, in_channels, num_classes, recipe = build_recipe_model(args.params, args.set)
    batch_size = args.batch_size or int(recipe["batch_size"])
    precisions = ("bf16",) if args.no_fp32 else ("bf16", "fp32")
    total = recipe["parameters"]["total_parameters"]
    print(
        f"gpu_check: TerraMind-{recipe['size']} ({total / 1e6:.0f} M parameters, random weights) on "
        f"{torch.cuda.get_device_name(device)}, batch {batch_size}, {recipe['timesteps']} time step(s)"
    )
    results = measure(
        model,
        in_channels,
        num_classes,
        device,
        precisions,
        batch_size=batch_size,
        size=args.size,
        steps=args.steps,
        warmup=args.warmup,
        raster=args.raster,
    )
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(device),
        "recipe": recipe,
        "results": results,
        "reference": REFERENCE,
    }
    path = write_report(report, args.reports)
    for precision in precisions:
        train, infer = results[precision]["train"], results[precision]["infer"]
        print(
            f"{precision}: train {train['it_per_s']:.2f} it/s (peak {train['peak_memory_mb']:.0f} MiB), "
            f"tiled inference {infer['it_per_s']:.2f} it/s (peak {infer['peak_memory_mb']:.0f} MiB)"
        )
    print(
        f"reference (MI300X, fp16-mixed): train {REFERENCE['train_it_per_s']} it/s, "
        f"inference {REFERENCE['infer_it_per_s']} it/s"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-loop overhead: the workbench's Lightning task against a bare PyTorch loop.

Both loops train the demo's smp U-Net on the same chips, with the same batch size, loss terms,
AdamW parameter groups, learning-rate schedule and gradient clipping. The workbench loop is the real
one: `SegmentationTask` under the Trainer, callbacks and loggers that `workbench.train.fit` builds
(CSV log every step, learning-rate monitor, checkpoint callback, per-step metric counts). A step is
the wall time between the starts of consecutive steps, so data fetching, logging and callbacks count
on both sides. Runs alternate (bare, workbench, bare, workbench, ...) to spread drift on a shared
machine; the ratio of the median step times is the workbench's overhead (goal <= 1.10).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from workbench.bench.data import demo_params_file, random_store
from workbench.data.dataset import ChipDataset, loss_mask
from workbench.data.store import BandSpec
from workbench.params import Params

OVERHEAD_GOAL = 1.10


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample the process's resident memory every 10 ms; fills `peak_rss_mb` and `start_rss_mb` (MiB)."""
    process = psutil.Process()
    start = process.memory_info().rss / 2**20
    result = {"start_rss_mb": start, "peak_rss_mb": start}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_rss_mb"] = max(result["peak_rss_mb"], process.memory_info().rss / 2**20)
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def bench_params(steps: int, batch_size: int, progress_bar: bool) -> Params:
    """The demo's parameters for a CPU run of `steps` steps in one epoch."""
    from workbench.params import load_params

    return load_params(
        demo_params_file(),
        [
            f"data.batch_size={batch_size}",
            f"train.max_steps={steps}",
            "train.max_epochs=1",
            "train.accelerator=cpu",
            f"train.progress_bar={str(progress_bar).lower()}",
        ],
    )


def _loader(store: Path, params: Params, n_chips: int, seed: int) -> torch.utils.data.DataLoader[Any]:
    dataset = ChipDataset(store, np.arange(n_chips))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=params.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=params.data.num_workers,
        generator=generator,
    )


def _task(params: Params, bands: int, steps_per_epoch: int) -> Any:
    from workbench.train.task import SegmentationTask

    return SegmentationTask(
        model_params=params.model.model_dump(mode="json"),
        train_params=params.train.model_dump(mode="json"),
        in_channels=bands,
        band_names=[f"b{i}" for i in range(bands)],
        modalities=["S2L2A"] * bands,
        steps_per_epoch=steps_per_epoch,
    )


def bare_loop_step_times(store: Path, params: Params, n_chips: int, bands: int, steps: int) -> list[float]:
    """Step times of a plain PyTorch loop: same model, loss terms, optimiser groups, schedule and clipping."""
    from workbench.models.factory import build_model
    from workbench.train.losses import build_loss
    from workbench.train.optim import build_param_groups, build_scheduler

    torch.manual_seed(0)
    model = build_model(params.model, bands).train()
    criterion = build_loss(params.train.loss)
    cfg = params.train.optimizer
    optimizer = torch.optim.AdamW(
        build_param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps, max_epochs=1)["scheduler"]
    clip = params.train.grad_clip
    times: list[float] = []
    last = time.perf_counter()
    for batch in _loader(store, params, n_chips, seed=0):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = criterion(model(batch["image"]).float(), batch["target"].float(), loss_mask(batch))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if len(times) >= steps:
            break
    return times


def _step_timer(stamps: list[float]) -> Any:
    """Lightning callback stamping the start of every training step and the end of training."""
    import lightning as L

    class StepTimer(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            stamps.append(time.perf_counter())

        def on_train_end(self, *args: Any) -> None:
            stamps.append(time.perf_counter())

    return StepTimer()


def workbench_step_times(
    store: Path, params: Params, n_chips: int, bands: int, steps: int, run_dir: Path
) -> list[float]:
    """Step times of SegmentationTask under the Trainer, callbacks and loggers of `workbench.train.fit`."""
    from workbench.train.fit import build_callbacks, build_loggers, build_trainer

    torch.manual_seed(0)
    task = _task(params, bands, steps_per_epoch=steps)
    stamps: list[float] = []
    callbacks = [*build_callbacks(params, run_dir, task), _step_timer(stamps)]
    trainer = build_trainer(params, run_dir, callbacks, build_loggers(params, run_dir))
    trainer.fit(task, train_dataloaders=_loader(store, params, n_chips, seed=0))
    return np.diff(stamps).tolist()


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up banners and data-loader hints while benchmarking."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def bench_train(
    n_chips: int | None = None,
    bands: int = 15,
    size: int = 64,
    batch_size: int = 16,
    steps: int = 12,
    warmup: int = 3,
    repeats: int = 2,
    progress_bar: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Median step time of both loops over `repeats` alternating runs each, their ratio and peak memory.

    Defaults follow the demo (64 px chips, 15 bands, batch 16, its model, loss and optimiser); one epoch
    covers all steps so no run pays an epoch boundary. `threads` sets torch's thread count for both loops.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    total = steps + warmup
    n_chips = n_chips or batch_size * total
    params = bench_params(total, batch_size, progress_bar)
    bench_bands = [BandSpec(f"b{i}", "S2L2A", True) for i in range(bands)]
    result: dict[str, Any] = {
        "model": f"smp {params.model.architecture} {params.model.encoder} (demo parameters)",
        "loss": [term.name for term in params.train.loss],
        "batch": [batch_size, bands, size, size],
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "progress_bar": progress_bar,
    }
    samples: dict[str, list[float]] = {"bare": [], "workbench": []}
    memory: dict[str, list[float]] = {"bare": [], "workbench": []}
    try:
        with tempfile.TemporaryDirectory() as tmp, _quiet_lightning():
            store = random_store(Path(tmp) / "store", n_chips, size, bench_bands)
            for repeat in range(repeats):
                for name in ("bare", "workbench"):
                    with peak_rss() as rss:
                        if name == "bare":
                            times = bare_loop_step_times(store, params, n_chips, bands, total)
                        else:
                            run_dir = Path(tmp) / f"run{repeat}"
                            times = workbench_step_times(store, params, n_chips, bands, total, run_dir)
                    samples[name] += times[warmup:]
                    memory[name].append(rss["peak_rss_mb"] - rss["start_rss_mb"])
                    result[f"{name}_peak_rss_mb"] = max(result.get(f"{name}_peak_rss_mb", 0.0), rss["peak_rss_mb"])
    finally:
        torch.set_num_threads(before)
    for name in ("bare", "workbench"):
        result[f"{name}_step_seconds"] = statistics.median(samples[name])
        result[f"{name}_step_seconds_all"] = samples[name]
        result[f"{name}_peak_rss_increase_mb"] = max(memory[name])
    result["ratio_workbench_over_bare"] = result["workbench_step_seconds"] / result["bare_step_seconds"]
    result["goal_ratio_max"] = OVERHEAD_GOAL
    result["note"] = (
        "step = wall time between the starts of consecutive training steps (data fetch, forward, backward, "
        "clipping, optimiser and scheduler step, and for the workbench its per-step logging, metric counts and "
        "callbacks); medians over all post-warm-up steps of the alternating runs. Peak RSS is the process's "
        "resident memory (sampled every 10 ms); the increase is over the level at the start of each run."
    )
    return result

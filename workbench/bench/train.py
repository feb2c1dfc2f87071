"""Training-loop overhead: the workbench's Lightning task against a bare PyTorch loop.

Both loops train the same smp Unet on the same chips with the same batch size, loss and
optimiser; the ratio of median step times is the workbench's overhead (goal <= 1.10).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from workbench.data.dataset import ChipDataset, loss_mask
from workbench.data.store import BandSpec, Chip, StoreWriter
from workbench.params import LossTerm, ModelParams, TrainParams


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample the process's resident memory every 10 ms; yields a dict filled with the peak in MiB."""
    process = psutil.Process()
    result = {"peak_rss_mb": process.memory_info().rss / 2**20}
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


def random_store(dest: Path, n_chips: int, bands: int, size: int, seed: int = 0) -> Path:
    """A store of random chips with blob-like labels (timing does not depend on content)."""
    rng = np.random.default_rng(seed)
    specs = [BandSpec(f"b{i}", "S2L2A", True) for i in range(bands)]
    with StoreWriter(dest, specs, source="bench") as writer:
        for i in range(n_chips):
            image = rng.normal(size=(bands, size, size)).astype(np.float32)
            label = (image[0] > 0.5).astype(np.uint8)
            writer.append(Chip(f"c{i}", image, label, np.ones((size, size), bool), lat=0.0, lon=0.0))
    return dest


def _model(bands: int) -> torch.nn.Module:
    from workbench.models.factory import build_model

    return build_model(ModelParams(architecture="Unet", encoder="resnet18"), bands)


def _loader(store: Path, n_chips: int, batch_size: int) -> torch.utils.data.DataLoader[Any]:
    dataset = ChipDataset(store, np.arange(n_chips))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)


def bare_loop_step_times(store: Path, n_chips: int, bands: int, batch_size: int, steps: int) -> list[float]:
    """Step times of a plain PyTorch loop with the same loss terms as the workbench run."""
    from workbench.train.losses import build_loss

    torch.manual_seed(0)
    model = _model(bands).train()
    criterion = build_loss([LossTerm(name="bce"), LossTerm(name="dice")])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times: list[float] = []
    while len(times) < steps:
        for batch in _loader(store, n_chips, batch_size):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = criterion(model(batch["image"]), batch["target"], loss_mask(batch))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            times.append(time.perf_counter() - start)
            if len(times) >= steps:
                break
    return times


class _StepTimer:
    """Lightning callback recording the wall time from batch start to batch end."""

    def __init__(self) -> None:
        import lightning as L

        outer = self

        class Timer(L.Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                outer._start = time.perf_counter()

            def on_train_batch_end(self, *args: Any) -> None:
                outer.times.append(time.perf_counter() - outer._start)

        self.times: list[float] = []
        self._start = 0.0
        self.callback = Timer()


def workbench_step_times(store: Path, n_chips: int, bands: int, batch_size: int, steps: int) -> list[float]:
    """Step times of the workbench's SegmentationTask under a Lightning Trainer (no logging or checkpoints)."""
    import lightning as L

    from workbench.train.task import SegmentationTask

    torch.manual_seed(0)
    train = TrainParams(max_epochs=1000, max_steps=steps, grad_clip=1.0)
    train.optimizer.scheduler = "constant"
    task = SegmentationTask(
        model_params=ModelParams(architecture="Unet", encoder="resnet18").model_dump(mode="json"),
        train_params=train.model_dump(mode="json"),
        in_channels=bands,
        band_names=[f"b{i}" for i in range(bands)],
        modalities=["S2L2A"] * bands,
        steps_per_epoch=max(1, n_chips // batch_size),
    )
    timer = _StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[timer.callback],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(task, train_dataloaders=_loader(store, n_chips, batch_size))
    return timer.times


def _median_after_warmup(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:] if len(times) > warmup else times)


def bench_train(
    n_chips: int = 64, bands: int = 15, size: int = 128, batch_size: int = 8, steps: int = 20, warmup: int = 3
) -> dict[str, Any]:
    """Median step time of both loops, measured in one process one after the other, and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        store = random_store(Path(tmp) / "store", n_chips, bands, size)
        runs: dict[str, Callable[..., list[float]]] = {
            "bare": bare_loop_step_times,
            "workbench": workbench_step_times,
        }
        result: dict[str, Any] = {
            "model": "smp Unet resnet18",
            "batch": [batch_size, bands, size, size],
            "steps": steps,
            "threads": torch.get_num_threads(),
        }
        for name, run in runs.items():
            with peak_rss() as memory:
                times = run(store, n_chips, bands, batch_size, steps + warmup)
            result[f"{name}_step_seconds"] = _median_after_warmup(times, warmup)
            result[f"{name}_peak_rss_mb"] = memory["peak_rss_mb"]
    result["ratio_workbench_over_bare"] = result["workbench_step_seconds"] / result["bare_step_seconds"]
    result["goal_ratio_max"] = 1.10
    return result

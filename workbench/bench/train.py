"""Whole-epoch training: the workbench's training epoch against a hand-written PyTorch loop doing the same work.

The workbench side is the real thing, built by the functions `workbench.train.fit.train_model` uses:
`build_datamodule` (chip-store loader with worker processes, the epoch sampler, normalisation,
per-chip and per-batch augmentation), `build_task` (`SegmentationTask`: composite loss, finite-loss
check, pixel counts, per-step logging, validation with IoU/F1 and the prevalence PR-AUCs),
`build_callbacks` (best and last checkpoints, learning-rate monitor, random-state keeping, EMA when
on), `build_loggers` (CSV) and `build_trainer` (Lightning, gradient clipping).

The bare side is a plain PyTorch loop written out here that does the same work with the same
loaders (the data module's train and val loaders): per batch the batch augmentation, forward,
loss, finite check, pixel counts, backward, gradient clipping, AdamW step on the same parameter
groups, the same per-step schedule and the EMA update; after the epoch the validation pass (with
the EMA weights swapped in) with the same metrics and histograms, a CSV log of every step, and the
best and last checkpoints (model, optimiser, scheduler and EMA state).

One run of each side builds a fresh model and trains `epochs_per_run` epochs; an epoch is timed
from its start (the loader's workers start in it) to the end of its checkpoints. The first epoch
of a run is warm-up when `epochs_per_run` > 1, so start-up (Trainer construction, model building)
is not counted on either side; it is reported separately for the workbench. Runs of the two sides
alternate in pairs (`workbench.bench.pairing`); the ratio workbench / bare has the goal <= 1.10.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.bench.data import demo_params_file, random_store
from workbench.bench.pairing import machine_load, paired_ratio, ratio_text
from workbench.data.prepare import PreparedData
from workbench.io import write_bytes_atomic, write_text_atomic
from workbench.params import Params

OVERHEAD_GOAL = 1.10


def bench_params(overrides: list[str], epochs: int, batch_size: int, num_workers: int) -> Params:
    """The demo's parameters for a CPU run of `epochs` epochs, with extra overrides (model, EMA)."""
    from workbench.params import load_params

    return load_params(
        demo_params_file(),
        [
            f"data.batch_size={batch_size}",
            f"data.num_workers={num_workers}",
            f"train.max_epochs={epochs}",
            "train.accelerator=cpu",
            "train.progress_bar=false",
            *overrides,
        ],
    )


def bench_data(root: Path, n_train: int, n_val: int, size: int) -> PreparedData:
    """A store of random chips with the demo's 15 bands (S2 L2A, S1, DEM), a train/val split and z-score stats."""
    from workbench.data.normalize import NormalizationStats
    from workbench.data.synthetic import synthetic_bands

    bands = synthetic_bands()
    store = random_store(root / "store", n_train + n_val, size, bands)
    from workbench.data.store import read_catalog

    catalog = read_catalog(store)
    catalog["split"] = ["train"] * n_train + ["val"] * n_val
    names = [band.name for band in bands]
    stats_path = root / "normalization_stats.json"
    NormalizationStats(names, "zscore", mean=[0.0] * len(names), std=[1.0] * len(names)).save(stats_path)
    catalog_path = root / "catalog.parquet"
    buffer = catalog.to_parquet(index=False)
    assert buffer is not None
    write_bytes_atomic(catalog_path, buffer)
    return PreparedData(store, catalog_path, stats_path, catalog, names)


# --------------------------------------------------------------------------- the workbench side


def _epoch_timer(stamps: list[float]) -> Any:
    """Lightning callback stamping the start of every training epoch and the end of training."""
    import lightning as L

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, *args: Any) -> None:
            stamps.append(time.perf_counter())

        def on_train_end(self, *args: Any) -> None:
            stamps.append(time.perf_counter())

    return EpochTimer()


def workbench_epochs(params: Params, prepared: PreparedData, run_dir: Path) -> dict[str, Any]:
    """Train with the workbench's data module, task, callbacks, loggers and Trainer; seconds per epoch."""
    from workbench.data.loading import build_datamodule
    from workbench.train.fit import build_callbacks, build_loggers, build_task, build_trainer, seed_everything

    started = time.perf_counter()
    seed_everything(params.seed)
    datamodule = build_datamodule(params, prepared)
    task = build_task(params, prepared, datamodule, run_dir)
    stamps: list[float] = []
    callbacks = [*build_callbacks(params, run_dir, task), _epoch_timer(stamps)]
    trainer = build_trainer(params, run_dir, callbacks, build_loggers(params, run_dir))
    trainer.fit(task, datamodule=datamodule)
    total = time.perf_counter() - started
    epochs = np.diff(stamps).tolist()
    return {"epoch_seconds": epochs, "run_seconds": total, "startup_seconds": total - sum(epochs)}


# --------------------------------------------------------------------------- the bare side


def _ranking_scores(pos: np.ndarray, neg: np.ndarray, threshold: float, prevalences: list[int]) -> dict[str, float]:
    """PR-AUC of the pooled validation pixels and at chip prevalences 1:r (what the task logs)."""
    from workbench.data.sampling import positive_chips
    from workbench.evaluate.metrics import PrevalenceEvaluator, ThresholdHistogram

    scores = {"pr_auc": ThresholdHistogram.from_counts(pos.sum(0), neg.sum(0)).pr_auc()}
    labelled = pos.sum(1) + neg.sum(1)
    fraction = np.divide(pos.sum(1), labelled, out=np.zeros(len(pos)), where=labelled > 0)
    is_positive = positive_chips(fraction, threshold)
    if is_positive.any() and not is_positive.all():
        ratios = list(dict.fromkeys([1, *prevalences]))
        table = PrevalenceEvaluator(pos, neg, is_positive).evaluate(ratios, threshold=0.5)
        for ratio, value in zip(ratios, table["pr_auc"], strict=True):
            scores[f"pr_auc_{ratio}"] = float(value)
    return scores


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint the way Lightning does (serialise to memory, then one plain write, no fsync).

    The bare side must pay the same I/O as the Trainer's checkpoint callbacks, not more; the file is a
    scratch file of the benchmark's temporary directory.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())


def bare_epochs(params: Params, prepared: PreparedData, run_dir: Path) -> dict[str, Any]:
    """The same epochs as a hand-written PyTorch loop over the data module's loaders; seconds per epoch."""
    from workbench.data.dataset import loss_mask
    from workbench.data.loading import build_datamodule
    from workbench.models.factory import build_model
    from workbench.train.ema import EMA
    from workbench.train.fit import seed_everything
    from workbench.train.losses import build_loss
    from workbench.train.optim import build_param_groups, build_scheduler
    from workbench.train.task import PR_BINS, PixelCounts

    started = time.perf_counter()
    seed_everything(params.seed)
    cfg = params.train
    datamodule = build_datamodule(params, prepared)
    meta_modalities = _modalities(prepared)
    model = build_model(params.model, len(prepared.bands), prepared.bands, meta_modalities)
    criterion = build_loss(cfg.loss)
    groups = build_param_groups(
        model,
        cfg.optimizer,
        backbone_prefix=getattr(model, "backbone_prefix", "encoder"),
        num_layers=getattr(model, "num_backbone_layers", None),
    )
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, weight_decay=cfg.optimizer.weight_decay
    )
    n_train = int((prepared.catalog["split"] == "train").sum())
    steps_per_epoch = -(-n_train // params.data.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optimizer, steps_per_epoch, cfg.max_epochs)["scheduler"]
    ema = EMA(model, cfg.ema.decay) if cfg.ema.enabled else None
    train_counts, val_counts = PixelCounts(), PixelCounts()
    batch_augment = datamodule.batch_augment
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, float]] = []
    best_iou = -math.inf
    step = 0
    epochs: list[float] = []
    for epoch in range(cfg.max_epochs):
        epoch_start = time.perf_counter()
        loader = datamodule.train_dataloader()
        dataset: Any = loader.dataset
        dataset.epoch = epoch
        sampler = loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        for batch in loader:
            if batch_augment is not None:
                batch = batch_augment(batch, torch.Generator().manual_seed(params.seed * 1_000_003 + step))
            logits = model(batch["image"])
            mask = loss_mask(batch)
            loss, parts = criterion(logits.float(), batch["target"].float(), mask)
            if not bool(torch.isfinite(loss.detach())):
                raise RuntimeError(f"bare loop: loss is {float(loss)} at step {step}")
            train_counts.update(logits.detach(), batch["target"], mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            rows.append(
                {
                    "step": step,
                    "train/loss": float(loss.detach()),
                    **{f"train/loss_{k}": float(v) for k, v in parts.items()},
                    "lr": float(optimizer.param_groups[0]["lr"]),
                }
            )
            step += 1
        metrics = {f"train/{k}": v for k, v in train_counts.compute().items()}
        train_counts.reset()
        metrics |= _validate(model, datamodule, criterion, val_counts, ema, params, PR_BINS, loss_mask)
        rows.append({"step": step, **metrics})
        state = {
            "epoch": epoch,
            "global_step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "metrics": metrics,
        }
        iou = metrics.get("val/iou", math.nan)
        if not math.isnan(iou) and iou > best_iou:
            best_iou = iou
            _save_checkpoint(run_dir / "checkpoints" / "best.ckpt", state)
        _save_checkpoint(run_dir / "checkpoints" / "last.ckpt", state)
        _write_csv(run_dir / "metrics.csv", rows)
        epochs.append(time.perf_counter() - epoch_start)
    total = time.perf_counter() - started
    return {"epoch_seconds": epochs, "run_seconds": total, "startup_seconds": total - sum(epochs)}


def _validate(
    model: torch.nn.Module,
    datamodule: Any,
    criterion: Any,
    counts: Any,
    ema: Any,
    params: Params,
    bins: int,
    loss_mask: Any,
) -> dict[str, float]:
    """Validation pass (EMA weights swapped in when on): loss, pixel counts and prevalence PR-AUCs."""
    from contextlib import nullcontext

    from workbench.evaluate.metrics import per_chip_histograms

    model.eval()
    losses, pos_rows, neg_rows = [], [], []
    with ema.swapped_in(model) if ema is not None else nullcontext(), torch.inference_mode():
        for batch in datamodule.val_dataloader():
            logits = model(batch["image"])
            mask = loss_mask(batch)
            loss, _ = criterion(logits.float(), batch["target"].float(), mask)
            counts.update(logits, batch["target"], mask)
            losses.append(float(loss))
            prob = torch.sigmoid(logits[:, 0].float()).numpy()
            pos, neg = per_chip_histograms(prob, batch["label"].numpy(), batch["valid"].numpy(), bins)
            pos_rows.append(pos)
            neg_rows.append(neg)
    metrics = {f"val/{k}": v for k, v in counts.compute().items()}
    counts.reset()
    metrics["val/loss"] = float(np.mean(losses)) if losses else math.nan
    threshold = params.data.sampler.positive_threshold
    scores = _ranking_scores(np.concatenate(pos_rows), np.concatenate(neg_rows), threshold, params.evaluate.prevalences)
    metrics |= {f"val/{k}": v for k, v in scores.items()}
    return metrics


def _write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _modalities(prepared: PreparedData) -> list[str]:
    from workbench.data.store import read_store_meta

    meta = {band["name"]: band for band in read_store_meta(prepared.store)["bands"]}
    return [meta[name]["modality"] for name in prepared.bands]


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up banners and data-loader hints while benchmarking."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --------------------------------------------------------------------------- the comparison

MODELS: dict[str, list[str]] = {
    "demo": [],
    "terramind_tiny": [
        "model.architecture=terramind",
        "model.terramind.size=tiny",
        "model.terramind.decoder=UperNet",
        "model.terramind.decoder_channels=64",
    ],
}
MODEL_NAMES = {
    "demo": "smp Unet resnet18 (params/demo.yaml)",
    "terramind_tiny": "TerraMind v1 tiny (random weights, pretrained=False), UperNet decoder 64 channels",
}


def bench_epoch(
    model: str = "demo",
    n_train: int = 32,
    n_val: int = 16,
    size: int = 64,
    batch_size: int = 8,
    num_workers: int = 2,
    epochs_per_run: int = 1,
    pairs: int = 5,
    warmup: int = 0,
    ema: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Paired whole-epoch seconds of the workbench against the bare loop for one model; ratio workbench / bare.

    `threads` sets torch's intra-op threads for both sides (1 by default: on a shared two-core machine two
    spinning OpenMP threads per process made a training step up to ten times slower and far noisier).
    """
    overrides = [*MODELS[model], f"train.ema.enabled={str(ema).lower()}"]
    params = bench_params(overrides, epochs_per_run, batch_size, num_workers)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    startup: dict[str, list[float]] = {"workbench": [], "bare": []}
    try:
        with tempfile.TemporaryDirectory() as tmp, quiet_lightning():
            prepared = bench_data(Path(tmp), n_train, n_val, size)
            counter = iter(range(10**6))

            def side(name: str) -> Any:
                def run() -> float:
                    run_dir = Path(tmp) / f"{name}{next(counter)}"
                    runner = workbench_epochs if name == "workbench" else bare_epochs
                    out = runner(params, prepared, run_dir)
                    startup[name].append(out["startup_seconds"])
                    timed = out["epoch_seconds"][1:] if len(out["epoch_seconds"]) > 1 else out["epoch_seconds"]
                    return float(np.mean(timed))

                return run

            result = paired_ratio(side("workbench"), side("bare"), pairs, warmup, names=("workbench", "bare"))
    finally:
        torch.set_num_threads(before)
    result |= {
        "model": MODEL_NAMES[model],
        "chips": {"train": n_train, "val": n_val, "size": size, "bands": len(prepared.bands)},
        "batch_size": batch_size,
        "num_workers": num_workers,
        "epochs_per_run": epochs_per_run,
        "timed_epochs_per_run": max(1, epochs_per_run - 1),
        "ema": ema,
        "torch_threads": threads or before,
        "startup_seconds_median": {k: float(np.median(v)) if v else None for k, v in startup.items()},
        "goal_ratio_max": OVERHEAD_GOAL,
        "meets_goal": None if result["ratio"] is None else result["ratio"] <= OVERHEAD_GOAL,
    }
    result["summary"] = ratio_text(result, f"{model} epoch workbench/bare")
    return result


def bench_train(quick: bool = False, models: list[str] | None = None) -> dict[str, Any]:
    """Whole-epoch comparisons for the demo model and TerraMind-tiny (quick: demo only, tiny sizes)."""
    models = models or (["demo"] if quick else ["demo", "terramind_tiny"])
    out: dict[str, Any] = {}
    with machine_load() as load:
        for model in models:
            if quick:
                out[model] = bench_epoch(model, n_train=8, n_val=4, size=32, batch_size=4, num_workers=1, pairs=2)
            else:
                out[model] = bench_epoch(model)
    out["load"] = load.summary()
    out["note"] = (
        "epoch = one whole training epoch (loader workers, sampler, normalisation, augmentation, steps, "
        "validation with its metrics, CSV log, best and last checkpoints, EMA updates and EMA validation); "
        "each run trains a fresh model for epochs_per_run epochs and the first is warm-up when there are "
        "several; ratio = workbench / bare epoch seconds per pair of runs, median over the pairs."
    )
    return out

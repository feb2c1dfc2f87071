"""Training stage: build data, model, callbacks and loggers from parameters and fit.

Outputs under the run directory: `model/` (the model bundle used by calibration, review and
`workbench predict`), `checkpoints/` (resumable Lightning checkpoints), `logs/` (CSV metrics),
and `metrics/train.json`.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from workbench.data.prepare import PreparedData
from workbench.io import write_json_atomic
from workbench.params import Params


@dataclass
class TrainResult:
    """What the training stage produced."""

    model_dir: Path
    checkpoint: Path | None
    metrics: dict[str, Any]
    task: Any
    datamodule: Any


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy, torch and hashing; optionally make torch deterministic."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    L.seed_everything(seed, workers=True, verbose=False)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def data_pos_weight(params: Params, prepared: PreparedData) -> float | None:
    """Raw negative:positive pixel ratio of the train split, for loss terms with pos_weight='data'.

    Each term applies its own weighting (linear / sqrt / log) and cap to this ratio.
    """
    if not any(term.pos_weight == "data" or term.class_weighting != "none" for term in params.train.loss):
        return None
    train = prepared.catalog[prepared.catalog["split"] == "train"]
    valid = train["valid_fraction"].to_numpy() if "valid_fraction" in train else np.ones(len(train))
    n_pos = float((train["positive_fraction"].to_numpy() * valid).sum())
    n_valid = float(valid.sum())
    return (n_valid - n_pos) / n_pos if n_pos > 0 else float("inf")


def build_datamodule(params: Params, prepared: PreparedData) -> Any:
    """The Lightning data module of a prepared run (sampler, augmentation and normalisation wired in)."""
    from workbench.data.augment import Augmenter, BatchAugmenter
    from workbench.data.dataset import ChipDataModule
    from workbench.data.normalize import NormalizationStats
    from workbench.data.sampling import build_sampler
    from workbench.data.store import read_store_meta

    stats = NormalizationStats.load(prepared.stats_path)
    stats.check_compatible(prepared.bands, params.data.normalize.method)
    meta = {band["name"]: band for band in read_store_meta(prepared.store)["bands"]}
    modalities = [meta[name]["modality"] for name in prepared.bands]
    optical = [bool(meta[name]["optical"]) for name in prepared.bands]
    cfg = params.data

    def sampler_factory(positive_fraction: np.ndarray) -> Any:
        return build_sampler(cfg.sampler, positive_fraction, seed=params.seed)

    return ChipDataModule(
        prepared.store,
        prepared.catalog,
        bands=prepared.bands,
        normalizer=stats,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        sampler_factory=sampler_factory,
        augment=Augmenter(cfg.augment, modalities, optical),
        batch_augment=BatchAugmenter(cfg.augment),
        seed=params.seed,
    )


def build_callbacks(params: Params, run_dir: Path, task: Any) -> list[Any]:
    """Checkpointing, EMA, SWA/snapshots, early stopping and learning-rate logging."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from workbench.train.callbacks import BackboneFreeze, GatedEarlyStopping

    cfg = params.train
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-{epoch:03d}",
            monitor="val/iou",
            mode="max",
            save_last=True,
            save_top_k=1,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.optimizer.freeze_backbone_epochs:
        prefix = getattr(task.model, "backbone_prefix", "encoder")
        callbacks.append(BackboneFreeze(cfg.optimizer.freeze_backbone_epochs, prefix))
    if cfg.ema.enabled:
        from workbench.train.ema import EMACallback

        callbacks.append(EMACallback(cfg.ema.decay))
    if cfg.swa.enabled:
        from workbench.train.ema import build_swa_callback

        callbacks.append(build_swa_callback(cfg.swa, cfg.max_epochs))
    if cfg.swa.soup_snapshots:
        from workbench.train.ema import build_snapshot_callback

        callbacks.append(build_snapshot_callback(cfg.swa, cfg.max_epochs, run_dir / "snapshots"))
    if cfg.early_stopping.enabled:
        callbacks.append(GatedEarlyStopping(cfg.early_stopping))
    return callbacks


def build_loggers(params: Params, run_dir: Path) -> list[Any]:
    """CSV logs always; MLflow when `train.tracking.uri` is set."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    tracking = params.train.tracking
    if tracking.uri:
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(
            MLFlowLogger(
                experiment_name=tracking.experiment or params.experiment,
                tracking_uri=tracking.uri,
                run_name=run_dir.name,
            )
        )
    return loggers


def build_trainer(params: Params, run_dir: Path, callbacks: list[Any], loggers: list[Any]) -> L.Trainer:
    """A Lightning Trainer with accelerator, devices, nodes, strategy and precision from parameters."""
    cfg = params.train
    return L.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        gradient_clip_val=cfg.grad_clip,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
        logger=loggers,
        check_val_every_n_epoch=cfg.val_every_n_epochs,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )


def build_task(params: Params, prepared: PreparedData, datamodule: Any, run_dir: Path) -> Any:
    """The SegmentationTask for a prepared run."""
    from workbench.data.store import read_store_meta
    from workbench.train.task import SegmentationTask

    meta = {band["name"]: band for band in read_store_meta(prepared.store)["bands"]}
    n_train = len(datamodule.split_indices("train"))
    epoch_size = params.data.sampler.epoch_size or n_train
    steps_per_epoch = max(1, -(-epoch_size // params.data.batch_size))
    task = SegmentationTask(
        model_params=params.model.model_dump(mode="json"),
        train_params=params.train.model_dump(mode="json"),
        in_channels=len(prepared.bands),
        band_names=prepared.bands,
        modalities=[meta[name]["modality"] for name in prepared.bands],
        data_pos_weight=data_pos_weight(params, prepared),
        steps_per_epoch=steps_per_epoch,
        failure_dir=str(run_dir / "failures"),
    )
    if params.train.compile:
        task.model = torch.compile(task.model)  # type: ignore[assignment]
    return task


def train_model(params: Params, prepared: PreparedData, run_dir: Path, resume: bool = True) -> TrainResult:
    """Fit a model and save its bundle; resumes from `checkpoints/last.ckpt` when present."""
    run_dir = Path(run_dir)
    seed_everything(params.seed, params.train.deterministic)
    datamodule = build_datamodule(params, prepared)
    task = build_task(params, prepared, datamodule, run_dir)
    callbacks = build_callbacks(params, run_dir, task)
    trainer = build_trainer(params, run_dir, callbacks, build_loggers(params, run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(last) if resume and last.is_file() else None)
    seconds = time.perf_counter() - started
    model_dir = save_trained_model(params, prepared, task, run_dir, callbacks)
    metrics = {
        "train.seconds": seconds,
        "train.epochs": trainer.current_epoch,
        "train.steps": trainer.global_step,
        "train.data_pos_weight": task.hparams["data_pos_weight"],
    }
    for key, value in trainer.callback_metrics.items():
        if key.startswith(("val/", "train/")):
            metrics[f"train.last_{key.replace('/', '_')}"] = float(value)
    write_json_atomic(run_dir / "metrics" / "train.json", metrics)
    best = getattr(callbacks[0], "best_model_path", "") or None
    return TrainResult(model_dir, Path(best) if best else None, metrics, task, datamodule)


def save_trained_model(params: Params, prepared: PreparedData, task: Any, run_dir: Path, callbacks: list[Any]) -> Path:
    """Save the final weights (EMA weights when EMA is on, a soup when snapshots were taken) as a bundle."""
    from workbench.data.store import read_store_meta
    from workbench.models.bundle import save_bundle
    from workbench.train.ema import EMACallback, SnapshotCallback, soup_from_directory

    for callback in callbacks:
        if isinstance(callback, EMACallback) and callback.ema.initialized:
            callback.ema.swap_in(task)  # keep the averaged weights: they were the ones validated
    for callback in callbacks:
        if isinstance(callback, SnapshotCallback) and callback.saved:
            task.load_state_dict(soup_from_directory(callback.directory))
    model = getattr(task.model, "_orig_mod", task.model)
    meta = {band["name"]: band for band in read_store_meta(prepared.store)["bands"]}
    model_dir = run_dir / "model"
    save_bundle(
        model_dir,
        model,
        params.model,
        bands=prepared.bands,
        modalities=[meta[name]["modality"] for name in prepared.bands],
        normalization=prepared.stats_path,
    )
    return model_dir

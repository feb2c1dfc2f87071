"""Training stage: build data, model, callbacks and loggers from parameters and fit.

Outputs under the run directory: `model/` (the model bundle used by calibration, review and
`workbench predict`, with `run_info.json`), `checkpoints/` (resumable Lightning checkpoints:
`best-*.ckpt` and `last.ckpt`), `logs/` (CSV metrics), `failures/` (the chips of a batch whose
loss was not finite) and `metrics/train.json`.

Resuming from `checkpoints/last.ckpt` is exact: a run stopped mid-epoch and resumed ends with
the same weights as an uninterrupted run (with `train.deterministic`). Lightning restores the
weights, optimiser, schedulers, loop counters and callback states (EMA, early stopping); on top
of that the training loader built by `workbench.data.loading.build_datamodule` remembers how many
batches of the epoch it has delivered (`ResumableDataLoader`), every epoch's chip order is a
function of (seed, epoch) (the samplers and `EpochShuffleSampler`), augmentation is seeded per
(seed, epoch, chip) and per global step, and `RngStateCallback` restores the global random
generators. The paths of the run directory come from `workbench.run.RunLayout`.
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

from workbench.data.loading import build_datamodule, class_pixel_counts, data_pos_weight
from workbench.data.normalize import NormalizationStats, compute_stats
from workbench.data.prepare import PreparedData
from workbench.data.sampling import build_sampler
from workbench.data.store import open_store, read_store_meta
from workbench.io import read_json, write_json_atomic
from workbench.models.bundle import InputProfile, describe_band_mismatch, save_bundle
from workbench.models.factory import resolve_architecture
from workbench.params import Params
from workbench.run import (
    LOGS_DIR,
    RUN_INFO_FILE,
    TRAINING,
    RunLayout,
    git_commit,
    mlflow_tracking_uri,
    package_versions,
    params_hash,
    project_root,
    training_params,
)
from workbench.train.callbacks import BackboneFreeze, GatedEarlyStopping, LastCheckpoint, RngStateCallback
from workbench.train.checkpoint_io import AtomicCheckpointIO, load_checkpoint_file
from workbench.train.ema import EMACallback, FinalWeightsCallback, build_snapshot_callback, build_swa_callback
from workbench.train.final import choose_final_weights
from workbench.train.hardware import CpuFallbackWarning, gpu_available, resolve_hardware
from workbench.train.task import SegmentationTask

__all__ = ["CpuFallbackWarning", "gpu_available", "resolve_hardware"]

DDP_STRATEGIES = {"ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"}


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


def checkpoint_monitor(params: Params) -> tuple[str, str]:
    """Metric and mode that choose the best checkpoint: the early-stopping metric when it is on, else val/iou."""
    stopping = params.train.early_stopping
    return (stopping.monitor, stopping.mode) if stopping.enabled else ("val/iou", "max")


def build_callbacks(params: Params, run_dir: Path, task: Any) -> list[Any]:
    """Checkpointing, random-state keeping, EMA, SWA/snapshots, early stopping and learning-rate logging.

    The first callback keeps the best checkpoint (after each validation); the second rewrites
    `last.ckpt` at each epoch end and, with `train.checkpoint_every_n_steps`, every N optimiser
    steps, so an interrupted run loses at most N steps.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    cfg = params.train
    monitor, mode = checkpoint_monitor(params)
    directory = RunLayout(run_dir).checkpoints
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=directory, filename="best-{epoch:03d}", monitor=monitor, mode=mode, save_top_k=1),
        LastCheckpoint(directory, every_n_train_steps=cfg.checkpoint_every_n_steps),
        LearningRateMonitor(logging_interval="step"),
        RngStateCallback(),
        ParamsStamp(params),
    ]
    if cfg.optimizer.freeze_backbone_epochs:
        prefix = getattr(task.model, "backbone_prefix", "encoder")
        callbacks.append(BackboneFreeze(cfg.optimizer.freeze_backbone_epochs, prefix))
    if cfg.ema.enabled:
        callbacks.append(EMACallback(cfg.ema.decay))
    if cfg.swa.enabled:
        callbacks.append(build_swa_callback(cfg.swa, cfg.max_epochs))
    if cfg.swa.soup_snapshots:
        callbacks.append(build_snapshot_callback(cfg.swa, cfg.max_epochs, RunLayout(run_dir).snapshots))
    if cfg.early_stopping.enabled:
        callbacks.append(GatedEarlyStopping(cfg.early_stopping))

    callbacks.append(FinalWeightsCallback(RunLayout(run_dir).weight_candidates))  # last: after EMA and snapshots
    return callbacks


def build_loggers(params: Params, run_dir: Path) -> list[Any]:
    """CSV logs always; MLflow when `train.tracking.uri` is set (a server URI or a local folder)."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name=LOGS_DIR, version="")]  # logs/metrics.csv
    tracking = params.train.tracking
    if tracking.uri:
        from lightning.pytorch.loggers import MLFlowLogger

        record = RunLayout(run_dir).tracking  # the run's MLflow run, opened by workbench.tracking
        run_id = read_json(record).get("run_id") if record.is_file() else None
        loggers.append(
            MLFlowLogger(
                experiment_name=tracking.experiment or params.experiment,
                tracking_uri=mlflow_tracking_uri(tracking.uri),
                run_name=run_dir.name,
                tags={"seed": str(params.seed)},
                run_id=run_id,
            )
        )
    return loggers


def has_unused_parameters(params: Params) -> bool:
    """Whether some parameters get no gradient in a step, which DDP must be told about.

    smp encoders built with encoder_depth < 5 keep their deeper stages unused, and a backbone frozen
    for the first epochs gets no gradient while it is frozen.
    """

    model = params.model
    try:
        is_smp = resolve_architecture(model.architecture) not in {"terramind", "satunet", "late_fusion"}
    except ValueError:
        is_smp = False
    return params.train.optimizer.freeze_backbone_epochs > 0 or (is_smp and model.encoder_depth < 5)


def build_strategy(params: Params) -> Any:
    """The Lightning strategy: DDP variants get gloo on the CPU and find_unused_parameters when needed."""
    params = resolve_hardware(params, warn=False)
    cfg = params.train
    if cfg.strategy not in DDP_STRATEGIES:
        return cfg.strategy
    from lightning.pytorch.strategies import DDPStrategy

    start_method = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}[cfg.strategy]
    return DDPStrategy(
        process_group_backend="gloo" if cfg.accelerator == "cpu" else None,
        find_unused_parameters=has_unused_parameters(params),
        start_method=start_method,  # type: ignore[arg-type]
    )


def sampler_epoch_lengths(params: Params, prepared: PreparedData) -> list[int]:
    """Chips drawn in each epoch (the curriculum changes it at its stage epochs)."""

    train = prepared.catalog["split"].to_numpy() == "train"
    fraction = prepared.catalog["positive_fraction"].to_numpy()[train]
    sampler = build_sampler(params.data.sampler, fraction, seed=params.seed)
    if sampler is None:
        return [int(train.sum())] * params.train.max_epochs
    lengths = []
    for epoch in range(params.train.max_epochs):
        sampler.set_epoch(epoch)
        lengths.append(len(sampler))
    return lengths


def build_trainer(
    params: Params, run_dir: Path, callbacks: list[Any], loggers: list[Any], epoch_lengths: list[int] | None = None
) -> L.Trainer:
    """A Lightning Trainer with accelerator, devices, nodes, strategy and precision from parameters.

    When the epoch length changes between epochs (curriculum sampling) the training loader is
    rebuilt every epoch, since Lightning sizes an epoch from the loader it was given.
    """
    params = resolve_hardware(params)
    cfg = params.train
    varying = epoch_lengths is not None and len(set(epoch_lengths)) > 1
    return L.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(params),
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
        reload_dataloaders_every_n_epochs=1 if varying else 0,
        plugins=[AtomicCheckpointIO()],  # temp file + fsync + rename beside the checkpoint
    )


class CheckpointMismatch(ValueError):
    """A checkpoint was trained on other bands, normalisation statistics or parameters than the run has now."""


def normalization_record(stats_path: Path) -> dict[str, Any]:
    """The normalisation statistics as plain lists (stored with the task's hyper-parameters)."""

    stats = NormalizationStats.load(stats_path)
    return {
        "bands": list(stats.bands),
        "method": stats.method,
        **{
            key: np.asarray(value, dtype=float).round(6).tolist()
            for key in ("mean", "std", "low", "high")
            if (value := getattr(stats, key)) is not None
        },
    }


def check_checkpoint_classes(checkpoint: Path, num_classes: int) -> None:
    """Refuse to resume from a checkpoint of a model with another number of classes; name both and the file."""
    state = load_checkpoint_file(checkpoint)
    saved = (state.get("hyper_parameters", {}).get("model_params") or {}).get("num_classes", 1)
    if int(saved) != int(num_classes):
        raise CheckpointMismatch(
            f"not resuming: {checkpoint} holds a model with num_classes={saved} but model.num_classes={num_classes}; "
            f"nothing was trained or overwritten. Set model.num_classes={saved}, or delete {checkpoint.parent} "
            "(and model/) of this run, or start a new run directory"
        )


def check_checkpoint_matches(checkpoint: Path, bands: list[str], normalization: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint whose bands or normalisation differ from the data; say which."""

    state = load_checkpoint_file(checkpoint)
    hparams = state.get("hyper_parameters", {})
    saved_bands = list(hparams.get("band_names", []))
    if saved_bands != list(bands):
        raise CheckpointMismatch(
            f"{checkpoint} was trained on other bands: {describe_band_mismatch(saved_bands, list(bands))}; "
            "start a new run directory or select the checkpoint's bands with data.bands"
        )
    saved = hparams.get("normalization")
    if saved is None:
        return
    if saved.get("method") != normalization["method"]:
        raise CheckpointMismatch(
            f"{checkpoint} used {saved.get('method')!r} normalisation, the data uses {normalization['method']!r}"
        )
    for key in ("mean", "std", "low", "high"):
        if key not in saved and key not in normalization:
            continue
        old, new = np.asarray(saved.get(key, []), float), np.asarray(normalization.get(key, []), float)
        if old.shape != new.shape or not np.allclose(old, new, rtol=1e-4, atol=1e-6):
            differ = [b for b, a, c in zip(bands, old, new) if not np.isclose(a, c, rtol=1e-4, atol=1e-6)]
            raise CheckpointMismatch(
                f"{checkpoint} was trained with other normalisation statistics ({key} differs for bands "
                f"{differ or bands}); the train split or the data changed - start a new run directory"
            )


PARAMS_KEY = "workbench_params"  # the training parameters stored in every checkpoint
PARAMS_HASH_KEY = "workbench_params_hash"


class ParamsStamp(L.Callback):
    """Store the training parameters (and their hash) in every checkpoint, so a resume can compare them."""

    def __init__(self, params: Params) -> None:
        self.values = training_params(params)
        self.digest = params_hash(self.values)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[PARAMS_KEY] = self.values
        checkpoint[PARAMS_HASH_KEY] = self.digest


def check_checkpoint_params(checkpoint: Path, params: Params) -> None:
    """Refuse to resume from a checkpoint trained with other parameters (loss, learning rate, ...); say which.

    The checkpoint's stored hash is compared with the current training parameters' hash; on a mismatch the
    differing keys are named. Checkpoints written before parameters were stored pass (bands and
    normalisation are still checked by `check_checkpoint_matches`).
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved_hash = state.get(PARAMS_HASH_KEY)
    current = training_params(params)
    if saved_hash is None or saved_hash == params_hash(current):
        return
    saved = state.get(PARAMS_KEY) or {}
    changed = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    shown = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise CheckpointMismatch(
        f"not resuming: {checkpoint} was trained with other parameters ({shown}{more}). Nothing was trained or "
        f"overwritten. To train from scratch with these parameters, delete {checkpoint.parent} (and model/) of this "
        "run, or start a new run directory"
    )


def build_task(params: Params, prepared: PreparedData, datamodule: Any, run_dir: Path) -> Any:
    """The SegmentationTask for a prepared run.

    `steps_per_epoch` (for warm-up and cosine schedules) is the mean number of batches per epoch over
    the run, so a curriculum whose epochs grow still ends its cosine at the last step.
    """

    meta = {band["name"]: band for band in read_store_meta(prepared.store)["bands"]}
    lengths = sampler_epoch_lengths(params, prepared)
    batches = [-(-length // params.data.batch_size) for length in lengths]
    steps_per_epoch = max(1, round(sum(batches) / len(batches)))
    task = SegmentationTask(
        model_params=params.model.model_dump(mode="json"),
        train_params=params.train.model_dump(mode="json"),
        in_channels=len(prepared.bands),
        band_names=prepared.bands,
        modalities=[meta[name]["modality"] for name in prepared.bands],
        data_pos_weight=data_pos_weight(params, prepared),
        steps_per_epoch=steps_per_epoch,
        failure_dir=str(RunLayout(run_dir).failures),
        prevalences=list(params.evaluate.prevalences),
        positive_threshold=params.data.sampler.positive_threshold,
        normalization=normalization_record(prepared.stats_path),
        class_pixel_counts=class_pixel_counts(params, datamodule),
    )
    task.chip_ids = prepared.catalog["chip_id"].astype(str).to_numpy()
    if params.train.compile:
        task.model = torch.compile(task.model)  # type: ignore[assignment]
    return task


def train_model(params: Params, prepared: PreparedData, run_dir: Path, resume: bool = True) -> TrainResult:
    """Fit a model and save its bundle; resumes exactly from `checkpoints/last.ckpt` when present."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    seed_everything(params.seed, params.train.deterministic)
    datamodule = build_datamodule(params, prepared)
    task = build_task(params, prepared, datamodule, run_dir)
    callbacks = build_callbacks(params, run_dir, task)
    lengths = sampler_epoch_lengths(params, prepared)
    trainer = build_trainer(params, run_dir, callbacks, build_loggers(params, run_dir), lengths)
    last = layout.last_checkpoint
    resumed = resume and last.is_file()
    if resumed:
        check_checkpoint_classes(last, params.model.num_classes)
        check_checkpoint_params(last, params)
        check_checkpoint_matches(last, prepared.bands, normalization_record(prepared.stats_path))
    started = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(last) if resumed else None, weights_only=True)
    seconds = time.perf_counter() - started
    model_dir = layout.model
    best = getattr(callbacks[0], "best_model_path", "") or None
    final: dict[str, Any] = {}
    if trainer.is_global_zero:  # under DDP every process gets here; one writes
        monitor, mode = checkpoint_monitor(params)
        final = choose_final_weights(params, task, datamodule, run_dir, Path(best) if best else None, monitor, mode)
        save_trained_model(params, prepared, task, run_dir)
        write_run_info(params, model_dir, resumed_from=str(last) if resumed else None, final_weights=final)
    metrics = {
        "train.seconds": seconds,
        "train.epochs": trainer.current_epoch,
        "train.steps": trainer.global_step,
        "train.data_pos_weight": task.hparams["data_pos_weight"],
    }
    for key, value in trainer.callback_metrics.items():
        if key.startswith(("val/", "train/")):
            metrics[f"train.last_{key.replace('/', '_')}"] = float(value)
    if final:
        metrics["train.final_weights"] = final["weights"]
        for row in final["candidates"]:
            metrics[f"train.final_{row['candidate']}_{final['metric'].replace('/', '_')}"] = row["score"]
    if trainer.is_global_zero:
        write_json_atomic(layout.stage_metrics(TRAINING), metrics)
    return TrainResult(model_dir, Path(best) if best else None, metrics, task, datamodule)


def write_run_info(
    params: Params, model_dir: Path, resumed_from: str | None = None, final_weights: dict[str, Any] | None = None
) -> Path:
    """`<model_dir>/run_info.json`: the parameters, git commit and package versions the bundle came from, and
    which weights it holds (`final_weights`: the chosen candidate, the rule and every candidate's score)."""
    from datetime import UTC, datetime

    info = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "experiment": params.experiment,
        "seed": params.seed,
        "git_commit": git_commit(project_root()),
        "versions": package_versions(),
        "resumed_from": resumed_from,
        "final_weights": final_weights or {},
        "params": params.model_dump(mode="json"),
    }
    return write_json_atomic(Path(model_dir) / RUN_INFO_FILE, info)


def save_trained_model(params: Params, prepared: PreparedData, task: Any, run_dir: Path) -> Path:
    """Save the task's final weights as a bundle (the candidate `workbench.train.final` chose)."""

    model = getattr(task.model, "_orig_mod", task.model)
    store_meta = read_store_meta(prepared.store)
    meta = {band["name"]: band for band in store_meta["bands"]}
    model_dir = RunLayout(run_dir).model
    save_bundle(
        model_dir,
        model,
        params.model,
        bands=prepared.bands,
        modalities=[meta[name]["modality"] for name in prepared.bands],
        normalization=prepared.stats_path,
        input_profile=training_input_profile(prepared, store_meta),
    )
    return model_dir


def training_input_profile(prepared: PreparedData, store_meta: dict[str, Any], sample_chips: int = 64) -> Any:
    """The bundle's InputProfile: chip side and pixel size from the store, per-band mean/std of the train split.

    The train-split normalisation statistics give mean and std when they hold them; otherwise (method
    "none") they are computed on up to `sample_chips` train chips.
    """

    stats = NormalizationStats.load(prepared.stats_path).select(prepared.bands)
    if stats.mean is None or stats.std is None:
        train = np.flatnonzero(prepared.catalog["split"].to_numpy() == "train")[:sample_chips]
        ds = open_store(prepared.store, prepared.catalog)
        stats = compute_stats(ds, train, prepared.bands, method="zscore", progress=False)
    assert stats.mean is not None and stats.std is not None
    chip = store_meta.get("chip_size")
    pixel = store_meta.get("attrs", {}).get("pixel_size_m")
    return InputProfile(
        bands=list(prepared.bands),
        mean=stats.mean,
        std=stats.std,
        chip_size=int(min(chip)) if chip else None,
        pixel_size_m=float(pixel) if pixel else None,
    )

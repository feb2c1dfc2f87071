"""Training callbacks that Lightning does not ship in the form the use cases need."""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from workbench.params import EarlyStoppingConfig
from workbench.train.optim import set_backbone_trainable


class GatedEarlyStopping(Callback):
    """Early stopping on a moving average of a monitored metric, disabled before `start_epoch`.

    Seed 001 stops on a 3-validation moving average of PR-AUC at 1:200 and only from epoch 50, when
    the curriculum has reached realistic ratios; before that, validation still runs and best
    checkpoints are still kept.
    """

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.best: float | None = None
        self.bad_validations = 0
        self.stopped_epoch: int | None = None

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.cfg.mode == "max":
            return value > self.best + self.cfg.min_delta
        return value < self.best - self.cfg.min_delta

    def observe(self, value: float, epoch: int) -> bool:
        """Record one validation result; return True when training should stop."""
        self.history.append(value)
        smoothed = sum(self.history) / len(self.history)
        if self._improved(smoothed):
            self.best = smoothed
            self.bad_validations = 0
            return False
        self.bad_validations += 1
        return epoch >= self.cfg.start_epoch and self.bad_validations >= self.cfg.patience

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.cfg.monitor)
        if value is None:
            return
        stop = self.observe(float(value), trainer.current_epoch)
        # all processes must agree, or one would wait forever for the others at the next collective call
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "best": self.best,
            "bad_validations": self.bad_validations,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = deque(state_dict["history"], maxlen=self.cfg.window)
        self.best = state_dict["best"]
        self.bad_validations = state_dict["bad_validations"]
        self.stopped_epoch = state_dict["stopped_epoch"]


class BackboneFreeze(Callback):
    """Keep the backbone frozen for the first `epochs` epochs, then train it (a two-phase fine-tuning schedule)."""

    def __init__(self, epochs: int, backbone_prefix: str = "encoder") -> None:
        self.epochs = epochs
        self.backbone_prefix = backbone_prefix

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:

        model = getattr(pl_module, "model", pl_module)
        set_backbone_trainable(model, trainer.current_epoch >= self.epochs, backbone_prefix=self.backbone_prefix)


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states as plain values and tensors.

    Everything is a tensor, number, string or tuple, so a checkpoint holding it loads with
    torch.load(weights_only=True).
    """
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)
    key, table, position, has_gauss, cached = np_state
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": str(key),
            "table": torch.from_numpy(np.asarray(table, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the random states captured by `capture_rng_state`."""
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(f"random state lacks {sorted(missing)}; expected the output of capture_rng_state()")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["key"],
            numpy_state["table"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RngStateCallback(Callback):
    """Keep the global random states in checkpoints and restore them when training resumes.

    Lightning restores weights, optimiser, schedulers, loops and callback states but not the
    global random generators, so dropout masks and other random draws after a resume would differ
    from an uninterrupted run. The states are put back at `on_train_start`, right before the
    first resumed batch.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` in `dirpath`, rewritten every `every_n_train_steps` optimiser steps and at each epoch end.

    The epoch-end copy is written after validation, so it carries the validated callback states
    (early stopping, best checkpoint); the step copies bound how much an interrupted run loses.
    The file is always overwritten (no `last-v1.ckpt`), so `checkpoints/last.ckpt` is the resume point.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        return  # the epoch-end save follows validation

"""Training callbacks that Lightning does not ship in the form the use cases need."""

from __future__ import annotations

from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from workbench.params import EarlyStoppingConfig


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
        if self.observe(float(value), trainer.current_epoch):
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
    """Keep the backbone frozen for the first `epochs` epochs, then train it (seed 001's phase 1/2)."""

    def __init__(self, epochs: int, backbone_prefix: str = "encoder") -> None:
        self.epochs = epochs
        self.backbone_prefix = backbone_prefix

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from workbench.train.optim import set_backbone_trainable

        model = getattr(pl_module, "model", pl_module)
        set_backbone_trainable(model, trainer.current_epoch >= self.epochs, backbone_prefix=self.backbone_prefix)

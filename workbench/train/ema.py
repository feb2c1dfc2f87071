"""Weight averaging: an exponential moving average (EMA), snapshots for a uniform model soup, and SWA.

* `EMA` keeps an fp32 CPU shadow of the trainable parameters (memory on the accelerator stays free),
  starts at the first update, and can be swapped into the model for evaluation; the live weights are
  restored bit for bit afterwards, also when evaluation fails.
* `EMACallback` updates it after every optimiser step and evaluates validation/test with it. Lightning
  runs checkpoint callbacks last, so checkpoints hold the live weights and the EMA shadow sits in the
  callback state (`ema_weights_from_checkpoint` rebuilds the averaged model from a checkpoint).
* `SnapshotCallback` saves state dicts at chosen epochs; `uniform_soup` averages them (Wortsman et al. 2022).
* SWA uses Lightning's StochasticWeightAveraging (`build_swa_callback`); keep early stopping from
  ending a run before the SWA window opens.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import nn

from workbench.io import write_bytes_atomic
from workbench.params import SwaConfig

# --------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's trainable parameters, kept in fp32 on the CPU.

    After the first `update` the shadow equals the weights; each later update does
    shadow = decay * shadow + (1 - decay) * weights. A parameter that becomes trainable later (an
    unfrozen backbone) joins the shadow at its current value. Buffers (BatchNorm statistics) are not
    averaged: the latest values are copied at each update.
    """

    def __init__(self, model: nn.Module | None = None, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    @property
    def initialized(self) -> bool:
        return self.num_updates > 0

    def _model(self, model: nn.Module | None) -> nn.Module:
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("EMA needs a model: pass one to EMA(model) or to this call")
        return model

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """Fold the model's current trainable weights into the average (initialises it the first time)."""
        model = self._model(model)
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            live = param.detach().to(device="cpu", dtype=torch.float32)
            average = self.shadow.get(name)
            if average is None:
                self.shadow[name] = live.clone()
            else:
                average.mul_(self.decay).add_(live, alpha=1.0 - self.decay)
        for name, buffer in model.named_buffers():
            self.buffers[name] = buffer.detach().to(device="cpu", copy=True)
        self.num_updates += 1

    def _targets(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model tensors the EMA replaces, by name; a name the model lacks is an error."""
        tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        missing = [name for name in [*self.shadow, *self.buffers] if name not in tensors]
        if missing:
            raise ValueError(f"the model has no tensor named {missing[0]!r} held by the EMA ({len(missing)} missing)")
        return tensors

    @torch.no_grad()
    def swap_in(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Copy the averaged weights into the model; returns the live weights (on the CPU) for `restore`."""
        model = self._model(model)
        targets = self._targets(model)
        backup: dict[str, torch.Tensor] = {}
        for name, value in [*self.shadow.items(), *self.buffers.items()]:
            backup[name] = targets[name].detach().to(device="cpu", copy=True)
            targets[name].copy_(value)
        return backup

    @torch.no_grad()
    def restore(self, model: nn.Module | None, backup: Mapping[str, torch.Tensor]) -> None:
        """Put back the live weights returned by `swap_in` (exact copies, same dtype)."""
        targets = self._targets(self._model(model))
        for name, value in backup.items():
            targets[name].copy_(value)

    @contextmanager
    def swapped_in(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Evaluate with the averaged weights inside the block; live weights come back even on error.

        Before the first update there is nothing to swap and the model is left as it is.
        """
        model = self._model(model)
        if not self.initialized:
            yield model
            return
        backup = self.swap_in(model)
        try:
            yield model
        finally:
            self.restore(model, backup)

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Overwrite the model's weights with the average for good (for export)."""
        model = self._model(model)
        targets = self._targets(model)
        for name, value in [*self.shadow.items(), *self.buffers.items()]:
            targets[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
            "buffers": dict(self.buffers),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"decay", "num_updates", "shadow", "buffers"} - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)}; expected the output of EMA.state_dict()")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.detach().to(device="cpu", dtype=torch.float32).clone() for k, v in state["shadow"].items()}
        self.buffers = {k: v.detach().to(device="cpu").clone() for k, v in state["buffers"].items()}


class EMACallback(Callback):
    """Lightning callback: EMA update after each optimiser step, EMA weights for validation, test and predict."""

    def __init__(self, decay: float = 0.999) -> None:
        self.ema = EMA(decay=decay)
        self._backup: dict[str, torch.Tensor] | None = None
        self._last_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimiser steps: with gradient accumulation not every batch ends with one.
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.ema.update(pl_module)

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if self._backup is None and self.ema.initialized:
            self._backup = self.ema.swap_in(pl_module)

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self._backup is not None:
            backup, self._backup = self._backup, None
            self.ema.restore(pl_module, backup)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict["ema"])
        self._last_step = int(state_dict.get("last_step", 0))


def ema_weights_from_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The LightningModule state dict with the EMA averages of a checkpoint swapped in (None without EMA state)."""
    callbacks = checkpoint.get("callbacks", {}) or {}
    states = [state for key, state in callbacks.items() if str(key).startswith(EMACallback.__qualname__)]
    if not states:
        return None
    if "state_dict" not in checkpoint:
        raise ValueError("checkpoint has EMA state but no 'state_dict' of the model")
    ema_state = states[0]["ema"]
    weights = dict(checkpoint["state_dict"])
    for name, value in ema_state["shadow"].items():
        if name not in weights:
            raise ValueError(f"EMA tensor {name!r} is not in the checkpoint's state_dict")
        weights[name] = value.to(dtype=weights[name].dtype)
    for name, value in ema_state["buffers"].items():
        if name in weights:  # non-persistent buffers (e.g. TerraMind's channel tables) are in no state dict
            weights[name] = value.to(dtype=weights[name].dtype)
    return weights


# --------------------------------------------------------------------------- model soup and snapshots


def uniform_soup(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Uniform weight average of several state dicts of the same model.

    Floating tensors are averaged (in float64, returned in their own dtype); integer tensors such as
    BatchNorm's num_batches_tracked and non-tensor entries keep the first dict's value.
    """
    if not state_dicts:
        raise ValueError("uniform_soup needs at least one state dict")
    first = state_dicts[0]
    for index, other in enumerate(state_dicts[1:], start=1):
        if set(other) != set(first):
            odd = sorted(set(other) ^ set(first))
            raise ValueError(f"state dict {index} does not match state dict 0: key {odd[0]!r} differs")
    soup: dict[str, Any] = {}
    for key, value in first.items():
        if not (torch.is_tensor(value) and value.is_floating_point()):
            soup[key] = value.clone() if torch.is_tensor(value) else value
            continue
        shapes = {tuple(sd[key].shape) for sd in state_dicts}
        if len(shapes) > 1:
            raise ValueError(f"state dicts disagree on the shape of {key!r}: {sorted(shapes)}")
        stacked = torch.stack([sd[key].detach().to(device="cpu", dtype=torch.float64) for sd in state_dicts])
        soup[key] = stacked.mean(dim=0).to(value.dtype)
    return soup


def snapshot_epochs(n_snapshots: int, start_epoch: int, max_epochs: int) -> list[int]:
    """`n_snapshots` 0-based epochs spread evenly from `start_epoch` to the last epoch (inclusive)."""
    if n_snapshots < 1:
        raise ValueError(f"n_snapshots must be >= 1, got {n_snapshots}")
    if not 0 <= start_epoch < max_epochs:
        raise ValueError(f"start_epoch {start_epoch} must lie in [0, max_epochs={max_epochs})")
    spread = np.linspace(start_epoch, max_epochs - 1, num=n_snapshots)
    return sorted({round(float(epoch)) for epoch in spread})


class SnapshotCallback(Callback):
    """Save the module's state dict (CPU tensors, atomic torch.save) at chosen epochs, for a later soup.

    Either `every_n_epochs` from `start_epoch` on, or an explicit 0-based `epochs` list. Files are
    `<directory>/snapshot-epoch<NNN>.pt`; only the global rank 0 process writes.
    """

    def __init__(
        self,
        directory: str | Path,
        every_n_epochs: int | None = None,
        epochs: Sequence[int] | None = None,
        start_epoch: int = 0,
    ) -> None:
        if (every_n_epochs is None) == (epochs is None):
            raise ValueError("SnapshotCallback takes exactly one of every_n_epochs or epochs")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.directory = Path(directory)
        self.every_n_epochs = every_n_epochs
        self.epochs = sorted(set(epochs)) if epochs is not None else None
        self.start_epoch = start_epoch
        self.saved: list[str] = []

    def should_save(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch in self.epochs
        assert self.every_n_epochs is not None
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or not self.should_save(epoch) or not trainer.is_global_zero:
            return
        self.saved.append(
            str(save_state_dict(pl_module.state_dict(), self.directory / f"snapshot-epoch{epoch:03d}.pt"))
        )

    def state_dict(self) -> dict[str, Any]:
        return {"saved": list(self.saved)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = list(state_dict.get("saved", []))


class FinalWeightsCallback(Callback):
    """At the end of fit, save every candidate for the final weights to `directory` as `<name>.pt`.

    Candidates: ``swa`` (the SWA average, which Lightning has put into the module by then) or, without
    SWA, ``last`` (the last step's weights); ``ema`` (the EMA averages); ``soup`` (the uniform soup of
    the snapshots). The module keeps its weights; `workbench.train.final` scores the candidates on the
    validation split and loads the one the rule picks. Saving to files from the process that trained
    hands them to the main process also when DDP launchers train in child processes.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self.saved: dict[str, Path] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.directory is None or not trainer.is_global_zero:
            return
        swa = any(
            isinstance(callback, StochasticWeightAveraging) and getattr(callback, "_average_model", None) is not None
            for callback in trainer.callbacks  # type: ignore[attr-defined]
        )
        self.saved = {}
        self.saved["swa" if swa else "last"] = save_state_dict(
            pl_module.state_dict(), self.directory / f"{'swa' if swa else 'last'}.pt"
        )
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, EMACallback) and callback.ema.initialized:
                with callback.ema.swapped_in(pl_module):
                    self.saved["ema"] = save_state_dict(pl_module.state_dict(), self.directory / "ema.pt")
            if isinstance(callback, SnapshotCallback) and callback.saved:
                self.saved["soup"] = save_state_dict(
                    soup_from_directory(callback.directory), self.directory / "soup.pt"
                )


def save_state_dict(state: Mapping[str, Any], path: Path) -> Path:
    """torch.save a state dict with CPU tensors, atomically."""
    cpu_state = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(cpu_state, buffer)
    return write_bytes_atomic(Path(path), buffer.getvalue())


def load_snapshots(directory: str | Path) -> list[dict[str, Any]]:
    """All `snapshot-epoch*.pt` state dicts of a directory, in epoch order (loaded with weights_only=True)."""
    directory = Path(directory)
    files = sorted(directory.glob("snapshot-epoch*.pt"))
    if not files:
        raise FileNotFoundError(f"no snapshot-epoch*.pt files in {directory}; was SnapshotCallback enabled?")
    return [torch.load(file, map_location="cpu", weights_only=True) for file in files]


def soup_from_directory(directory: str | Path) -> dict[str, Any]:
    """Uniform soup of every snapshot saved in `directory`."""
    return uniform_soup(load_snapshots(directory))


def build_snapshot_callback(cfg: SwaConfig, max_epochs: int, directory: str | Path) -> SnapshotCallback | None:
    """Snapshots for `cfg.soup_snapshots` > 0: evenly spread from the SWA start epoch to the last epoch."""
    if cfg.soup_snapshots == 0:
        return None
    return SnapshotCallback(
        directory, epochs=snapshot_epochs(cfg.soup_snapshots, swa_start_epoch(cfg, max_epochs), max_epochs)
    )


def swa_start_epoch(cfg: SwaConfig, max_epochs: int) -> int:
    """0-based first SWA epoch, as Lightning computes it from a fraction: max(int(fraction * max_epochs) - 1, 0)."""
    return max(int(cfg.start_fraction * max_epochs) - 1, 0)


def build_swa_callback(cfg: SwaConfig, max_epochs: int) -> StochasticWeightAveraging | None:
    """Lightning's StochasticWeightAveraging from `train.swa` (None when disabled).

    SWA starts at `start_fraction` of `max_epochs` with a cosine anneal over `anneal_epochs` to `lr`;
    it then replaces the configured lr scheduler and, at the end of training, loads the averaged
    weights into the model (BatchNorm statistics are recomputed by one extra pass).
    """
    if not cfg.enabled:
        return None
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1 for SWA, got {max_epochs}")
    return StochasticWeightAveraging(
        swa_lrs=cfg.lr,
        swa_epoch_start=float(cfg.start_fraction),
        annealing_epochs=cfg.anneal_epochs,
        annealing_strategy="cos",
    )

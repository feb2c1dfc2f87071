"""The Lightning task that trains a segmentation model.

Like TorchGeo's trainers, the task is assembled from three hooks - `configure_models`,
`configure_losses` and `configure_metrics` - so a new architecture or loss is a parameter
change, not a new training class.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from workbench.data.dataset import Sample, loss_mask
from workbench.params import ModelParams, TrainParams


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the offending chip ids are saved next to the logs."""


class PixelCounts(nn.Module):
    """Pooled confusion counts over valid pixels at a fixed threshold (a tiny metric state)."""

    counts: torch.Tensor

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        self.register_buffer("counts", torch.zeros(4, dtype=torch.float64), persistent=False)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        pred = torch.sigmoid(logits[:, 0].float()) > self.threshold
        truth = target > 0.5
        tp = (pred & truth & mask).sum()
        fp = (pred & ~truth & mask).sum()
        fn = (~pred & truth & mask).sum()
        tn = (~pred & ~truth & mask).sum()
        self.counts += torch.stack([tp, fp, fn, tn]).double()

    def compute(self) -> dict[str, float]:
        tp, fp, fn, _ = (float(v) for v in self.counts)
        return {
            "iou": tp / (tp + fp + fn) if tp + fp + fn else float("nan"),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
        }


class SegmentationTask(L.LightningModule):
    """Binary semantic segmentation with a composite loss on valid pixels."""

    def __init__(
        self,
        model_params: dict[str, Any],
        train_params: dict[str, Any],
        in_channels: int,
        band_names: list[str],
        modalities: list[str],
        data_pos_weight: float | None = None,
        steps_per_epoch: int = 1,
        failure_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = ModelParams.model_validate(model_params)
        self.train_cfg = TrainParams.model_validate(train_params)
        self.failure_dir = Path(failure_dir) if failure_dir else None
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # hooks -------------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the network from the model parameters."""
        from workbench.models.factory import build_model

        hp = self.hparams
        self.model = build_model(self.model_cfg, hp["in_channels"], hp["band_names"], hp["modalities"])

    def configure_losses(self) -> None:
        """Build the weighted loss terms."""
        from workbench.train.losses import build_loss

        self.criterion = build_loss(self.train_cfg.loss, data_pos_weight=self.hparams["data_pos_weight"])

    def configure_metrics(self) -> None:
        """One pixel counter per stage (pooled IoU, F1, precision, recall at 0.5)."""
        self.stage_counts = nn.ModuleDict({f"{stage}_pixels": PixelCounts() for stage in ("train", "val", "test")})

    # forward / steps ----------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(image)
        return logits

    def _shared_step(self, batch: Sample, stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        mask = loss_mask(batch)
        loss, parts = self.criterion(logits.float(), batch["target"].float(), mask)
        if not torch.isfinite(loss):
            self._save_failure(batch, stage)
            raise NonFiniteLossError(
                f"{stage} loss is {float(loss)} at epoch {self.current_epoch}, step {self.global_step}; "
                f"chip ids saved to {self.failure_dir}/nonfinite_batch.json (lower the learning rate, "
                "use bf16 instead of fp16, or check those chips for bad values)"
            )
        counter = self.stage_counts[f"{stage}_pixels"]
        assert isinstance(counter, PixelCounts)
        counter.update(logits, batch["target"], mask)
        batch_size = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=batch_size, sync_dist=stage != "train")
        for name, value in parts.items():
            self.log(f"{stage}/loss_{name}", value, batch_size=batch_size, sync_dist=stage != "train")
        return loss

    def _save_failure(self, batch: Sample, stage: str) -> None:
        if self.failure_dir is None:
            return
        from workbench.io import write_json_atomic

        indices = batch["index"].tolist() if torch.is_tensor(batch["index"]) else list(batch["index"])
        info = {"stage": stage, "epoch": self.current_epoch, "step": self.global_step, "chip_index": indices}
        write_json_atomic(self.failure_dir / "nonfinite_batch.json", info)

    def training_step(self, batch: Sample, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Sample, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Sample, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        counter = self.stage_counts[f"{stage}_pixels"]
        assert isinstance(counter, PixelCounts)
        if self.trainer.world_size > 1:
            gathered = self.all_gather(counter.counts)
            assert isinstance(gathered, torch.Tensor)
            counter.counts = gathered.reshape(-1, 4).sum(0)
        for name, value in counter.compute().items():
            if not math.isnan(value):
                self.log(f"{stage}/{name}", value, prog_bar=name == "iou" and stage != "train", rank_zero_only=True)
        counter.reset()

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "epoch"):
            dataset.epoch = self.current_epoch

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # optimisation -------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        from workbench.train.optim import build_param_groups, build_scheduler

        cfg = self.train_cfg.optimizer
        groups = build_param_groups(
            self.model,
            cfg,
            backbone_prefix=getattr(self.model, "backbone_prefix", "encoder"),
            num_layers=getattr(self.model, "num_backbone_layers", None),
        )
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        scheduler = build_scheduler(
            optimizer, cfg, steps_per_epoch=self.hparams["steps_per_epoch"], max_epochs=self.train_cfg.max_epochs
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def param_group_table(self) -> Any:
        """The optimiser's groups with their effective learning rates (for the model card)."""
        from workbench.train.optim import build_param_groups, describe_param_groups

        groups = build_param_groups(
            self.model,
            self.train_cfg.optimizer,
            backbone_prefix=getattr(self.model, "backbone_prefix", "encoder"),
            num_layers=getattr(self.model, "num_backbone_layers", None),
        )
        return describe_param_groups(groups)


def dump_hparams(task: SegmentationTask) -> str:
    """Task hyper-parameters as JSON text (for logs)."""
    return json.dumps(dict(task.hparams), indent=2, default=str)

"""The Lightning task that trains a segmentation model.

Like TorchGeo's trainers, the task is assembled from three hooks - `configure_models`,
`configure_losses` and `configure_metrics` - so a new architecture or loss is a parameter
change, not a new training class.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from workbench.data.dataset import Sample, loss_mask, target_from_label
from workbench.data.sampling import positive_chips
from workbench.evaluate.metrics import PrevalenceEvaluator, ThresholdHistogram, per_chip_histograms
from workbench.functional import metrics_from_counts, multiclass_summary
from workbench.io import write_json_atomic
from workbench.models.factory import build_model
from workbench.params import ModelParams, TrainParams, resolve_classes
from workbench.train.losses import build_loss
from workbench.train.optim import build_param_groups, build_scheduler, describe_param_groups

PR_BINS = 100
"""Probability bins of the per-chip validation histograms behind val/pr_auc (cheap: 2 x 100 counts per chip)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the offending chip ids are saved next to the logs."""


class PixelCounts(nn.Module):
    """Pooled confusion counts over valid pixels at a fixed threshold (a tiny metric state)."""

    counts: torch.Tensor

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        # persistent: a checkpoint taken mid-epoch resumes with the counts of the batches already seen
        self.register_buffer("counts", torch.zeros(4, dtype=torch.float64))

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
        tp, fp, fn, tn = (float(v) for v in self.counts)
        return metrics_from_counts(tp, fp, fn, tn, metrics=("iou", "f1", "precision", "recall"))


class ClassCounts(nn.Module):
    """Pooled (C, C) confusion counts [label, argmax prediction] over valid pixels of a softmax model."""

    counts: torch.Tensor

    def __init__(self, class_names: list[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.register_buffer("counts", torch.zeros(n, n, dtype=torch.float64))

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        n = len(self.class_names)
        pred = logits.argmax(dim=1)[mask]
        truth = target[mask].long()
        cells = torch.bincount(truth * n + pred, minlength=n * n)
        self.counts += cells.reshape(n, n).double()

    def compute(self) -> dict[str, float]:
        """mIoU (also under `iou`, so `val/iou` monitors work unchanged), mIoU without background,
        overall accuracy and per-class IoU / F1 (NaN for a class absent from label and prediction)."""
        summary = multiclass_summary(self.counts.cpu().numpy().round().astype(np.int64), self.class_names)
        out = {key: float(value) for key, value in summary.items() if key != "absent_classes"}
        out = {k: v for k, v in out.items() if not k.startswith(("precision.", "recall."))}
        out["iou"] = out["miou"]
        return out


class SegmentationTask(L.LightningModule):
    """Semantic segmentation with a composite loss on valid pixels: binary (one logit, sigmoid) or, with
    `model.num_classes` >= 2, softmax over classes (targets are the label's class ids; validation logs
    `val/miou` (= `val/iou`), `val/miou_no_background`, `val/overall_accuracy` and `val/iou.<class>`).

    Validation also logs the PR-AUC of the pooled validation pixels (`val/pr_auc`) and at chip
    prevalences 1:r (`val/pr_auc_<r>` for r in 1 and `prevalences`), from per-chip probability
    histograms re-weighted by `PrevalenceEvaluator`; a chip is positive when its labelled foreground
    fraction is at least `positive_threshold` (the samplers' rule). `chip_ids` (store position ->
    chip id, set after construction) lets a non-finite loss report the chips of its batch by id.
    """

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
        prevalences: list[int] | None = None,
        positive_threshold: float = 0.0,
        normalization: dict[str, Any] | None = None,
        class_pixel_counts: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = ModelParams.model_validate(model_params)
        self.train_cfg = TrainParams.model_validate(train_params)
        self.failure_dir = Path(failure_dir) if failure_dir else None
        self.prevalences = [int(r) for r in (prevalences if prevalences is not None else [200, 500, 1000])]
        self.positive_threshold = float(positive_threshold)
        self.chip_ids: np.ndarray | None = None
        self._val_pos: list[np.ndarray] = []
        self._val_neg: list[np.ndarray] = []
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # hooks -------------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the network from the model parameters."""

        hp = self.hparams
        self.model = build_model(self.model_cfg, hp["in_channels"], hp["band_names"], hp["modalities"])

    def configure_losses(self) -> None:
        """Build the weighted loss terms."""

        self.criterion = build_loss(
            self.train_cfg.loss,
            data_pos_weight=self.hparams["data_pos_weight"],
            num_classes=self.model_cfg.num_classes,
            class_pixel_counts=self.hparams.get("class_pixel_counts"),
        )

    @property
    def multiclass(self) -> bool:
        """Whether the model is a softmax model (num_classes >= 2)."""
        return self.model_cfg.num_classes >= 2

    def configure_metrics(self) -> None:
        """One pixel counter per stage (binary: pooled IoU, F1, precision, recall at 0.5; softmax: a confusion
        matrix)."""
        names = [spec.name for spec in resolve_classes(self.model_cfg)]
        self.stage_counts = nn.ModuleDict(
            {
                f"{stage}_pixels": ClassCounts(names) if self.multiclass else PixelCounts()
                for stage in ("train", "val", "test")
            }
        )

    # forward / steps ----------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(image)
        return logits

    def _shared_step(self, batch: Sample, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one batch (logged) and the logits; a non-finite loss saves the batch's chips and stops."""
        logits = self(batch["image"])
        mask = loss_mask(batch)
        if self.multiclass:
            target = target_from_label(batch["label"], self.model_cfg.num_classes)
        else:
            target = batch["target"].float()
        loss, parts = self.criterion(logits.float(), target, mask)
        finite = bool(torch.isfinite(loss.detach()))
        if not self._finite_on_every_rank(finite):
            saved = self._save_failure(batch, stage, float(loss.detach()))
            where = f"chip ids saved to {saved}" if saved else "no failure directory set"
            what = (
                f"{stage} loss is {float(loss.detach())}"
                if not finite
                else f"{stage} loss of another process is not finite"
            )
            raise NonFiniteLossError(
                f"{what} at epoch {self.current_epoch}, step {self.global_step}; "
                f"{where} (lower the learning rate, use bf16 instead of fp16, or check those chips for bad values)"
            )
        counter = self.stage_counts[f"{stage}_pixels"]
        assert isinstance(counter, PixelCounts | ClassCounts)
        counter.update(logits, target if self.multiclass else batch["target"], mask)
        batch_size = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=batch_size, sync_dist=stage != "train")
        for name, value in parts.items():
            self.log(f"{stage}/loss_{name}", value, batch_size=batch_size, sync_dist=stage != "train")
        return loss, logits

    def _finite_on_every_rank(self, finite: bool) -> bool:
        """Whether the loss is finite on every process, so that all of them stop together.

        Under DDP a process that stopped alone would leave the others waiting in their next collective
        call until the timeout; one all-reduce of a flag per step lets every process stop at the same step.
        """
        if self._trainer is None or self.trainer.world_size <= 1:
            return finite
        return bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))

    def _save_failure(self, batch: Sample, stage: str, loss: float) -> Path | None:
        """Write the batch's store positions and chip ids to `<failure_dir>/nonfinite_batch.json`.

        Under DDP every process writes its own batch (`nonfinite_batch_rank<r>.json` beyond rank 0),
        the one with the non-finite loss and those that stopped with it.
        """
        if self.failure_dir is None:
            return None

        indices = [int(i) for i in (batch["index"].tolist() if torch.is_tensor(batch["index"]) else batch["index"])]
        info: dict[str, Any] = {
            "stage": stage,
            "epoch": self.current_epoch,
            "step": self.global_step,
            "loss": str(loss),
            "chip_index": indices,
        }
        if self.chip_ids is not None:
            info["chip_id"] = [str(self.chip_ids[i]) for i in indices]
        image = batch["image"].detach()
        info["nonfinite_input_chips"] = [
            int(i) for i, ok in zip(indices, torch.isfinite(image).flatten(1).all(1).tolist(), strict=True) if not ok
        ]
        rank = self.global_rank if self._trainer is not None else 0
        name = "nonfinite_batch.json" if rank == 0 else f"nonfinite_batch_rank{rank}.json"
        return write_json_atomic(self.failure_dir / name, info)

    def training_step(self, batch: Sample, batch_idx: int) -> torch.Tensor:
        loss, _ = self._shared_step(batch, "train")
        return loss

    def validation_step(self, batch: Sample, batch_idx: int) -> None:
        _, logits = self._shared_step(batch, "val")
        self._collect_histograms(logits, batch)

    def test_step(self, batch: Sample, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    # ranking metrics ------------------------------------------------------------
    def _collect_histograms(self, logits: torch.Tensor, batch: Sample) -> None:
        """Per-chip probability histograms of positive and negative pixels (valid and labelled only; binary)."""
        if self.multiclass:
            return

        prob = torch.sigmoid(logits[:, 0].detach().float()).cpu().numpy()
        pos, neg = per_chip_histograms(prob, batch["label"].cpu().numpy(), batch["valid"].cpu().numpy(), PR_BINS)
        self._val_pos.append(pos)
        self._val_neg.append(neg)

    def _gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Concatenate a per-chip array over all processes (ranks may hold different numbers of chips)."""
        if self.trainer.world_size <= 1:
            return rows
        local = torch.as_tensor(rows, device=self.device)
        sizes = self.all_gather(torch.tensor([local.shape[0]], device=self.device))
        assert isinstance(sizes, torch.Tensor)
        sizes = sizes.reshape(-1)
        padded = local.new_zeros((int(sizes.max()), *local.shape[1:]))
        padded[: local.shape[0]] = local
        gathered = self.all_gather(padded)
        assert isinstance(gathered, torch.Tensor)
        parts = [gathered[rank, : int(size)] for rank, size in enumerate(sizes.tolist())]
        return torch.cat(parts).cpu().numpy()

    def prevalence_pr_auc(self, pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
        """PR-AUC of the pooled pixels and at chip ratios 1:1 and 1:r for r in `prevalences`."""

        scores = {"pr_auc": ThresholdHistogram.from_counts(pos.sum(0), neg.sum(0)).pr_auc()}
        labelled = pos.sum(1) + neg.sum(1)
        fraction = np.divide(pos.sum(1), labelled, out=np.zeros(len(pos)), where=labelled > 0)
        is_positive = positive_chips(fraction, self.positive_threshold)
        if is_positive.any() and not is_positive.all():
            ratios = list(dict.fromkeys([1, *self.prevalences]))
            table = PrevalenceEvaluator(pos, neg, is_positive).evaluate(ratios, threshold=0.5)
            for ratio, value in zip(ratios, table["pr_auc"], strict=True):
                scores[f"pr_auc_{ratio}"] = float(value)
        return scores

    def on_validation_epoch_start(self) -> None:
        self._val_pos, self._val_neg = [], []

    def _log_ranking_metrics(self) -> None:
        if not self._val_pos:
            return
        pos = self._gather_rows(np.concatenate(self._val_pos))
        neg = self._gather_rows(np.concatenate(self._val_neg))
        self._val_pos, self._val_neg = [], []
        for name, value in self.prevalence_pr_auc(pos, neg).items():
            if not math.isnan(value):
                self.log(f"val/{name}", value, sync_dist=True)

    def _log_epoch_metrics(self, stage: str) -> None:
        counter = self.stage_counts[f"{stage}_pixels"]
        assert isinstance(counter, PixelCounts | ClassCounts)
        if self.trainer.world_size > 1:
            gathered = self.all_gather(counter.counts)
            assert isinstance(gathered, torch.Tensor)
            counter.counts = gathered.reshape(-1, *counter.counts.shape).sum(0)
        # every rank holds the same gathered counts, so every rank logs them (callbacks such as
        # ModelCheckpoint and early stopping read the metric on all ranks); averaging equal values is exact
        for name, value in counter.compute().items():
            if not math.isnan(value):
                prog_bar = name == ("miou" if self.multiclass else "iou") and stage != "train"
                self.log(f"{stage}/{name}", value, prog_bar=prog_bar, sync_dist=True)
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
        self._log_ranking_metrics()

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # optimisation -------------------------------------------------------------
    def configure_optimizers(self) -> Any:

        cfg = self.train_cfg.optimizer
        groups = build_param_groups(
            self.model,
            cfg,
            backbone_prefix=getattr(self.model, "backbone_prefix", "encoder"),
            num_layers=getattr(self.model, "num_backbone_layers", None),
        )
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        stopping = self.train_cfg.early_stopping
        # the plateau schedule maximises its monitor: follow the early-stopping metric when it is maximised too
        monitor = stopping.monitor if stopping.enabled and stopping.mode == "max" else "val/iou"
        scheduler = build_scheduler(
            optimizer,
            cfg,
            steps_per_epoch=self.hparams["steps_per_epoch"],
            max_epochs=self.train_cfg.max_epochs,
            monitor=monitor,
            val_every_n_epochs=self.train_cfg.val_every_n_epochs,
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def param_group_table(self) -> Any:
        """The optimiser's groups with their effective learning rates (for the model card)."""

        groups = build_param_groups(
            self.model,
            self.train_cfg.optimizer,
            backbone_prefix=getattr(self.model, "backbone_prefix", "encoder"),
            num_layers=getattr(self.model, "num_backbone_layers", None),
        )
        return describe_param_groups(groups)

"""Optimiser parameter groups, backbone freezing and learning-rate schedules.

Learning rates per group (decoder/head = ``cfg.lr``, the base):

* backbone parameters: ``lr * backbone_lr_mult``;
* with layer-wise decay (``layer_decay < 1``) on a ViT-like backbone of L blocks, block i gets
  ``lr * backbone_lr_mult * layer_decay ** (L - i)``; everything of the backbone before block 0
  (patch / positional embeddings, cls token) gets ``layer_decay ** (L + 1)``, and backbone parameters
  after the last block (a final norm) get no decay factor. With lr 6e-5, mult 0.25, decay 0.9 and
  24 blocks this gives block i ``6e-5 * 0.25 * 0.9 ** (24 - i)`` and the embeddings ``0.9 ** 25``.

Compounded multipliers can silently freeze an encoder (a backbone at 0.27 % of the decoder's rate
cost one model 13 IoU points), so `describe_param_groups` and `warn_tiny_lr` make the ratios visible.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from workbench.params import OptimizerConfig

DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:blocks|layers|layer|encoder)\.(\d+)\."
"""Where a block index sits in a parameter name (after the backbone prefix); the first match counts.

Matches timm ViTs (``blocks.3.``), HF-style ``layers.3.`` / ``layer.3.`` and TerraMind (``encoder.3.``).
"""

_NO_DECAY_TOKENS = {"pos_embed", "cls_token", "mask_token", "register_tokens", "dist_token"}
_NORM_TOKEN = re.compile(r"^(bn|ln|gn)\d*(_\w+)?$")


# --------------------------------------------------------------------------- parameter groups


def _under_prefix(name: str, prefix: str) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def _embedding_param_ids(model: nn.Module) -> set[int]:
    """Ids of the weights of embedding tables (nn.Embedding), which get no weight decay."""
    return {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}


def is_no_decay(name: str, param: torch.Tensor, embedding_ids: set[int] | None = None) -> bool:
    """True for parameters that should not be weight-decayed.

    Biases and every 1-D parameter (norm scales and shifts), parameters of norm layers (a name part
    containing 'norm' or named bn*/ln*/gn*), positional embeddings, cls/mask/register tokens and
    embedding tables.
    """
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    for part in name.lower().split("."):
        if part in _NO_DECAY_TOKENS or "pos_emb" in part or "position_embedding" in part:
            return True
        if "norm" in part or _NORM_TOKEN.match(part):
            return True
    return embedding_ids is not None and id(param) in embedding_ids


@dataclass(frozen=True)
class _Placement:
    """Which section of the network a parameter belongs to and its learning-rate scale."""

    section: str
    order: int
    lr_scale: float


def _backbone_placements(
    names: list[str], prefix: str, cfg: OptimizerConfig, num_layers: int | None, block_pattern: str
) -> dict[str, _Placement]:
    """Learning-rate scale of every backbone parameter (backbone_lr_mult times the layer decay)."""
    pattern = re.compile(block_pattern)
    blocks: dict[str, int | None] = {}
    for name in names:
        match = pattern.search(name[len(prefix) :])
        blocks[name] = int(match.group(1)) if match else None
    found = [block for block in blocks.values() if block is not None]
    mult = cfg.backbone_lr_mult
    if not found or cfg.layer_decay == 1.0:
        return {name: _Placement("backbone", 1, mult) for name in names}
    depth = max(found) + 1 if num_layers is None else num_layers
    if max(found) >= depth:
        raise ValueError(f"num_layers={num_layers} but the backbone has a block {max(found)} (0-based)")
    first = next(i for i, name in enumerate(names) if blocks[name] is not None)
    placements = {}
    for position, name in enumerate(names):
        block = blocks[name]
        if block is not None:
            placements[name] = _Placement(
                f"backbone.block{block:02d}", 2 + block, mult * cfg.layer_decay ** (depth - block)
            )
        elif position < first:
            placements[name] = _Placement("backbone.embed", 1, mult * cfg.layer_decay ** (depth + 1))
        else:
            placements[name] = _Placement("backbone.post", 2 + depth, mult)
    return placements


def build_param_groups(
    model: nn.Module,
    cfg: OptimizerConfig,
    backbone_prefix: str = "encoder",
    num_layers: int | None = None,
    block_pattern: str = DEFAULT_BLOCK_PATTERN,
    include_frozen: bool = True,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: decoder/head at cfg.lr, backbone scaled (see the module docstring).

    Parameters named `<backbone_prefix>.*` form the backbone. Each group carries "name", "lr",
    "initial_lr", "weight_decay" and "lr_scale" (lr / cfg.lr); bias/norm/embedding parameters sit in
    "<name>.no_decay" groups with weight decay 0. `num_layers` defaults to the highest block index + 1.
    With `include_frozen`, parameters that currently do not require grad are included too, so a
    backbone frozen for the first epochs is still optimised once it is unfrozen (AdamW skips
    parameters without a gradient).
    """
    named = [(n, p) for n, p in model.named_parameters() if include_frozen or p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter to optimise")
    backbone_names = [n for n, _ in named if _under_prefix(n, backbone_prefix)]
    placements = _backbone_placements(backbone_names, backbone_prefix, cfg, num_layers, block_pattern)
    embedding_ids = _embedding_param_ids(model)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    orders: dict[tuple[str, bool], int] = {}
    for name, param in named:
        placement = placements.get(name, _Placement("decoder", 0, 1.0))
        no_decay = is_no_decay(name, param, embedding_ids)
        key = (placement.section, no_decay)
        if key not in groups:
            lr = cfg.lr * placement.lr_scale
            groups[key] = {
                "params": [],
                "name": placement.section + (".no_decay" if no_decay else ""),
                "lr": lr,
                "initial_lr": lr,
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "lr_scale": placement.lr_scale,
            }
            orders[key] = placement.order
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (orders[k], k[1]))]


def describe_param_groups(groups: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per group: name, n_params, lr, weight_decay and lr_ratio (lr / decoder lr), for the model card."""
    decoder_lrs = [g["lr"] for g in groups if str(g.get("name", "")).startswith("decoder")]
    reference = max(decoder_lrs) if decoder_lrs else max(g["lr"] for g in groups)
    rows = [
        {
            "name": group.get("name", f"group{i}"),
            "n_params": sum(p.numel() for p in group["params"]),
            "lr": group["lr"],
            "weight_decay": group.get("weight_decay", 0.0),
            "lr_ratio": group["lr"] / reference,
        }
        for i, group in enumerate(groups)
    ]
    return pd.DataFrame(rows, columns=["name", "n_params", "lr", "weight_decay", "lr_ratio"])


def warn_tiny_lr(table: pd.DataFrame, ratio: float = 1e-2) -> list[str]:
    """Warnings for groups learning at less than `ratio` times the decoder's learning rate."""
    warnings = []
    for record in table.to_dict("records"):
        n_params, lr, lr_ratio = int(record["n_params"]), float(record["lr"]), float(record["lr_ratio"])
        if n_params > 0 and lr_ratio < ratio:
            warnings.append(
                f"parameter group {record['name']!r} ({n_params:,} parameters) learns at lr {lr:.3g}, "
                f"{lr_ratio:.3%} of the decoder's; backbone_lr_mult x layer_decay may be freezing it "
                f"(warning threshold {ratio:g})"
            )
    return warnings


def set_backbone_trainable(model: nn.Module, trainable: bool, backbone_prefix: str = "encoder") -> int:
    """Freeze or unfreeze every parameter named `<backbone_prefix>.*`; returns how many tensors it touched."""
    touched = 0
    for name, param in model.named_parameters():
        if _under_prefix(name, backbone_prefix):
            param.requires_grad_(trainable)
            touched += 1
    if touched == 0:
        raise ValueError(f"no parameter is named {backbone_prefix!r}.*: cannot freeze/unfreeze the backbone")
    return touched


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class WarmupSchedule:
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine or constant.

    Warm-up goes linearly from `start_factor` at step 0 to 1 at `warmup_steps`; cosine then decays to
    `final_factor` at `total_steps` (and stays there); constant stays at 1.
    """

    kind: Literal["cosine", "constant"]
    warmup_steps: int
    total_steps: int
    start_factor: float
    final_factor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class FreezeSchedule:
    """Seed 001's two phases: backbone frozen for `freeze_epochs` (decoder at `frozen_lr`), then fine-tuning.

    Phase 1 (epoch < freeze_epochs): the backbone is frozen and the decoder runs at the constant
    `frozen_lr` (or `base_lr` when None). Phase 2 starts at `boundary_step` = freeze_epochs *
    steps_per_epoch; there the warm-up + cosine schedule restarts from its own step 0, so warm-up
    happens right after unfreezing.
    """

    freeze_epochs: int
    steps_per_epoch: int
    base_lr: float
    frozen_lr: float | None = None

    @property
    def boundary_step(self) -> int:
        return self.freeze_epochs * self.steps_per_epoch

    def backbone_frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen during `epoch` (0-based)."""
        return epoch < self.freeze_epochs

    def decoder_lr(self, epoch: int) -> float | None:
        """The decoder's constant lr during a frozen epoch; None once the normal schedule runs."""
        if not self.backbone_frozen(epoch):
            return None
        return self.base_lr if self.frozen_lr is None else self.frozen_lr


@dataclass(frozen=True)
class GroupMultiplier(WarmupSchedule):
    """LambdaLR multiplier of one parameter group, composed from the global step and the freeze boundary.

    Before `boundary_step`: 0 for backbone groups (frozen), `frozen_factor` (frozen_lr / base lr) for the
    others. From the boundary on: the warm-up schedule evaluated at `step - boundary_step`. Only plain
    numbers are stored, so the scheduler's state dict loads with torch.load(weights_only=True).
    """

    boundary_step: int = 0
    frozen_factor: float = 1.0
    is_backbone: bool = False

    def __call__(self, step: int) -> float:
        if step < self.boundary_step:
            return 0.0 if self.is_backbone else self.frozen_factor
        return super().__call__(step - self.boundary_step)


def _is_backbone_group(group: dict[str, Any]) -> bool:
    return str(group.get("name", "")).startswith("backbone")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimizerConfig,
    steps_per_epoch: int,
    max_epochs: int,
    monitor: str = "val/iou",
    val_every_n_epochs: int = 1,
) -> dict[str, Any]:
    """Lightning lr-scheduler config for `cfg.scheduler`.

    cosine / constant: a per-step LambdaLR (warm-up over warmup_epochs * steps_per_epoch steps from
    warmup_start_factor; cosine down to min_lr at the last step). min_lr is the decoder's floor; every
    group decays by the same factor (min_lr / lr), so ratios between groups are kept. With
    freeze_backbone_epochs > 0 the schedule follows `FreezeSchedule` (groups named backbone* get lr 0
    while frozen). plateau: ReduceLROnPlateau on `monitor` (mode max), stepped each validation epoch.
    `steps_per_epoch` must count optimiser steps (batches / gradient accumulation).
    """
    if steps_per_epoch < 1 or max_epochs < 1:
        raise ValueError(f"steps_per_epoch and max_epochs must be >= 1, got {steps_per_epoch} and {max_epochs}")
    if cfg.scheduler == "plateau":
        return _plateau_scheduler(optimizer, cfg, monitor, val_every_n_epochs)
    freeze = FreezeSchedule(cfg.freeze_backbone_epochs, steps_per_epoch, cfg.lr, cfg.frozen_lr)
    phase_steps = max_epochs * steps_per_epoch - freeze.boundary_step
    if phase_steps <= 0:
        raise ValueError(
            f"optimizer.freeze_backbone_epochs={cfg.freeze_backbone_epochs} leaves no epoch to train the "
            f"backbone in train.max_epochs={max_epochs}"
        )
    multipliers = [
        GroupMultiplier(
            kind="cosine" if cfg.scheduler == "cosine" else "constant",
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            total_steps=phase_steps,
            start_factor=cfg.warmup_start_factor,
            final_factor=min(1.0, cfg.min_lr / cfg.lr),
            boundary_step=freeze.boundary_step,
            frozen_factor=1.0 if cfg.frozen_lr is None else cfg.frozen_lr / cfg.lr,
            is_backbone=_is_backbone_group(group),
        )
        for group in optimizer.param_groups
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=multipliers)  # type: ignore[arg-type]
    return {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}


def _plateau_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, monitor: str, val_every_n_epochs: int
) -> dict[str, Any]:
    if cfg.warmup_epochs > 0 or cfg.frozen_lr is not None:
        raise ValueError(
            "optimizer.scheduler='plateau' does not combine with warmup_epochs or frozen_lr; "
            "use scheduler 'cosine' or 'constant' for a warm-up or a frozen-backbone learning rate"
        )
    min_lrs = [cfg.min_lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=min_lrs
    )
    return {
        "scheduler": scheduler,
        "interval": "epoch",
        "frequency": val_every_n_epochs,
        "monitor": monitor,
        "strict": True,
        "name": "lr",
    }

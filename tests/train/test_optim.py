"""Parameter groups with layer-wise decay, backbone freezing and learning-rate schedules."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from workbench.params import OptimizerConfig
from workbench.train.optim import (
    FreezeSchedule,
    build_param_groups,
    build_scheduler,
    describe_param_groups,
    set_backbone_trainable,
    warn_tiny_lr,
)


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim, bias=False)


class _MockViT(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, stride=2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([_Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)


class _Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _MockViT()
        self.decoder = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 1, 1))


CFG = OptimizerConfig(lr=1e-3, backbone_lr_mult=0.25, layer_decay=0.9, weight_decay=0.05)


def _expected_lr(name: str, depth: int = 4, cfg: OptimizerConfig = CFG) -> float:
    """Hand-written rule: block i -> lr*mult*decay^(L-i); embeddings decay^(L+1); final norm mult; decoder lr."""
    if name.startswith("decoder."):
        return cfg.lr
    if name.startswith("encoder.blocks."):
        block = int(name.split(".")[2])
        return cfg.lr * cfg.backbone_lr_mult * cfg.layer_decay ** (depth - block)
    if name.startswith("encoder.norm."):
        return cfg.lr * cfg.backbone_lr_mult
    return cfg.lr * cfg.backbone_lr_mult * cfg.layer_decay ** (depth + 1)


def _group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


def test_layer_wise_decay_rates() -> None:
    model = _Segmenter()
    groups = build_param_groups(model, CFG, backbone_prefix="encoder")
    by_param = _group_of(groups)
    for name, param in model.named_parameters():
        assert by_param[id(param)]["lr"] == pytest.approx(_expected_lr(name), rel=1e-12), name
        assert by_param[id(param)]["initial_lr"] == by_param[id(param)]["lr"]
    # spot check against the closed form written out: block 1 of 4 -> 1e-3 * 0.25 * 0.9^3
    block1 = by_param[id(model.get_parameter("encoder.blocks.1.attn.weight"))]
    assert block1["lr"] == pytest.approx(1e-3 * 0.25 * 0.729)
    assert by_param[id(model.encoder.pos_embed)]["lr"] == pytest.approx(1e-3 * 0.25 * 0.9**5)


def test_explicit_num_layers_matches_cryosentinel_rule() -> None:
    model = _Segmenter()
    groups = build_param_groups(model, CFG, num_layers=24)
    by_param = _group_of(groups)
    assert by_param[id(model.get_parameter("encoder.blocks.3.attn.weight"))]["lr"] == pytest.approx(
        1e-3 * 0.25 * 0.9**21
    )
    assert by_param[id(model.encoder.cls_token)]["lr"] == pytest.approx(1e-3 * 0.25 * 0.9**25)
    with pytest.raises(ValueError, match="num_layers"):
        build_param_groups(model, CFG, num_layers=3)


def test_no_weight_decay_for_bias_norm_and_embeddings() -> None:
    model = _Segmenter()
    by_param = _group_of(build_param_groups(model, CFG))
    no_decay = {
        "encoder.patch_embed.bias",
        "encoder.pos_embed",
        "encoder.cls_token",
        "encoder.norm.weight",
        "encoder.norm.bias",
        "decoder.0.bias",
        "decoder.1.weight",
        "decoder.1.bias",
        "decoder.2.bias",
    } | {f"encoder.blocks.{i}.{part}" for i in range(4) for part in ("norm1.weight", "norm1.bias", "attn.bias")}
    for name, param in model.named_parameters():
        expected = 0.0 if name in no_decay else 0.05
        assert by_param[id(param)]["weight_decay"] == expected, name


def test_every_parameter_in_exactly_one_group() -> None:
    model = _Segmenter()
    groups = build_param_groups(model, CFG)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all({"name", "lr", "initial_lr", "weight_decay"} <= set(g) for g in groups)
    assert len({g["name"] for g in groups}) == len(groups)
    torch.optim.AdamW(groups, lr=CFG.lr)  # the groups are valid optimiser input


def test_frozen_backbone_parameters_are_still_grouped() -> None:
    model = _Segmenter()
    set_backbone_trainable(model, False)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    groups = build_param_groups(model, CFG)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    trainable_only = build_param_groups(model, CFG, include_frozen=False)
    assert all(not g["name"].startswith("backbone") for g in trainable_only)
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="backbone"):
        set_backbone_trainable(model, True, backbone_prefix="nothing")


def test_backbone_without_blocks_gets_plain_multiplier() -> None:
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.head = nn.Conv2d(4, 1, 1)
    by_param = _group_of(build_param_groups(model, CFG))
    assert by_param[id(model.encoder[0].weight)]["lr"] == pytest.approx(1e-3 * 0.25)
    assert by_param[id(model.head.weight)]["lr"] == pytest.approx(1e-3)


def test_describe_and_warn_tiny_lr() -> None:
    model = _Segmenter()
    table = describe_param_groups(build_param_groups(model, CFG))
    assert list(table.columns) == ["name", "n_params", "lr", "weight_decay", "lr_ratio"]
    assert table["n_params"].sum() == sum(p.numel() for p in model.parameters())
    decoder = table[table["name"] == "decoder"].iloc[0]
    assert decoder["lr_ratio"] == pytest.approx(1.0)
    assert warn_tiny_lr(table) == []
    # seed 000's first run: mult 0.05 and decay 0.85 over 24 blocks starve the encoder
    starved = OptimizerConfig(lr=5e-4, backbone_lr_mult=0.05, layer_decay=0.85)
    starved_table = describe_param_groups(build_param_groups(model, starved, num_layers=24))
    warnings = warn_tiny_lr(starved_table)
    block0 = starved_table[starved_table["name"] == "backbone.block00"].iloc[0]
    assert block0["lr_ratio"] == pytest.approx(0.05 * 0.85**24)
    assert any("backbone.block00" in w for w in warnings)
    assert not any("'decoder" in w for w in warnings)


# --------------------------------------------------------------------------- schedules


def _lrs_over_steps(optimizer: torch.optim.Optimizer, scheduler, n_steps: int) -> list[list[float]]:
    """Learning rates of every group before each optimiser step (step 0 .. n_steps)."""
    history = []
    for _ in range(n_steps + 1):
        history.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return history


def _cosine(step: int, base: float, min_lr: float, warmup: int, total: int, start: float) -> float:
    if step < warmup:
        return base * (start + (1 - start) * step / warmup)
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_cosine_with_warmup_closed_form() -> None:
    cfg = OptimizerConfig(lr=1e-3, backbone_lr_mult=0.25, warmup_epochs=2, warmup_start_factor=0.1, min_lr=1e-5)
    model = _Segmenter()
    groups = build_param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    config = build_scheduler(optimizer, cfg, steps_per_epoch=5, max_epochs=10)
    assert config["interval"] == "step"
    history = _lrs_over_steps(optimizer, config["scheduler"], 50)
    decoder = [g["name"] for g in groups].index("decoder")
    backbone = [g["name"] for g in groups].index("backbone")
    assert history[0][decoder] == pytest.approx(1e-4)
    assert history[10][decoder] == pytest.approx(1e-3)
    assert history[30][decoder] == pytest.approx((1e-3 + 1e-5) / 2)
    assert history[50][decoder] == pytest.approx(1e-5)
    for step in (3, 17, 42):
        assert history[step][decoder] == pytest.approx(_cosine(step, 1e-3, 1e-5, 10, 50, 0.1))
    for step in (0, 10, 30, 50):  # the backbone keeps its ratio to the decoder
        assert history[step][backbone] == pytest.approx(0.25 * history[step][decoder])


def test_constant_with_warmup() -> None:
    cfg = OptimizerConfig(lr=2e-3, scheduler="constant", warmup_epochs=1, warmup_start_factor=0.5)
    optimizer = torch.optim.AdamW(build_param_groups(_Segmenter(), cfg), lr=cfg.lr)
    history = _lrs_over_steps(optimizer, build_scheduler(optimizer, cfg, 4, 5)["scheduler"], 20)
    assert [h[0] for h in history[:5]] == pytest.approx([1e-3, 1.25e-3, 1.5e-3, 1.75e-3, 2e-3])
    assert history[20][0] == pytest.approx(2e-3)


def test_freeze_phase_then_warmup_and_cosine() -> None:
    cfg = OptimizerConfig(
        lr=1e-3, freeze_backbone_epochs=2, frozen_lr=5e-3, warmup_epochs=1, warmup_start_factor=0.1, min_lr=1e-5
    )
    groups = build_param_groups(_Segmenter(), cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    history = _lrs_over_steps(optimizer, build_scheduler(optimizer, cfg, 5, 6)["scheduler"], 30)
    names = [g["name"] for g in groups]
    decoder, backbone = names.index("decoder"), names.index("backbone")
    for step in range(10):
        assert history[step][decoder] == pytest.approx(5e-3)
        assert history[step][backbone] == 0.0
    assert history[10][decoder] == pytest.approx(1e-4)  # warm-up restarts after unfreezing
    assert history[15][decoder] == pytest.approx(1e-3)
    assert history[30][decoder] == pytest.approx(1e-5)
    schedule = FreezeSchedule(freeze_epochs=2, steps_per_epoch=5, base_lr=1e-3, frozen_lr=5e-3)
    assert [schedule.backbone_frozen(e) for e in range(4)] == [True, True, False, False]
    assert schedule.decoder_lr(0) == 5e-3 and schedule.decoder_lr(2) is None
    assert schedule.boundary_step == 10


def test_scheduler_state_loads_with_weights_only() -> None:
    cfg = OptimizerConfig(warmup_epochs=1)
    optimizer = torch.optim.AdamW(build_param_groups(_Segmenter(), cfg), lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, 3, 4)["scheduler"]
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    scheduler.load_state_dict(state)


def test_plateau_scheduler_config() -> None:
    cfg = OptimizerConfig(lr=1e-3, scheduler="plateau", plateau_factor=0.5, plateau_patience=1)
    optimizer = torch.optim.AdamW(build_param_groups(_Segmenter(), cfg), lr=cfg.lr)
    config = build_scheduler(optimizer, cfg, 5, 10)
    assert config["monitor"] == "val/iou" and config["interval"] == "epoch"
    scheduler = config["scheduler"]
    for metric in (0.5, 0.5, 0.5):  # no improvement for patience + 1 epochs
        scheduler.step(metric)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="plateau"):
        build_scheduler(optimizer, cfg.model_copy(update={"warmup_epochs": 1.0}), 5, 10)


def test_freeze_longer_than_training_is_an_error() -> None:
    cfg = OptimizerConfig(freeze_backbone_epochs=5)
    optimizer = torch.optim.AdamW(build_param_groups(_Segmenter(), cfg), lr=cfg.lr)
    with pytest.raises(ValueError, match="freeze_backbone_epochs"):
        build_scheduler(optimizer, cfg, 2, 5)

"""Masked segmentation losses against hand-computed values, torch and segmentation_models_pytorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segmentation_models_pytorch import losses as smp_losses

from workbench.params import LossTerm
from workbench.train.losses import (
    CompositeLoss,
    LossInputError,
    bce_loss,
    boundary_loss,
    build_loss,
    dice_loss,
    focal_loss,
    generalized_dice_loss,
    lovasz_hinge_loss,
    ohem_bce_loss,
    ohem_count,
    pos_weight_from_counts,
    signed_distance_map,
    tversky_loss,
)

ALL_TERMS = ["bce", "dice", "generalized_dice", "focal", "tversky", "lovasz", "boundary", "ohem_bce"]


def _batch(seed: int = 0, b: int = 2, h: int = 6, w: int = 7, masked_fraction: float = 0.3):
    """Random logits, hard 0/1 targets with some foreground in every image, and a random mask."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 1, h, w, generator=gen) * 2
    target = (torch.rand(b, h, w, generator=gen) < 0.35).float()
    target[:, 1:3, 1:4] = 1.0  # a blob, so every image has foreground
    mask = torch.rand(b, h, w, generator=gen) >= masked_fraction
    mask[:, 2, 2] = True
    mask[:, 0, 0] = True
    target[:, 0, 0] = 0.0  # and background
    return logits, target, mask


def _with_ignore(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target with 255 where the mask is False (smp's ignore_index convention)."""
    return torch.where(mask, target, torch.full_like(target, 255.0))


# --------------------------------------------------------------------------- BCE and pos_weight


def test_bce_hand_value_with_pos_weight() -> None:
    # pixel 1: logit 0, t=1 -> w*ln2; pixel 2: logit ln3 (p=.75), t=0 -> -ln(.25) = ln4
    logits = torch.tensor([0.0, math.log(3.0)]).reshape(1, 1, 1, 2)
    target = torch.tensor([[[1.0, 0.0]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    value = bce_loss(logits, target, mask, pos_weight=2.0)
    assert value.item() == pytest.approx((2 * math.log(2) + math.log(4)) / 2, rel=1e-6)


def test_bce_matches_torch_on_counted_pixels() -> None:
    logits, target, mask = _batch()
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.5))(logits[:, 0][mask], target[mask])
    assert bce_loss(logits, target, mask, pos_weight=3.5).item() == pytest.approx(expected.item(), rel=1e-6)
    full = torch.ones_like(mask)
    expected_full = torch.nn.BCEWithLogitsLoss()(logits, target[:, None])
    assert bce_loss(logits, target, full).item() == pytest.approx(expected_full.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("n_pos", "n_neg", "cap", "weighting", "expected"),
    [
        (1000, 42140, 10.0, "linear", 10.0),  # seed 004: 42x capped to 10
        (1000, 42140, 100.0, "linear", 42.14),
        (1, 100, 50.0, "sqrt", 10.0),
        (1, math.e**3, 50.0, "log", 3.0),
        (10, 5, 10.0, "linear", 1.0),  # never below 1
        (0, 100, 7.0, "linear", 7.0),  # no positive pixel -> cap
    ],
)
def test_pos_weight_from_counts(n_pos: float, n_neg: float, cap: float, weighting: str, expected: float) -> None:
    assert pos_weight_from_counts(n_pos, n_neg, cap, weighting) == pytest.approx(expected, rel=1e-9)  # type: ignore[arg-type]


def test_pos_weight_from_counts_rejects_empty_split() -> None:
    with pytest.raises(ValueError, match="no labelled pixel"):
        pos_weight_from_counts(0, 0, 10.0)


def test_data_pos_weight_is_capped_and_weighted() -> None:
    logits, target, mask = _batch(1)
    capped = build_loss([LossTerm(name="bce", pos_weight="data", pos_weight_max=10.0)], data_pos_weight=42.14)
    assert capped(logits, target, mask)[0].item() == pytest.approx(bce_loss(logits, target, mask, 10.0).item())
    sqrt = build_loss([LossTerm(name="bce", pos_weight="data", class_weighting="sqrt")], data_pos_weight=16.0)
    assert sqrt(logits, target, mask)[0].item() == pytest.approx(bce_loss(logits, target, mask, 4.0).item())


def test_batch_pos_weight_uses_counted_pixels_only() -> None:
    logits, target, mask = _batch(2)
    n_pos = float(target[mask].sum())
    n_neg = float(mask.sum()) - n_pos
    weight = min(100.0, max(1.0, n_neg / n_pos))
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weight))(logits[:, 0][mask], target[mask])
    loss = build_loss([LossTerm(name="bce", pos_weight="batch")])
    assert loss(logits, target, mask)[0].item() == pytest.approx(expected.item(), rel=1e-6)
    # capped by pos_weight_max
    capped = build_loss([LossTerm(name="bce", pos_weight="batch", pos_weight_max=1.2)])
    expected_capped = bce_loss(logits, target, mask, pos_weight=min(1.2, weight))
    assert capped(logits, target, mask)[0].item() == pytest.approx(expected_capped.item(), rel=1e-6)


def test_pos_weight_option_errors() -> None:
    with pytest.raises(ValueError, match="class_weighting"):
        build_loss([LossTerm(name="bce", pos_weight=5.0, class_weighting="sqrt")])
    with pytest.raises(ValueError, match="data_pos_weight"):
        build_loss([LossTerm(name="bce", pos_weight="data")])


# --------------------------------------------------------------------------- OHEM


def test_ohem_count() -> None:
    assert ohem_count(100, 0.5, 4096) == 100
    assert ohem_count(10_000, 0.5, 4096) == 5000
    assert ohem_count(10_000, 0.3, 4096) == 4096
    assert ohem_count(10, 0.25, 1) == 2


def test_ohem_keeps_exactly_k_hardest() -> None:
    logits, target, mask = _batch(3, h=5, w=5, masked_fraction=0.2)
    logits.requires_grad_(True)
    n = int(mask.sum())
    k = ohem_count(n, 0.3, 2)
    value = ohem_bce_loss(logits, target, mask, keep_ratio=0.3, min_kept=2)
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0][mask], target[mask], reduction="none"
    ).detach()
    hardest = np.sort(per_pixel.numpy())[::-1][:k]
    assert value.item() == pytest.approx(float(hardest.mean()), rel=1e-6)
    value.backward()
    assert logits.grad is not None
    assert int((logits.grad != 0).sum()) == k


# --------------------------------------------------------------------------- Dice family


def test_dice_hand_value() -> None:
    # p = .5 everywhere, 2 of 4 pixels foreground: (2*1 + 1) / (2 + 2 + 1) = 0.6
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    assert dice_loss(logits, target, mask, smooth=1.0).item() == pytest.approx(0.4, rel=1e-6)


@pytest.mark.parametrize("smooth", [0.0, 1.0, 3.0])
def test_dice_matches_smp_batch_global(smooth: float) -> None:
    logits, target, mask = _batch(4)
    # smp scores (I + s') / (.5 (P + T) + s'), i.e. (2I + 2s') / (P + T + 2s'): s' = smooth / 2
    reference = smp_losses.DiceLoss(mode="binary", from_logits=True, smooth=smooth / 2, ignore_index=255)
    expected = reference(logits, _with_ignore(target, mask))
    assert dice_loss(logits, target, mask, smooth=smooth).item() == pytest.approx(expected.item(), rel=1e-5)


def test_generalized_dice_hand_value() -> None:
    logits = torch.zeros(1, 1, 2, 2)  # p = .5
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    w_fg, w_bg = 1 / 1**2, 1 / 3**2
    numerator = 2 * (w_fg * 0.5 + w_bg * 1.5)
    denominator = w_fg * (2 + 1) + w_bg * (2 + 3)
    assert generalized_dice_loss(logits, target, mask).item() == pytest.approx(1 - numerator / denominator, rel=1e-6)


def test_generalized_dice_two_channel_softmax_equals_binary() -> None:
    logits, target, mask = _batch(5)
    two_channel = torch.cat([torch.zeros_like(logits), logits], dim=1)  # softmax([0, x])[1] = sigmoid(x)
    binary = generalized_dice_loss(logits, target, mask)
    assert generalized_dice_loss(two_channel, target, mask).item() == pytest.approx(binary.item(), rel=1e-5)


def test_tversky_alpha_weights_false_positives() -> None:
    # p = [.75, .75], t = [1, 0]: TP = .75, FP = .75, FN = .25
    logits = torch.full((1, 1, 1, 2), math.log(3.0))
    target = torch.tensor([[[1.0, 0.0]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    fp_light = tversky_loss(logits, target, mask, alpha=0.25, beta=0.75, smooth=0.0)
    assert fp_light.item() == pytest.approx(1 - 0.75 / (0.75 + 0.25 * 0.75 + 0.75 * 0.25), rel=1e-6)
    fp_heavy = tversky_loss(logits, target, mask, alpha=0.75, beta=0.25, smooth=0.0)
    assert fp_heavy.item() == pytest.approx(1 - 0.75 / (0.75 + 0.75 * 0.75 + 0.25 * 0.25), rel=1e-6)


@pytest.mark.parametrize(("alpha", "beta", "smooth"), [(0.25, 0.75, 1.0), (0.7, 0.3, 0.0), (0.5, 0.5, 2.0)])
def test_tversky_matches_smp(alpha: float, beta: float, smooth: float) -> None:
    logits, target, mask = _batch(6)
    reference = smp_losses.TverskyLoss(
        mode="binary", from_logits=True, smooth=smooth, alpha=alpha, beta=beta, ignore_index=255
    )
    expected = reference(logits, _with_ignore(target, mask))
    ours = tversky_loss(logits, target, mask, alpha=alpha, beta=beta, smooth=smooth)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- focal


def test_focal_hand_value() -> None:
    # logit 0, t = 1: p_t = .5 -> .25 * .5^2 * ln 2; logit ln3, t = 0: p_t = .25 -> .75 * .75^2 * ln 4
    logits = torch.tensor([0.0, math.log(3.0)]).reshape(1, 1, 1, 2)
    target = torch.tensor([[[1.0, 0.0]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.75**2 * math.log(4)) / 2
    assert focal_loss(logits, target, mask, alpha=0.25, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 1.0), (0.75, 3.0)])
def test_focal_matches_smp(alpha: float, gamma: float) -> None:
    logits, target, mask = _batch(7)
    reference = smp_losses.FocalLoss(mode="binary", alpha=alpha, gamma=gamma, ignore_index=255)
    expected = reference(logits, _with_ignore(target, mask))
    assert focal_loss(logits, target, mask, alpha=alpha, gamma=gamma).item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- Lovasz


def test_lovasz_single_pixel_hand_value() -> None:
    # one positive pixel: the Lovasz gradient is 1, so the loss is relu(1 - x)
    logits = torch.full((1, 1, 1, 1), 0.25)
    target = torch.ones(1, 1, 1)
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    assert lovasz_hinge_loss(logits, target, mask).item() == pytest.approx(0.75)


def test_lovasz_matches_smp_per_image() -> None:
    logits, target, mask = _batch(8, b=3)
    reference = smp_losses.LovaszLoss(mode="binary", per_image=True, ignore_index=255)
    expected = reference(logits[:, 0], _with_ignore(target, mask))
    assert lovasz_hinge_loss(logits, target, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    full = torch.ones_like(mask)
    expected_full = smp_losses.LovaszLoss(mode="binary", per_image=True)(logits[:, 0], target)
    assert lovasz_hinge_loss(logits, target, full).item() == pytest.approx(expected_full.item(), rel=1e-5)


# --------------------------------------------------------------------------- boundary


def test_signed_distance_map_hand_values() -> None:
    row = np.array([[0, 1, 1, 1, 1, 1, 0, 0]], dtype=bool)
    # inside: -(distance to nearest background - 1); outside: distance to nearest foreground
    expected = np.array([[1, 0, -1, -2, -1, 0, 1, 2]], dtype=np.float32)
    np.testing.assert_allclose(signed_distance_map(row), expected)
    assert not signed_distance_map(np.zeros((4, 4), dtype=bool)).any()
    assert not signed_distance_map(np.ones((4, 4), dtype=bool)).any()


def test_signed_distance_map_ignores_uncounted_pixels() -> None:
    row = np.array([[0, 1, 1, 1, 0, 0]], dtype=bool)
    counted = np.array([[1, 1, 1, 1, 0, 1]], dtype=bool)  # pixel 4 is not counted
    sdm = signed_distance_map(row, counted)
    # pixel 3 is 2 away from the nearest counted background (5) and 3 from pixel 0
    np.testing.assert_allclose(sdm, np.array([[1, 0, -1, -1, 0, 2]], dtype=np.float32))


def test_boundary_loss_is_mean_probability_times_distance() -> None:
    logits = torch.tensor([0.0, 0.0, math.log(3.0), 0.0, 0.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 8)
    target = torch.tensor([[[0.0, 1, 1, 1, 1, 1, 0, 0]]])
    mask = torch.ones(1, 1, 8, dtype=torch.bool)
    distances = [1, 0, -1, -2, -1, 0, 1, 2]
    probs = [0.5, 0.5, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5]
    expected = sum(p * d for p, d in zip(probs, distances)) / 8
    assert boundary_loss(logits, target, mask).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- masking, composite, errors


@pytest.mark.parametrize("name", ALL_TERMS)
def test_masked_pixels_have_no_effect(name: str) -> None:
    logits, target, mask = _batch(9)
    loss = build_loss([LossTerm(name=name, min_kept=8, pos_weight="batch" if "bce" in name else None)])
    first = logits.clone().requires_grad_(True)
    value, _ = loss(first, target, mask)
    value.backward()
    changed = torch.where(mask[:, None], logits, torch.full_like(logits, 37.0)).requires_grad_(True)
    changed_target = torch.where(mask, target, 1 - target)
    value_changed, _ = loss(changed, changed_target, mask)
    value_changed.backward()
    assert value_changed.item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7)
    assert first.grad is not None and changed.grad is not None
    assert torch.all(first.grad[:, 0][~mask] == 0)
    assert torch.all(changed.grad[:, 0][~mask] == 0)
    assert torch.any(first.grad[:, 0][mask] != 0)


def test_composite_total_is_weighted_sum() -> None:
    logits, target, mask = _batch(10)
    terms = [
        LossTerm(name="bce", weight=0.5, pos_weight=3.0),
        LossTerm(name="dice", weight=1.0),
        LossTerm(name="tversky", weight=0.25),
        LossTerm(name="bce", weight=2.0),
    ]
    loss = build_loss(terms)
    assert isinstance(loss, CompositeLoss)
    total, parts = loss(logits, target, mask)
    assert list(parts) == ["bce", "dice", "tversky", "bce_2"]
    assert parts["bce"].item() == pytest.approx(bce_loss(logits, target, mask, 3.0).item())
    assert parts["bce_2"].item() == pytest.approx(bce_loss(logits, target, mask).item())
    weighted = sum(term.weight * parts[name].item() for term, name in zip(terms, parts))
    assert total.item() == pytest.approx(weighted, rel=1e-6)
    assert all(not part.requires_grad for part in parts.values())


def test_composite_empty_mask_gives_zero_with_grad() -> None:
    logits, target, _ = _batch(11)
    logits.requires_grad_(True)
    loss = build_loss([LossTerm(name=name) for name in ALL_TERMS])
    total, parts = loss(logits, target, torch.zeros_like(target, dtype=torch.bool))
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert logits.grad is not None and not logits.grad.any()
    assert set(parts) == set(ALL_TERMS)


def test_soft_targets_are_accepted() -> None:
    logits, target, mask = _batch(12)
    soft = target * 0.9 + 0.05
    total, parts = build_loss([LossTerm(name=name) for name in ALL_TERMS])(logits, soft, mask)
    assert torch.isfinite(total)
    expected = torch.nn.BCEWithLogitsLoss()(logits[:, 0][mask], soft[mask])
    assert parts["bce"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_input_errors_are_clear() -> None:
    logits, target, mask = _batch(13)
    with pytest.raises(LossInputError, match="target must be"):
        bce_loss(logits, target[:, :-1], mask)
    with pytest.raises(LossInputError, match="bool"):
        bce_loss(logits, target, mask.float())
    with pytest.raises(LossInputError, match="binary logits"):
        focal_loss(torch.cat([logits, logits], dim=1), target, mask)
    with pytest.raises(ValueError, match="at least one"):
        build_loss([])

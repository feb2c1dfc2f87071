"""Softmax losses against torch / smp and hand computations, with ignored and nodata pixels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss

from workbench.params import LossTerm
from workbench.train.losses import (
    LossInputError,
    build_loss,
    cross_entropy_loss,
    frequency_class_weights,
    lovasz_softmax_loss,
    softmax_dice_loss,
    softmax_focal_loss,
    softmax_tversky_loss,
)

K = 3


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, 6, 5, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, K, (2, 6, 5), generator=gen)
    mask = torch.rand(2, 6, 5, generator=gen) > 0.25
    return logits, target, mask


def _counted(logits, target, mask):
    p = torch.softmax(logits, 1).movedim(1, -1)[mask].numpy()  # (N, K)
    return p, target[mask].numpy()


def test_cross_entropy_weights_smoothing_by_hand(batch):
    logits, target, mask = batch
    w = [0.5, 2.0, 1.0]
    eps = 0.1
    p, y = _counted(logits, target, mask)
    q = np.full_like(p, eps / K)
    q[np.arange(len(y)), y] += 1 - eps
    # torch's convention: per pixel -sum_c w_c q_c log p_c, divided by sum of w_y
    per_pixel = -(np.asarray(w)[None] * q * np.log(p)).sum(1)
    expected = per_pixel.sum() / np.asarray(w)[y].sum()
    got = cross_entropy_loss(logits, target, mask, class_weights=w, label_smoothing=eps)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    plain = -np.log(p[np.arange(len(y)), y]).mean()
    assert float(cross_entropy_loss(logits, target.double(), mask)) == pytest.approx(plain, rel=1e-10)


def test_softmax_focal_by_hand_and_gamma_zero_is_ce(batch):
    logits, target, mask = batch
    p, y = _counted(logits, target, mask)
    py = p[np.arange(len(y)), y]
    w = np.array([1.0, 3.0, 0.5])
    expected = (-(w[y]) * (1 - py) ** 2 * np.log(py)).mean()
    got = softmax_focal_loss(logits, target, mask, gamma=2.0, class_weights=list(w))
    assert float(got) == pytest.approx(expected, rel=1e-10)
    assert float(softmax_focal_loss(logits, target, mask, gamma=0.0)) == pytest.approx(
        float(cross_entropy_loss(logits, target, mask)), rel=1e-12
    )


def _dice_by_hand(p, y, smooth, present_only=True, alpha=None, beta=None):
    losses = []
    for c in range(K):
        pc, tc = p[:, c], (y == c).astype(float)
        inter = (pc * tc).sum()
        alpha, beta = (0.5, 0.5) if alpha is None else (alpha, beta)  # Dice = Tversky(1/2, 1/2) in smp 0.6
        fp, fn = (pc * (1 - tc)).sum(), ((1 - pc) * tc).sum()
        score = (inter + smooth) / max(inter + alpha * fp + beta * fn + smooth, 1e-7)
        losses.append((1 - score) * (tc.sum() > 0 if present_only else 1))
    return np.asarray(losses)


def test_softmax_dice_and_tversky_by_hand_ignoring_masked_pixels(batch):
    logits, target, mask = batch
    target = target.clone()
    target[0] = torch.where(target[0] == 2, 0, target[0])
    target[1] = torch.where(target[1] == 2, 1, target[1])  # class 2 absent: contributes 0, as in smp
    p, y = _counted(logits, target, mask)
    assert float(softmax_dice_loss(logits, target, mask, smooth=1.0)) == pytest.approx(
        _dice_by_hand(p, y, 1.0).mean(), rel=1e-9
    )
    w = np.array([1.0, 2.0, 4.0])
    assert float(softmax_dice_loss(logits, target, mask, smooth=0.5, class_weights=list(w))) == pytest.approx(
        (_dice_by_hand(p, y, 0.5) * w).sum() / w.sum(), rel=1e-9
    )
    got = softmax_tversky_loss(logits, target, mask, alpha=0.3, beta=0.7, smooth=1.0)
    assert float(got) == pytest.approx(_dice_by_hand(p, y, 1.0, alpha=0.3, beta=0.7).mean(), rel=1e-9)
    # the same as smp on the counted pixels, whatever the masked pixels hold
    garbage = torch.where(mask, target, torch.full_like(target, 1))
    smp_value = DiceLoss("multiclass", smooth=1.0, ignore_index=255)(
        logits, torch.where(mask, target, torch.full_like(target, 255))
    )
    assert float(softmax_dice_loss(logits, garbage, mask)) == pytest.approx(float(smp_value), rel=1e-12)


def test_lovasz_softmax_hand_case_and_perfect_prediction():
    # 4 pixels, 2 classes, one ignored (pixel 3): errors |1{y=c} - p_c| per class, sorted, dot Lovasz gradient
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.5, 0.5]], dtype=torch.float64))
    logits = logits.T.reshape(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 1, 1]]])
    mask = torch.tensor([[[True, True, True, False]]])
    # class 0: fg = pixels 0, 1; errors 0.1, 0.6, 0.3 -> sorted 0.6 (fg), 0.3 (bg), 0.1 (fg)
    # Jaccard after k pixels: 1 - (2 - fg_seen)/(2 + bg_seen): k=1: 1-1/2=.5, k=2: 1-1/3=2/3, k=3: 1-0/3=1
    class0 = 0.6 * 0.5 + 0.3 * (2 / 3 - 0.5) + 0.1 * (1 - 2 / 3)
    # class 1: fg = pixel 2; errors 0.1 (bg), 0.6 (bg), 0.3 (fg) -> sorted 0.6 bg, 0.3 fg, 0.1 bg
    # k=1: 1 - 1/2 = .5, k=2: 1 - 0/2 = 1, k=3: 1 - 0/3 = 1
    class1 = 0.6 * 0.5 + 0.3 * 0.5 + 0.1 * 0.0
    assert float(lovasz_softmax_loss(logits, target, mask)) == pytest.approx((class0 + class1) / 2, rel=1e-6)
    perfect = F.one_hot(target, 2).movedim(-1, 1).double() * 50
    assert float(lovasz_softmax_loss(perfect, target, mask)) == pytest.approx(0.0, abs=1e-6)


def test_frequency_weights_by_hand():
    assert frequency_class_weights([50, 25, 25], cap=10) == pytest.approx([100 / 150, 100 / 75, 100 / 75])
    assert frequency_class_weights([98, 1, 1, 0], cap=10) == pytest.approx([100 / 392, 10, 10, 10])
    with pytest.raises(ValueError, match="no labelled pixel"):
        frequency_class_weights([0, 0], cap=10)


def test_composite_softmax_terms_masked_pixels_have_no_gradient(batch):
    logits, target, mask = batch
    logits = logits.clone().requires_grad_(True)
    terms = [
        LossTerm(name="ce", class_weights="frequency", label_smoothing=0.05),
        LossTerm(name="dice", weight=0.5),
        LossTerm(name="focal"),
        LossTerm(name="tversky"),
        LossTerm(name="lovasz"),
        LossTerm(name="generalized_dice"),
    ]
    counts = np.bincount(target[mask].numpy(), minlength=K)
    loss = build_loss(terms, num_classes=K, class_pixel_counts=counts)
    total, parts = loss(logits, target, mask)
    assert set(parts) == {"ce", "dice", "focal", "tversky", "lovasz", "generalized_dice"}
    expected_ce = cross_entropy_loss(logits, target, mask, frequency_class_weights(counts, 10.0), 0.05)
    assert float(parts["ce"]) == pytest.approx(float(expected_ce.detach()))
    assert float(total) == pytest.approx(sum(float(v) * t.weight for v, t in zip(parts.values(), terms)))
    total.backward()
    assert (logits.grad.movedim(1, -1)[~mask] == 0).all() and logits.grad.abs().sum() > 0


def test_softmax_losses_refuse_bad_targets_and_binary_terms(batch):
    logits, target, mask = batch
    bad = target.clone()
    bad[mask] = K  # a class the model does not have
    with pytest.raises(LossInputError, match=r"\[0, 2\]"):
        cross_entropy_loss(logits, bad, mask)
    with pytest.raises(ValueError, match="binary models"):
        build_loss([LossTerm(name="bce")], num_classes=K)
    with pytest.raises(ValueError, match="class_pixel_counts"):
        build_loss([LossTerm(name="ce", class_weights="frequency")], num_classes=K)

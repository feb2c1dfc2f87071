"""Test-time augmentation: exact inverses, equivariant models unchanged, hand-computed averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workbench.infer.tta import TRANSFORMS, TTA_MODES, predict_with_tta


class FirstChannel(nn.Module):
    """Returns the first input channel as the logit: TTA must give back the input exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


class RowRamp(nn.Module):
    """Adds a ramp that grows down the rows: not flip-equivariant, so TTA changes its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[-2], dtype=x.dtype).view(1, 1, -1, 1)
        return x[:, :1] + rows


def _symmetric_conv(channels: int) -> nn.Conv2d:
    """A 3x3 conv whose kernels are invariant under every D4 element (so the conv commutes with D4)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 2, kernel_size=3, padding=1)
    with torch.no_grad():
        centre, edge, corner = torch.randn(3, 2, channels, 1, 1)
        kernel = torch.empty(2, channels, 3, 3)
        kernel[..., :, :] = corner
        kernel[..., 1, :] = edge[..., 0]
        kernel[..., :, 1] = edge[..., 0]
        kernel[..., 1, 1] = centre[..., 0, 0]
        conv.weight.copy_(kernel)
    return conv


def test_modes_have_the_documented_sizes() -> None:
    assert {mode: len(names) for mode, names in TTA_MODES.items()} == {
        "none": 1,
        "minimal": 2,
        "standard": 4,
        "full": 8,
    }


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_inverse_undoes_forward(name: str) -> None:
    x = torch.randn(2, 3, 5, 5)
    transform = TRANSFORMS[name]
    assert torch.equal(transform.inverse(transform.forward(x)), x)


def test_full_mode_is_the_dihedral_group() -> None:
    # the eight transforms give eight distinct images of an asymmetric input, matching numpy's D4 orbit
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    expected = {np.rot90(m, k).tobytes() for m in (x, x.T) for k in range(4)}
    got = {
        TRANSFORMS[name].forward(torch.from_numpy(x)[None, None]).numpy()[0, 0].tobytes() for name in TTA_MODES["full"]
    }
    assert got == expected


@pytest.mark.parametrize("mode", list(TTA_MODES))
def test_identity_model_returns_input(mode: str) -> None:
    x = torch.randn(2, 4, 6, 6)
    out = predict_with_tta(FirstChannel(), x, mode)
    assert out.shape == (2, 1, 6, 6)
    torch.testing.assert_close(out, x[:, :1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", list(TTA_MODES))
def test_symmetric_kernel_conv_is_unchanged_by_tta(mode: str) -> None:
    conv = _symmetric_conv(3).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = conv(x)
    torch.testing.assert_close(predict_with_tta(conv, x, mode), plain, rtol=1e-5, atol=1e-5)


def test_non_equivariant_model_gives_hand_computed_average() -> None:
    x = torch.randn(1, 1, 4, 4)
    ramp = torch.arange(4, dtype=torch.float32).view(1, 1, 4, 1)
    # identity and hflip keep the row ramp; vflip and rot180 flip it back to (3 - row)
    standard = x + (ramp + ramp + (3 - ramp) + (3 - ramp)) / 4
    minimal = x + ramp
    torch.testing.assert_close(predict_with_tta(RowRamp(), x, "standard"), standard)
    torch.testing.assert_close(predict_with_tta(RowRamp(), x, "minimal"), minimal)
    # full: rot90-type transforms turn the row ramp into a column ramp; the D4 average is the constant 1.5
    torch.testing.assert_close(predict_with_tta(RowRamp(), x, "full"), x + 1.5)


def test_flip_modes_work_on_non_square_input() -> None:
    x = torch.randn(1, 2, 4, 7)
    torch.testing.assert_close(predict_with_tta(FirstChannel(), x, "standard"), x[:, :1])


def test_full_mode_rejects_non_square_input() -> None:
    with pytest.raises(ValueError, match="square"):
        predict_with_tta(FirstChannel(), torch.zeros(1, 1, 4, 6), "full")


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="standard"):
        predict_with_tta(FirstChannel(), torch.zeros(1, 1, 4, 4), "flips")

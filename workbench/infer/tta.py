"""Test-time augmentation over the dihedral group D4 (flips and 90-degree rotations).

Each transform is applied to the input, the model runs on the transformed image, the inverse
transform brings the output back to the input's geometry, and the LOGITS are averaged (averaging
probabilities would weight confident passes differently and break temperature scaling).
Rotation modes need square inputs; flip-only modes work on any shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

TensorMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class D4Transform:
    """One element of D4 acting on the last two axes, with its inverse."""

    name: str
    forward: TensorMap
    inverse: TensorMap
    needs_square: bool = False


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _vflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2)


def _rot180(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2, -1)


def _rot90(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(-2, -1))


def _rot270(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, -1, dims=(-2, -1))


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def _antitranspose(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2, -1).transpose(-2, -1)


TRANSFORMS: dict[str, D4Transform] = {
    "identity": D4Transform("identity", _identity, _identity),
    "hflip": D4Transform("hflip", _hflip, _hflip),
    "vflip": D4Transform("vflip", _vflip, _vflip),
    "rot180": D4Transform("rot180", _rot180, _rot180),
    "rot90": D4Transform("rot90", _rot90, _rot270, needs_square=True),
    "rot270": D4Transform("rot270", _rot270, _rot90, needs_square=True),
    "transpose": D4Transform("transpose", _transpose, _transpose, needs_square=True),
    "antitranspose": D4Transform("antitranspose", _antitranspose, _antitranspose, needs_square=True),
}

TTA_MODES: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "minimal": ("identity", "hflip"),
    "standard": ("identity", "hflip", "vflip", "rot180"),
    "full": tuple(TRANSFORMS),
}


def tta_transforms(mode: str, height: int, width: int) -> list[D4Transform]:
    """The transforms of a TTA mode, checked against the input shape."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; expected one of {', '.join(TTA_MODES)}")
    transforms = [TRANSFORMS[name] for name in TTA_MODES[mode]]
    if height != width and any(t.needs_square for t in transforms):
        raise ValueError(
            f"TTA mode {mode!r} rotates by 90 degrees and needs a square input, got {height}x{width}; "
            "use mode 'standard' (flips only) or square windows"
        )
    return transforms


def model_logits(output: object) -> torch.Tensor:
    """The logit tensor of a model output (plain tensors, or objects with an `output` tensor such as terratorch's)."""
    if isinstance(output, torch.Tensor):
        return output
    inner = getattr(output, "output", None)
    if isinstance(inner, torch.Tensor):
        return inner
    raise TypeError(f"model returned {type(output).__name__}; expected a logit tensor (B, K, H, W)")


@torch.no_grad()
def predict_with_tta(model: nn.Module, image: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Average the model's logits over the transforms of `mode`, each mapped back to the input geometry.

    image: (B, C, H, W); returns logits (B, K, H, W).
    """
    if image.ndim != 4:
        raise ValueError(f"TTA expects an image batch (B, C, H, W), got shape {tuple(image.shape)}")
    transforms = tta_transforms(mode, int(image.shape[-2]), int(image.shape[-1]))
    total: torch.Tensor | None = None
    for transform in transforms:
        logits = transform.inverse(model_logits(model(transform.forward(image))))
        total = logits.float() if total is None else total + logits.float()
    assert total is not None
    return total / len(transforms)

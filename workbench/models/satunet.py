"""An attention-gated U-Net for cloud masks, after the idea of SAT-UNet.

SAT-UNet refines each skip connection of a U-Net with a spatial attention block before it is joined
with the decoder path. This design computes that attention from cheap channel statistics: at every
decoder stage the mean and maximum over channels of the skip features and of the upsampled decoder
features (four maps) go through one 7x7 convolution and a sigmoid, giving a per-pixel weight that
scales the skip features. The decoder signal therefore decides where the fine encoder detail is let
through (thin cloud edges, shadows) at almost no parameter cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DownStage(nn.Sequential):
    """Halve the resolution (max pooling), then a ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), ConvBlock(in_channels, out_channels))


class SkipAttention(nn.Module):
    """Spatial attention map for a skip connection, from channel-pooled skip and decoder features."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.score = nn.Sequential(
            nn.Conv2d(4, 1, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(1),
        )

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Return the per-pixel weights (B, 1, H, W) in (0, 1)."""
        stats = torch.cat(
            [
                skip.mean(1, keepdim=True),
                skip.amax(1, keepdim=True),
                gate.mean(1, keepdim=True),
                gate.amax(1, keepdim=True),
            ],
            dim=1,
        )
        return torch.sigmoid(self.score(stats))


class UpStage(nn.Module):
    """Upsample to the skip's size, weight the skip by SkipAttention, concatenate and convolve."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.attention = SkipAttention()
        self.fuse = ConvBlock(skip_channels + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.up(x)
        weights = self.attention(skip, x)
        return self.fuse(torch.cat([skip * weights, x], dim=1))


class SatUNet(nn.Module):
    """U-Net of `depth` down/up stages with attention-refined skips; widths base * 2**level.

    Any input size works (each decoder stage upsamples to its skip's size); logits come out at full
    resolution. Parameters of the contracting path live under `encoder`.
    """

    backbone_prefix = "encoder"
    num_backbone_layers: int | None = None

    def __init__(self, in_channels: int, num_classes: int = 1, base_channels: int = 32, depth: int = 4) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or base_channels < 1 or depth < 1:
            raise ValueError(
                "SatUNet needs positive in_channels, num_classes, base_channels and depth, got "
                f"{in_channels}, {num_classes}, {base_channels}, {depth}"
            )
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels, widths[0])] + [DownStage(widths[i], widths[i + 1]) for i in range(depth)]
        )
        self.decoder = nn.ModuleList([UpStage(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.weights_report: dict[str, object] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes, H, W)."""
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for stage in self.decoder:
            x = stage(x, skips.pop())
        return self.head(x)

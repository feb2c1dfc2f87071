"""Late fusion: one encoder per band group, features joined per scale, one U-Net decoder.

Optical, radar and elevation bands have different statistics and textures; giving each group its own
encoder lets each learn its own filters before the decoder combines them. At every encoder scale the
group features are concatenated and mixed by a 1x1 convolution (with batch norm and ReLU) back to the
width of a single encoder, and smp's U-Net decoder turns the fused pyramid into full-resolution logits.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from workbench.models.weights import ModelConfigError, ensure_offline_hub

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


def resolve_fusion_groups(groups: list[list[str]], band_names: list[str] | None) -> list[list[int]]:
    """Turn groups of band names into channel indices; every band must be in exactly one group."""
    if not groups:
        raise ModelConfigError("model.fusion_groups is empty; late_fusion needs lists of band names, one per encoder")
    if band_names is None:
        raise ModelConfigError("late_fusion needs the input band names to resolve model.fusion_groups")
    position = {name: index for index, name in enumerate(band_names)}
    problems: list[str] = []
    seen: dict[str, int] = {}
    indices: list[list[int]] = []
    for group_number, group in enumerate(groups):
        if not group:
            problems.append(f"group {group_number} is empty")
        for name in group:
            if name not in position:
                close = difflib.get_close_matches(name, band_names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"group {group_number} names unknown band {name!r}{hint}")
            elif name in seen:
                problems.append(f"band {name!r} is in group {seen[name]} and group {group_number}")
            else:
                seen[name] = group_number
        indices.append([position[name] for name in group if name in position])
    left_out = [name for name in band_names if name not in seen]
    if left_out:
        problems.append(f"bands left out of every group: {', '.join(left_out)}")
    if problems:
        raise ModelConfigError(
            "invalid model.fusion_groups: " + "; ".join(problems) + f". Input bands: {', '.join(band_names)}"
        )
    return indices


class FuseConv(nn.Sequential):
    """1x1 convolution + batch norm + ReLU that mixes concatenated group features."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class LateFusionUNet(nn.Module):
    """One smp encoder per channel group, per-scale fusion, smp U-Net decoder and a 3x3 conv head."""

    backbone_prefix = "encoders"
    num_backbone_layers: int | None = None

    def __init__(
        self,
        group_indices: list[list[int]],
        encoder_name: str = "resnet18",
        encoder_depth: int = 5,
        decoder_channels: list[int] | None = None,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        ensure_offline_hub()
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
        from segmentation_models_pytorch.encoders import get_encoder

        channels = list(decoder_channels) if decoder_channels else list(DEFAULT_DECODER_CHANNELS[:encoder_depth])
        if len(channels) != encoder_depth:
            raise ModelConfigError(
                f"model.decoder_channels needs {encoder_depth} entries (model.encoder_depth) for late_fusion, "
                f"got {channels}"
            )
        groups = [list(group) for group in group_indices]
        self.group_indices = groups
        for number, group in enumerate(groups):
            self.register_buffer(f"group_index_{number}", torch.tensor(group, dtype=torch.long), persistent=False)
        encoders = [get_encoder(encoder_name, in_channels=len(g), depth=encoder_depth, weights=None) for g in groups]
        self.encoders = nn.ModuleList(encoders)
        stage_channels: list[list[int]] = [list(encoder.out_channels) for encoder in encoders]
        widths = stage_channels[0]
        self.fusion = nn.ModuleList(
            [
                FuseConv(sum(channels[level] for channels in stage_channels), widths[level])
                for level in range(1, encoder_depth + 1)
            ]
        )
        in_channels = sum(len(group) for group in groups)
        self.decoder = UnetDecoder(
            encoder_channels=[in_channels, *widths[1:]], decoder_channels=channels, n_blocks=encoder_depth
        )
        self.head = nn.Conv2d(channels[-1], num_classes, 3, padding=1)
        self.weights_report: list[dict[str, object]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes, H, W); H and W must divide by 2**encoder_depth."""
        per_group = [
            encoder(x.index_select(1, getattr(self, f"group_index_{number}")))
            for number, encoder in enumerate(self.encoders)
        ]
        fused = [x]
        for level, fuse in enumerate(self.fusion, start=1):
            fused.append(fuse(torch.cat([features[level] for features in per_group], dim=1)))
        return self.head(self.decoder(fused))

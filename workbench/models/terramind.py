"""TerraMind v1 (tiny/small/base/large) segmentation models assembled from terratorch parts.

The flat input tensor (B, C, H, W) is split by modality (the chip store labels every band with one:
S2L2A x12, S1GRD x2, DEM x1, ...) into the dict of tensors TerraMind expects. The ViT returns one token
map per block; the neck selects the tapped blocks and reshapes their tokens to images (1/16 of the input);
an UperNet decoder reads them directly, a UNet decoder first gets a learned pyramid (1/4 .. 1/32). The
head's logits are upsampled to the input size.

Several time steps (`model.terramind.timesteps` = T) arrive as T consecutive groups of the same bands
(names and modality labels may end in `_t<k>`). The encoder runs on every time step and its token maps
are pooled over time before the neck: `concat` stacks them along the feature axis (the decoder sees T
times the width, as terratorch's TemporalWrapper does), `mean` and `max` reduce them.

The backbone is always built with pretrained=False (no download); a local checkpoint can be loaded with
`model.terramind.checkpoint`. Positional embeddings are interpolated, so any multiple of the 16-pixel
patch works (224 is not required); other sizes are reflect-padded up to the next multiple and cropped back.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.weights import ModelConfigError, WeightsReport, ensure_offline_hub, load_weights
from workbench.params import ModelParams

log = logging.getLogger(__name__)

PATCH_SIZE = 16
#: Bands per TerraMind input modality, in the order of TerraMind's pretrained patch embeddings.
MODALITY_BANDS: dict[str, list[str]] = {
    "S2L2A": ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"],
    "S2L1C": ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"],
    "S1GRD": ["VV", "VH"],
    "S1RTC": ["VV", "VH"],
    "DEM": ["DEM"],
}
BLOCKS_PER_SIZE = {"tiny": 12, "small": 12, "base": 12, "large": 24}


def normalise_modality(name: str) -> str:
    """Upper-case a modality label and drop separators ('s2_l2a' -> 'S2L2A')."""
    return re.sub(r"[^A-Z0-9]", "", name.upper())


def _band_code(name: str) -> str:
    """Canonical band code: 'b2' -> 'B02', 'B8a' -> 'B8A', 'vv' -> 'VV'."""
    code = name.strip().upper()
    match = re.fullmatch(r"B0?(\d{1,2}|8A)", code)
    if match:
        number = match.group(1)
        return "B8A" if number == "8A" else f"B{int(number):02d}"
    return code


def default_tap_indices(depth: int, count: int = 4) -> list[int]:
    """`count` block indices spread evenly over `depth` blocks, ending at the last (12 -> [2, 5, 8, 11])."""
    return [round((i + 1) * depth / count) - 1 for i in range(count)]


def _order_bands(modality: str, indices: list[int], band_names: list[str] | None) -> list[int]:
    """Reorder a modality's channels to TerraMind's band order when the band names allow it."""
    if band_names is None:
        return indices
    codes = [_band_code(band_names[i]) for i in indices]
    expected = MODALITY_BANDS[modality]
    if sorted(codes) != sorted(expected):
        if modality != "DEM":
            log.warning(
                "bands %s of modality %s do not match TerraMind's %s; they are used in the given order",
                [band_names[i] for i in indices],
                modality,
                expected,
            )
        return indices
    by_code = dict(zip(codes, indices))
    return [by_code[code] for code in expected]


def modality_channels(
    requested: list[str], in_channels: int, modalities: list[str] | None, band_names: list[str] | None = None
) -> dict[str, list[int]]:
    """Channel indices of each requested TerraMind modality, checked against the expected band counts.

    `modalities` labels every input channel. Without it the channels are assumed to hold the requested
    modalities back to back in the configured order, which is only accepted when the counts add up.
    """
    counts = {mod: len(MODALITY_BANDS[mod]) for mod in requested}
    if modalities is None:
        total = sum(counts.values())
        if total != in_channels:
            raise ModelConfigError(
                f"TerraMind modalities {requested} take {total} bands ({counts}) but the input has {in_channels}; "
                "pass the per-band modality labels of the chip store to tell the bands apart"
            )
        labels = [mod for mod in requested for _ in range(counts[mod])]
    else:
        if len(modalities) != in_channels:
            raise ModelConfigError(f"got {len(modalities)} modality labels for {in_channels} input channels")
        labels = [normalise_modality(m) for m in modalities]
    channels: dict[str, list[int]] = {}
    for mod in requested:
        indices = [i for i, label in enumerate(labels) if label == mod]
        if not indices:
            raise ModelConfigError(
                f"model.terramind.modalities asks for {mod} but no input band belongs to it; "
                f"input modalities: {sorted(set(labels))}"
            )
        if len(indices) != counts[mod]:
            named = f" ({', '.join(band_names[i] for i in indices)})" if band_names else ""
            raise ModelConfigError(
                f"TerraMind modality {mod} expects {counts[mod]} bands ({', '.join(MODALITY_BANDS[mod])}), "
                f"got {len(indices)}{named}"
            )
        channels[mod] = _order_bands(mod, indices, band_names)
    unused = sorted({labels[i] for i in range(in_channels)} - set(requested))
    if unused:
        log.warning("input bands of modalities %s are not fed to TerraMind (not in model.terramind.modalities)", unused)
    return channels


_TIMESTEP = re.compile(r"^(.*?)[_@]t(\d+)$", re.IGNORECASE)


def strip_timestep(name: str) -> tuple[str, int | None]:
    """('B02_t3') -> ('B02', 3); a name without a time-step suffix -> (name, None)."""
    match = _TIMESTEP.match(name.strip())
    return (match.group(1), int(match.group(2))) if match else (name, None)


def timestep_groups(
    timesteps: int, in_channels: int, modalities: list[str] | None, band_names: list[str] | None
) -> tuple[int, list[str] | None, list[str] | None]:
    """Channels per time step and the first step's modality labels and band names, checked for every step.

    The input must hold `timesteps` consecutive groups of the same bands; a band or modality label that
    carries a `_t<k>` suffix must carry the number of its group.
    """
    if in_channels % timesteps:
        raise ModelConfigError(
            f"model.terramind.timesteps={timesteps} needs a multiple of {timesteps} input bands, got {in_channels}"
        )
    per_step = in_channels // timesteps
    firsts: list[list[str] | None] = []
    for labels, what in ((modalities, "modality"), (band_names, "band")):
        if labels is None:
            firsts.append(None)
            continue
        first: list[str] = []
        for step in range(timesteps):
            group = labels[step * per_step : (step + 1) * per_step]
            parsed = [strip_timestep(label) for label in group]
            wrong = [label for label, (_, k) in zip(group, parsed, strict=True) if k is not None and k != step]
            if wrong:
                raise ModelConfigError(f"{what} labels {wrong} sit in time step {step}'s group of bands")
            bases = [base for base, _ in parsed]
            if step == 0:
                first = bases
            elif bases != first:
                raise ModelConfigError(
                    f"time step {step} holds {what}s {bases}, time step 0 holds {first}; every step needs the "
                    "same bands in the same order"
                )
        firsts.append(first)
    return per_step, firsts[0], firsts[1]


def pool_over_time(tokens: torch.Tensor, timesteps: int, pooling: str) -> torch.Tensor:
    """(B*T, L, D) token maps of T time steps -> (B, L, T*D) for concat, (B, L, D) for mean or max."""
    if timesteps == 1:
        return tokens
    batch_steps, length, width = tokens.shape
    stacked = tokens.reshape(batch_steps // timesteps, timesteps, length, width)
    if pooling == "concat":
        return stacked.permute(0, 2, 1, 3).reshape(batch_steps // timesteps, length, timesteps * width)
    if pooling == "mean":
        return stacked.mean(dim=1)
    if pooling == "max":
        return stacked.amax(dim=1)
    raise ModelConfigError(f"unknown temporal pooling {pooling!r}; use concat, mean or max")


def _tap_indices(params: ModelParams, depth: int) -> list[int]:
    config = params.terramind
    taps = list(config.tap_indices) if config.tap_indices is not None else default_tap_indices(depth)
    bad = [t for t in taps if not -depth <= t < depth]
    if bad or not taps:
        raise ModelConfigError(
            f"model.terramind.tap_indices {taps} must be block indices in 0..{depth - 1} (TerraMind {config.size} "
            f"has {depth} blocks)"
        )
    if config.decoder == "UNet" and len(taps) != 4:
        raise ModelConfigError(f"model.terramind.tap_indices needs exactly 4 blocks for the UNet decoder, got {taps}")
    return [t % depth for t in taps]


def _decoder_widths(params: ModelParams) -> int | list[int]:
    """UperNet takes one width; UNet takes four (an int c becomes [c, c/2, c/4, c/8])."""
    widths = params.terramind.decoder_channels
    if params.terramind.decoder == "UperNet":
        if isinstance(widths, list):
            if len(widths) != 1:
                raise ModelConfigError(
                    f"model.terramind.decoder_channels for UperNet is one width (e.g. 256), got {widths}"
                )
            return widths[0]
        return widths
    if isinstance(widths, int):
        return [max(widths // 2**i, 8) for i in range(4)]
    if len(widths) != 4:
        raise ModelConfigError(f"model.terramind.decoder_channels for UNet needs 4 widths, got {widths}")
    return list(widths)


class TerraMindSegmenter(nn.Module):
    """TerraMind ViT + terratorch necks + decoder + head, mapping (B, C, H, W) to logits (B, K, H, W)."""

    backbone_prefix = "encoder"

    def __init__(
        self,
        encoder: nn.Module,
        channels: dict[str, list[int]],
        neck: nn.Module,
        decoder: nn.Module,
        head: nn.Module,
        num_backbone_layers: int,
        min_size: int,
        timesteps: int = 1,
        temporal_pooling: str = "concat",
    ) -> None:
        super().__init__()
        self.timesteps = timesteps
        self.temporal_pooling = temporal_pooling
        self.encoder = encoder
        self.neck = neck
        self.decoder = decoder
        self.head = head
        self.num_backbone_layers: int | None = num_backbone_layers
        self.min_size = min_size
        self.weights_report: dict[str, object] | None = None
        self.modalities = list(channels)
        for mod, indices in channels.items():
            self.register_buffer(f"channels_{mod}", torch.tensor(indices, dtype=torch.long), persistent=False)

    def split_modalities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The input's channels grouped into TerraMind's per-modality tensors."""
        return {mod: x.index_select(1, getattr(self, f"channels_{mod}")) for mod in self.modalities}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes, H, W); C = timesteps x the bands of one time step."""
        height, width = x.shape[-2:]
        if min(height, width) < self.min_size:
            raise ValueError(
                f"TerraMind with this decoder needs inputs of at least {self.min_size} x {self.min_size} pixels, "
                f"got {height} x {width}"
            )
        pad_h, pad_w = (-height) % PATCH_SIZE, (-width) % PATCH_SIZE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        size = (x.shape[-2], x.shape[-1])
        if self.timesteps > 1:  # every time step through the encoder as one batch: (B, T*C, H, W) -> (B*T, C, H, W)
            x = x.reshape(x.shape[0] * self.timesteps, x.shape[1] // self.timesteps, *size)
        tokens = self.encoder(self.split_modalities(x))
        tokens = [pool_over_time(t, self.timesteps, self.temporal_pooling) for t in tokens]
        features = self.neck(tokens, image_size=size)
        logits = self.head(self.decoder(features))
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def build_terramind(
    params: ModelParams, in_channels: int, band_names: list[str] | None = None, modalities: list[str] | None = None
) -> TerraMindSegmenter:
    """Build a TerraMind segmentation model offline (pretrained=False; optional local checkpoint)."""
    ensure_offline_hub()
    config = params.terramind
    requested = [normalise_modality(m) for m in config.modalities]
    if len(set(requested)) != len(requested):
        raise ModelConfigError(f"model.terramind.modalities lists a modality twice: {config.modalities}")
    steps = config.timesteps
    per_step, step_modalities, step_bands = timestep_groups(steps, in_channels, modalities, band_names)
    channels = modality_channels(requested, per_step, step_modalities, step_bands)
    depth = BLOCKS_PER_SIZE[config.size]
    taps = _tap_indices(params, depth)
    widths = _decoder_widths(params)

    from terratorch.models.decoders.unet_decoder import UNetDecoder
    from terratorch.models.decoders.upernet_decoder import UperNetDecoder
    from terratorch.models.heads import SegmentationHead
    from terratorch.models.necks import NeckSequential, build_neck_list
    from terratorch.registry import BACKBONE_REGISTRY

    encoder = BACKBONE_REGISTRY.build(f"terramind_v1_{config.size}", pretrained=False, modalities=requested)
    report: WeightsReport | None = None
    if config.checkpoint is not None:
        report = load_weights(encoder, Path(config.checkpoint))
    neck_ops: list[dict[str, object]] = [
        {"name": "SelectIndices", "indices": taps},
        {"name": "ReshapeTokensToImage", "remove_cls_token": False},
    ]
    if config.decoder == "UNet":
        neck_ops.append({"name": "LearnedInterpolateToPyramidal"})
    widen = steps if config.temporal_pooling == "concat" else 1
    necks, neck_channels = build_neck_list(neck_ops, [c * widen for c in encoder.out_channels])
    decoder: nn.Module
    if config.decoder == "UNet":
        assert isinstance(widths, list)
        decoder = UNetDecoder(embed_dim=neck_channels, channels=widths)
        min_size = 2 * PATCH_SIZE  # the pyramid's coarsest level halves the 1/16 token grid
    else:
        assert isinstance(widths, int)
        decoder = UperNetDecoder(embed_dim=neck_channels, channels=widths)
        min_size = PATCH_SIZE
    head = SegmentationHead(decoder.out_channels, num_classes=params.num_classes)
    model = TerraMindSegmenter(
        encoder, channels, NeckSequential(*necks), decoder, head, depth, min_size, steps, config.temporal_pooling
    )
    model.weights_report = report.as_dict() if report else None
    return model

"""Build any segmentation model of the workbench from `ModelParams`, offline.

`build_model` returns an nn.Module mapping (B, in_channels, H, W) to logits (B, num_classes, H, W) at full
resolution, for

* every segmentation_models_pytorch architecture (Unet, UnetPlusPlus, MAnet, Linknet, FPN, PSPNet,
  DeepLabV3, DeepLabV3Plus, PAN, UPerNet, Segformer, DPT), with any smp encoder or `tu-<timm model>`;
* "terramind": TerraMind v1 through terratorch (see workbench.models.terramind);
* "satunet": the attention-gated U-Net of workbench.models.satunet;
* "late_fusion": one encoder per band group (workbench.models.fusion).

Encoders are always created without downloadable weights; `model.encoder_weights` names a local file
that is loaded (and adapted to the band count) afterwards. Every model exposes `backbone_prefix`
(parameter-name prefix of the encoder, for optimiser groups) and `num_backbone_layers` (ViT depth for
layer-wise learning-rate decay, None for CNNs).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.weights import ModelConfigError, ensure_offline_hub, load_weights
from workbench.params import ModelParams

log = logging.getLogger(__name__)

CUSTOM_ARCHITECTURES = ("terramind", "satunet", "late_fusion")
DEFAULT_UNET_CHANNELS = (256, 128, 64, 32, 16)
#: smp architectures whose decoder takes one width per encoder stage.
PER_STAGE_DECODERS = ("unet", "unetplusplus", "manet")
#: smp architectures with a single decoder width, and the keyword it goes to.
SINGLE_WIDTH_KEYWORD = {
    "deeplabv3": "decoder_channels",
    "deeplabv3plus": "decoder_channels",
    "pan": "decoder_channels",
    "upernet": "decoder_channels",
    "fpn": "decoder_pyramid_channels",
    "segformer": "decoder_segmentation_channels",
    "pspnet": "psp_out_channels",
}
DPT_DEFAULT_DEPTH = 4


def smp_architectures() -> dict[str, str]:
    """Lower-case name -> smp's spelling of every smp architecture."""
    ensure_offline_hub()
    import segmentation_models_pytorch as smp

    return {key: cls.__name__ for key, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()}


def _close_hint(name: str, options: list[str]) -> str:
    lowered = {option.lower(): option for option in options}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def resolve_architecture(name: str) -> str:
    """The lower-case key of `name` among smp's and the workbench's architectures, or a ModelConfigError."""
    key = name.strip().lower().replace("-", "_")
    architectures = smp_architectures()
    if key in architectures or key in CUSTOM_ARCHITECTURES:
        return key
    valid = [*architectures.values(), *CUSTOM_ARCHITECTURES]
    raise ModelConfigError(
        f"unknown model.architecture {name!r}{_close_hint(name, valid)}; valid names: {', '.join(valid)}"
    )


def validate_encoder(name: str) -> None:
    """Accept an smp encoder name or `tu-<timm model>`; otherwise raise with the valid names."""
    ensure_offline_hub()
    import segmentation_models_pytorch as smp

    smp_names = list(smp.encoders.get_encoder_names())
    if name in smp_names:
        return
    if name.startswith("tu-"):
        import timm

        timm_name = name[3:]
        if timm.is_model(timm_name.split(".")[0]):
            return
        hint = _close_hint(timm_name, list(timm.list_models()))
        raise ModelConfigError(f"unknown timm encoder {name!r}: {timm_name!r} is not a timm model{hint}")
    raise ModelConfigError(
        f"unknown model.encoder {name!r}{_close_hint(name, smp_names)}; valid names: {', '.join(smp_names)}, "
        "or 'tu-<timm model name>'"
    )


def _single_width(params: ModelParams, display: str) -> int | None:
    channels = params.decoder_channels
    if channels is None:
        return None
    if len(channels) != 1:
        raise ModelConfigError(
            f"{display} takes one decoder width: set model.decoder_channels to one value like [256], got {channels}"
        )
    return channels[0]


def smp_kwargs(key: str, params: ModelParams) -> dict[str, Any]:
    """Architecture-specific keyword arguments: depth, decoder widths and the upsampling to full resolution."""
    display = smp_architectures()[key]
    depth = params.encoder_depth
    kwargs: dict[str, Any] = {"encoder_depth": depth}
    if key in PER_STAGE_DECODERS:
        channels = list(params.decoder_channels or DEFAULT_UNET_CHANNELS[:depth])
        if len(channels) != depth:
            raise ModelConfigError(
                f"{display} needs one decoder width per encoder stage: model.decoder_channels should have "
                f"{depth} entries (model.encoder_depth), got {channels}"
            )
        kwargs["decoder_channels"] = channels
    elif key in SINGLE_WIDTH_KEYWORD:
        width = _single_width(params, display)
        if width is not None:
            kwargs[SINGLE_WIDTH_KEYWORD[key]] = width
    elif key == "linknet" and params.decoder_channels is not None:
        raise ModelConfigError("Linknet has no decoder widths to set; remove model.decoder_channels")
    if key == "pspnet":
        kwargs["upsampling"] = 2**depth
    if key == "fpn":
        kwargs["upsampling"] = 2 ** (depth - 3)  # FPN's output sits at the stride of its 4th-deepest feature
    if key == "dpt":
        if not params.encoder.startswith("tu-"):
            raise ModelConfigError(
                f"DPT needs a timm ViT encoder such as 'tu-vit_tiny_patch16_224', got model.encoder={params.encoder!r}"
            )
        kwargs["dynamic_img_size"] = True  # any multiple of the patch size, not only the ViT's native size
        if params.decoder_channels is not None:
            kwargs["decoder_intermediate_channels"] = list(params.decoder_channels)
            kwargs["encoder_depth"] = len(params.decoder_channels)
        else:
            kwargs["encoder_depth"] = DPT_DEFAULT_DEPTH  # model.encoder_depth counts CNN stages, not ViT taps
    return kwargs


def _resize_to_input(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: bring logits to the input's height and width if an architecture stops short."""
    size = args[0].shape[-2:]
    if output.shape[-2:] != size:
        output = F.interpolate(output, size=size, mode="bilinear", align_corners=False)
    return output


def vit_depth(encoder: nn.Module) -> int | None:
    """Number of transformer blocks of a plain-ViT timm encoder (as in smp's DPT), None otherwise."""
    inner = getattr(encoder, "model", None)
    blocks = getattr(inner, "blocks", None)
    if type(encoder).__name__ == "TimmViTEncoder" and isinstance(blocks, nn.Sequential | nn.ModuleList):
        return len(blocks)
    return None


def build_smp_model(key: str, params: ModelParams, in_channels: int) -> nn.Module:
    """An smp model with no downloadable weights, optional local encoder weights, full-resolution logits."""
    validate_encoder(params.encoder)
    import segmentation_models_pytorch as smp

    kwargs = smp_kwargs(key, params)
    model = smp.create_model(
        key,
        encoder_name=params.encoder,
        encoder_weights=None,
        in_channels=in_channels,
        classes=params.num_classes,
        **kwargs,
    )
    model.register_forward_hook(_resize_to_input)
    setattr(model, "backbone_prefix", "encoder")  # noqa: B010 - smp models do not declare these attributes
    setattr(model, "num_backbone_layers", vit_depth(model.encoder))  # noqa: B010
    report = None
    if params.encoder_weights is not None:
        report = load_weights(model.encoder, Path(params.encoder_weights)).as_dict()
    setattr(model, "weights_report", report)  # noqa: B010
    return model


def build_late_fusion(params: ModelParams, in_channels: int, band_names: list[str] | None) -> nn.Module:
    """Late-fusion U-Net over `params.fusion_groups` (band names resolved against `band_names`)."""
    from workbench.models.fusion import LateFusionUNet, resolve_fusion_groups

    validate_encoder(params.encoder)
    groups = resolve_fusion_groups(params.fusion_groups, band_names)
    model = LateFusionUNet(
        groups,
        encoder_name=params.encoder,
        encoder_depth=params.encoder_depth,
        decoder_channels=params.decoder_channels,
        num_classes=params.num_classes,
    )
    if params.encoder_weights is not None:
        model.weights_report = [
            load_weights(encoder, Path(params.encoder_weights)).as_dict() for encoder in model.encoders
        ]
    return model


def build_satunet(params: ModelParams, in_channels: int) -> nn.Module:
    """The attention-gated U-Net (width `params.base_channels`, depth 4)."""
    from workbench.models.satunet import SatUNet

    model = SatUNet(in_channels, num_classes=params.num_classes, base_channels=params.base_channels, depth=4)
    if params.encoder_weights is not None:
        model.weights_report = load_weights(model.encoder, Path(params.encoder_weights)).as_dict()
    return model


def _check_labels(what: str, labels: list[str] | None, in_channels: int) -> None:
    if labels is not None and len(labels) != in_channels:
        raise ModelConfigError(f"got {len(labels)} {what} for {in_channels} input channels: {labels}")


def build_model(
    params: ModelParams,
    in_channels: int,
    band_names: list[str] | None = None,
    modalities: list[str] | None = None,
) -> nn.Module:
    """Build the model named by `params.architecture` for `in_channels` input bands.

    `band_names` and `modalities` label each input channel (from the chip store); late_fusion needs the
    names, TerraMind the modalities. The result maps (B, in_channels, H, W) to logits (B, K, H, W) and has
    `backbone_prefix` and `num_backbone_layers` attributes.
    """
    ensure_offline_hub()
    if in_channels < 1:
        raise ModelConfigError(f"in_channels must be at least 1, got {in_channels}")
    _check_labels("band names", band_names, in_channels)
    _check_labels("modality labels", modalities, in_channels)
    key = resolve_architecture(params.architecture)
    if key == "terramind":
        if params.encoder_weights is not None:
            raise ModelConfigError(
                "TerraMind loads its local weights from model.terramind.checkpoint, not model.encoder_weights"
            )
        from workbench.models.terramind import build_terramind

        model: nn.Module = build_terramind(params, in_channels, band_names, modalities)
    elif key == "satunet":
        model = build_satunet(params, in_channels)
    elif key == "late_fusion":
        model = build_late_fusion(params, in_channels, band_names)
    else:
        model = build_smp_model(key, params, in_channels)
    log.info("built %s: %s", params.architecture, describe_model(model)["total_parameters"])
    return model


def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Parameter counts (total, trainable, backbone, per top-level child) and backbone facts for the model card."""
    total, trainable = _count(model)
    prefix = getattr(model, "backbone_prefix", None)
    backbone = sum(p.numel() for name, p in model.named_parameters() if prefix and name.startswith(f"{prefix}."))
    children = {}
    for name, child in model.named_children():
        child_total, child_trainable = _count(child)
        children[name] = {"parameters": child_total, "trainable": child_trainable}
    return {
        "class": type(model).__name__,
        "total_parameters": total,
        "trainable_parameters": trainable,
        "backbone_prefix": prefix,
        "backbone_parameters": backbone,
        "num_backbone_layers": getattr(model, "num_backbone_layers", None),
        "children": children,
    }

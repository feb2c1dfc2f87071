"""Model factory: smp architectures, SatUNet, late fusion, TerraMind and local encoder weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from workbench.models.factory import build_model, describe_model
from workbench.models.fusion import resolve_fusion_groups
from workbench.models.satunet import SkipAttention
from workbench.models.terramind import default_tap_indices
from workbench.models.weights import ModelConfigError, WeightsFileError, adapt_input_conv, read_state_dict
from workbench.params import ModelParams, TerraMindConfig

S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
BANDS = [*S2_BANDS, "VV", "VH", "DEM"]
MODALITIES = ["S2L2A"] * 12 + ["S1GRD"] * 2 + ["DEM"]


def _params(**kwargs: object) -> ModelParams:
    return ModelParams.model_validate(kwargs)


def _build(params: ModelParams, in_channels: int, **labels: Any) -> Any:
    """build_model, typed loosely so tests can reach architecture-specific attributes."""
    return build_model(params, in_channels, **labels)


def _grads_everywhere(model: nn.Module) -> list[str]:
    """Names of trainable parameters that received no (or an all-zero) gradient."""
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]


# --------------------------------------------------------------------------- smp architectures

FAST_ENCODER = "mobilenet_v2"  # an smp encoder that builds and runs quickly on a CPU
SMP_CASES = [
    ("Unet", 64),
    ("UnetPlusPlus", 64),
    ("MAnet", 64),
    ("Linknet", 64),
    ("FPN", 64),
    ("PSPNet", 64),
    ("DeepLabV3", 64),
    ("DeepLabV3Plus", 64),
    ("PAN", 128),  # its pyramid attention pools the 1/16 map down to 1x1: 64 pixels is too small
    ("UPerNet", 64),
    ("Segformer", 64),
    ("unet", 64),  # names are case-insensitive
]


@pytest.mark.parametrize(("architecture", "size"), SMP_CASES)
def test_smp_architecture_builds_for_15_bands_at_full_resolution(architecture: str, size: int) -> None:
    model = _build(_params(architecture=architecture, encoder=FAST_ENCODER), in_channels=15).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 15, size, size))
    assert logits.shape == (1, 1, size, size)
    assert model.backbone_prefix == "encoder"
    assert model.num_backbone_layers is None
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert encoder_params == sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))


@pytest.mark.parametrize("architecture", ["FPN", "PSPNet"])
@pytest.mark.parametrize("depth", [3, 4, 5])
def test_upsampling_reaches_full_resolution_without_resizing(architecture: str, depth: int) -> None:
    """FPN and PSPNet get their final upsampling from the depth; calling forward() skips the resize guard."""
    params = _params(architecture=architecture, encoder=FAST_ENCODER, encoder_depth=depth)
    model = _build(params, in_channels=4).eval()
    with torch.no_grad():
        logits = model.forward(torch.randn(1, 4, 64, 64))
    assert logits.shape == (1, 1, 64, 64)


def test_unet_matches_smp_built_directly() -> None:
    params = _params(architecture="Unet", encoder_depth=3, decoder_channels=[32, 16, 8], num_classes=2)
    torch.manual_seed(0)
    ours = _build(params, in_channels=15).eval()
    torch.manual_seed(0)
    reference = smp.Unet("resnet18", encoder_weights=None, in_channels=15, classes=2, encoder_depth=3,
                         decoder_channels=[32, 16, 8]).eval()  # fmt: skip
    x = torch.randn(2, 15, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


def test_single_width_decoder_channels() -> None:
    model = _build(_params(architecture="DeepLabV3Plus", decoder_channels=[48]), in_channels=3)
    assert model.segmentation_head[0].in_channels == 48
    with pytest.raises(ModelConfigError, match="one decoder width"):
        _build(_params(architecture="DeepLabV3Plus", decoder_channels=[48, 24]), in_channels=3)
    with pytest.raises(ModelConfigError, match=r"3 entries \(model.encoder_depth\)"):
        _build(_params(architecture="Unet", encoder_depth=3, decoder_channels=[64, 32]), in_channels=3)


def test_dpt_with_timm_vit_reports_its_depth() -> None:
    model = _build(_params(architecture="DPT", encoder="tu-vit_tiny_patch16_224"), in_channels=15).eval()
    assert model.num_backbone_layers == 12  # vit_tiny has 12 transformer blocks
    with torch.no_grad():
        assert model(torch.randn(1, 15, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(ModelConfigError, match="timm ViT encoder"):
        _build(_params(architecture="DPT"), in_channels=15)


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(ModelConfigError) as info:
        _build(_params(architecture="Unett"), in_channels=3)
    message = str(info.value)
    assert "did you mean 'Unet'" in message
    for name in ("DeepLabV3Plus", "Segformer", "terramind", "satunet", "late_fusion"):
        assert name in message


def test_unknown_encoder_lists_valid_names() -> None:
    with pytest.raises(ModelConfigError) as info:
        _build(_params(encoder="resnet19"), in_channels=3)
    message = str(info.value)
    assert "resnet19" in message
    assert "did you mean 'resnet18'" in message
    assert all(name in message for name in smp.encoders.get_encoder_names())
    with pytest.raises(ModelConfigError, match="not a timm model"):
        _build(_params(encoder="tu-not_a_real_model"), in_channels=3)


def test_channel_labels_must_match_in_channels() -> None:
    with pytest.raises(ModelConfigError, match="2 band names for 3 input channels"):
        _build(_params(), in_channels=3, band_names=["a", "b"])


def test_building_sets_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _build(_params(architecture="satunet", base_channels=4), in_channels=2)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# --------------------------------------------------------------------------- SatUNet


def test_satunet_shapes_and_gradients_reach_every_parameter() -> None:
    model = _build(_params(architecture="satunet", base_channels=8, num_classes=1), in_channels=15)
    assert model.backbone_prefix == "encoder" and model.num_backbone_layers is None
    logits = model(torch.randn(2, 15, 32, 32))
    assert logits.shape == (2, 1, 32, 32)
    logits.square().mean().backward()
    assert _grads_everywhere(model) == []
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 15, 50, 37)).shape == (1, 1, 50, 37)  # sizes not divisible by 16


def test_skip_attention_weights_follow_the_pooled_statistics() -> None:
    """With a kernel that only reads the centre of the 'skip mean' map, the weight is sigmoid(channel mean)."""
    attention = SkipAttention(kernel_size=7).eval()
    conv, norm = attention.score[0], attention.score[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 3, 3] = 1.0
    skip, gate = torch.randn(2, 5, 8, 8), torch.randn(2, 3, 8, 8)
    expected = torch.sigmoid(skip.mean(1, keepdim=True) / (1 + norm.eps) ** 0.5)  # fresh running stats: 0 and 1
    torch.testing.assert_close(attention(skip, gate), expected)


# --------------------------------------------------------------------------- late fusion

FUSION_GROUPS = [S2_BANDS, ["VV", "VH"], ["DEM"]]


def test_late_fusion_shapes_and_gradients() -> None:
    params = _params(architecture="late_fusion", encoder=FAST_ENCODER, fusion_groups=FUSION_GROUPS)
    model = _build(params, in_channels=15, band_names=BANDS)
    assert model.backbone_prefix == "encoders"
    assert [encoder.out_channels[0] for encoder in model.encoders] == [12, 2, 1]
    logits = model(torch.randn(2, 15, 64, 64))  # 2x2 at the deepest stage: batch norm still passes gradients
    assert logits.shape == (2, 1, 64, 64)
    logits.square().mean().backward()
    assert _grads_everywhere(model) == []


def test_late_fusion_group_sees_only_its_bands() -> None:
    groups = [["VH", "VV"], S2_BANDS, ["DEM"]]
    params = _params(architecture="late_fusion", encoder=FAST_ENCODER, encoder_depth=3, fusion_groups=groups)
    model = _build(params, in_channels=15, band_names=BANDS).eval()
    seen: list[torch.Tensor] = []
    for encoder in model.encoders:
        encoder.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    x = torch.randn(1, 15, 32, 32)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(seen[0], x[:, [13, 12]])
    torch.testing.assert_close(seen[1], x[:, :12])
    torch.testing.assert_close(seen[2], x[:, [14]])


def test_fusion_groups_resolve_in_group_order() -> None:
    assert resolve_fusion_groups([["b", "a"], ["c"]], ["a", "b", "c"]) == [[1, 0], [2]]


def test_fusion_group_errors_name_the_bands() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown band 'B8a' \(did you mean 'B8A'\?\)"):
        resolve_fusion_groups([[*S2_BANDS[:8], "B8a", *S2_BANDS[9:]], ["VV", "VH", "DEM"]], BANDS)
    with pytest.raises(ModelConfigError, match="bands left out of every group: VH, DEM"):
        resolve_fusion_groups([S2_BANDS, ["VV"]], BANDS)
    with pytest.raises(ModelConfigError, match="band names"):
        resolve_fusion_groups(FUSION_GROUPS, None)


# --------------------------------------------------------------------------- encoder weights

SMALL_DECODER = [16, 16, 16, 16, 16]


def test_adapt_input_conv_hand_example() -> None:
    weight = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).repeat(2, 1, 2, 2)  # (2, 3, 2, 2)
    adapted = adapt_input_conv(weight, 15)
    expected = (torch.tensor([1.0, 2.0, 3.0] * 5) * 3 / 15).view(1, 15, 1, 1).expand(2, 15, 2, 2)
    torch.testing.assert_close(adapted, expected)
    torch.testing.assert_close(adapt_input_conv(weight, 1), torch.full((2, 1, 2, 2), 6.0))
    torch.testing.assert_close(adapt_input_conv(weight, 2)[0, :, 0, 0], torch.tensor([1.5, 3.0]))


def test_rgb_encoder_weights_adapted_to_15_bands_reproduce_rgb_features(tmp_path: Path) -> None:
    """Repeating R, G, B cyclically over 15 bands must give the 3-band encoder's features exactly."""
    torch.manual_seed(1)
    rgb_encoder = smp.encoders.get_encoder("resnet18", in_channels=3, depth=5, weights=None).eval()
    path = tmp_path / "imagenet_like.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in rgb_encoder.state_dict().items()}}, path)
    model = _build(_params(decoder_channels=SMALL_DECODER, encoder_weights=path), in_channels=15).eval()
    assert model.weights_report["adapted"] == ["conv1.weight"]
    rgb = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = rgb_encoder(rgb)[-1]
        got = model.encoder(rgb[:, torch.arange(15) % 3])[-1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_encoder_loaded_from_saved_state_dict_reproduces_outputs(tmp_path: Path, suffix: str) -> None:
    source = _build(_params(decoder_channels=SMALL_DECODER), in_channels=15).eval()
    state = {f"encoder.{k}": v.contiguous() for k, v in source.encoder.state_dict().items()}
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = _build(_params(decoder_channels=SMALL_DECODER, encoder_weights=path), in_channels=15).eval()
    assert model.weights_report["missing"] == [] and model.weights_report["unexpected"] == []
    x = torch.randn(1, 15, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x)[-1], source.encoder(x)[-1])


def test_weights_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _build(_params(encoder_weights=missing), in_channels=3)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"some.other.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(WeightsFileError, match="no tensor of weights file"):
        _build(_params(encoder_weights=unrelated), in_channels=3)
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("not a checkpoint")
    with pytest.raises(WeightsFileError, match=r"notes\.pt"):
        read_state_dict(not_weights)


# --------------------------------------------------------------------------- describe_model


def test_describe_model_counts_hand_example() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))  # 2*3+3 = 9 and 3*1+1 = 4 parameters
    model[0].requires_grad_(False)
    described = describe_model(model)
    assert described["total_parameters"] == 13
    assert described["trainable_parameters"] == 4
    assert described["children"] == {"0": {"parameters": 9, "trainable": 0}, "1": {"parameters": 4, "trainable": 4}}


# --------------------------------------------------------------------------- TerraMind


def test_default_tap_indices_spread_over_depth() -> None:
    assert default_tap_indices(12) == [2, 5, 8, 11]
    assert default_tap_indices(24) == [5, 11, 17, 23]


@pytest.mark.parametrize(("decoder", "widths"), [("UperNet", 64), ("UNet", [64, 32, 16, 8])])
def test_terramind_tiny_builds_offline_with_15_bands_and_trains_a_step(decoder: str, widths: int | list[int]) -> None:
    torch.manual_seed(0)
    params = _params(
        architecture="terramind", terramind=TerraMindConfig(size="tiny", decoder=decoder, decoder_channels=widths)
    )
    model = _build(params, in_channels=15, band_names=BANDS, modalities=MODALITIES)
    assert model.backbone_prefix == "encoder" and model.num_backbone_layers == 12
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logits = model(torch.randn(2, 15, 224, 224))
    assert logits.shape == (2, 1, 224, 224)
    nn.functional.binary_cross_entropy_with_logits(logits, torch.randint(0, 2, logits.shape).float()).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.encoder.") for n in changed)  # ViT blocks
    assert any(n.startswith("decoder.") for n in changed)
    assert any(n.startswith("head.") for n in changed)


def test_terramind_other_sizes() -> None:
    """Positional embeddings are interpolated: 224 is not required; odd sizes are padded and cropped."""
    params = _params(architecture="terramind", terramind=TerraMindConfig(decoder="UperNet", decoder_channels=16))
    model = _build(params, in_channels=15, modalities=MODALITIES).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 15, 64, 96)).shape == (1, 1, 64, 96)
        assert model(torch.randn(1, 15, 40, 50)).shape == (1, 1, 40, 50)


def test_terramind_wrong_band_count_names_modality_and_expected_count() -> None:
    params = _params(architecture="terramind")
    modalities = ["S2L2A"] * 11 + ["S1GRD"] * 3 + ["DEM"]
    with pytest.raises(ModelConfigError, match=r"TerraMind modality S2L2A expects 12 bands .* got 11"):
        _build(params, in_channels=15, modalities=modalities)
    with pytest.raises(ModelConfigError, match="asks for DEM but no input band belongs to it"):
        _build(params, in_channels=14, modalities=MODALITIES[:14])
    with pytest.raises(ModelConfigError, match="pass the per-band modality labels"):
        _build(params, in_channels=14)


def test_terramind_reorders_named_bands_to_pretrained_order() -> None:
    order = [*reversed(range(12)), 13, 12, 14]  # S2 bands reversed, VH before VV
    params = _params(architecture="terramind")
    model = _build(
        params, in_channels=15, band_names=[BANDS[i] for i in order], modalities=[MODALITIES[i] for i in order]
    )
    assert model.channels_S2L2A.tolist() == list(reversed(range(12)))  # B01 sits at position 11
    assert model.channels_S1GRD.tolist() == [13, 12]


def test_terramind_checkpoint_reproduces_backbone(tmp_path: Path) -> None:
    params = _params(architecture="terramind")
    source = _build(params, in_channels=15, modalities=MODALITIES).eval()
    path = tmp_path / "terramind_tiny.pt"
    torch.save({f"model.encoder.{k}": v for k, v in source.encoder.state_dict().items()}, path)
    params.terramind.checkpoint = path
    model = _build(params, in_channels=15, modalities=MODALITIES).eval()
    assert model.weights_report["missing"] == []
    x = torch.randn(1, 15, 32, 32)
    with torch.no_grad():
        expected = source.encoder(source.split_modalities(x))[-1]
        torch.testing.assert_close(model.encoder(model.split_modalities(x))[-1], expected)


# --------------------------------------------------------------------------- TerraMind over time steps


def steps_labels(steps: int) -> tuple[list[str], list[str]]:
    """Band names and modality labels of `steps` consecutive groups, suffixed _t<k>."""
    bands = [f"{name}_t{k}" for k in range(steps) for name in BANDS]
    modalities = [f"{mod}_t{k}" for k in range(steps) for mod in MODALITIES]
    return bands, modalities


def temporal_params(steps: int, pooling: str) -> ModelParams:
    config = TerraMindConfig(decoder="UperNet", decoder_channels=16, timesteps=steps, temporal_pooling=pooling)
    return _params(architecture="terramind", terramind=config)


def test_terramind_mean_over_identical_time_steps_equals_the_single_step_model() -> None:
    torch.manual_seed(0)
    single = _build(temporal_params(1, "mean"), in_channels=15, band_names=BANDS, modalities=MODALITIES).eval()
    bands, modalities = steps_labels(3)
    temporal = _build(temporal_params(3, "mean"), in_channels=45, band_names=bands, modalities=modalities).eval()
    temporal.load_state_dict(single.state_dict())  # mean pooling keeps every width: the same weights fit
    x = torch.randn(2, 15, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(temporal(torch.cat([x, x, x], dim=1)), single(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "max", "concat"])
def test_terramind_temporal_pooling_order_sensitivity(pooling: str) -> None:
    torch.manual_seed(1)
    bands, modalities = steps_labels(2)
    model = _build(temporal_params(2, pooling), in_channels=30, band_names=bands, modalities=modalities).eval()
    first, second = torch.randn(1, 15, 32, 32), torch.randn(1, 15, 32, 32)
    with torch.no_grad():
        forward = model(torch.cat([first, second], dim=1))
        backward = model(torch.cat([second, first], dim=1))
    assert forward.shape == (1, 1, 32, 32)
    if pooling == "concat":  # the decoder sees which step came first
        assert not torch.allclose(forward, backward)
    else:  # mean and max do not depend on the order of the time steps
        torch.testing.assert_close(forward, backward, rtol=1e-4, atol=1e-5)


def test_terramind_concat_pooling_widens_the_decoder_input_and_trains() -> None:
    torch.manual_seed(2)
    bands, modalities = steps_labels(4)
    model = _build(temporal_params(4, "concat"), in_channels=60, band_names=bands, modalities=modalities)
    single = _build(temporal_params(1, "concat"), in_channels=15, band_names=BANDS, modalities=MODALITIES)
    widths = {n: p.shape for n, p in model.decoder.named_parameters()}
    single_widths = {n: p.shape for n, p in single.decoder.named_parameters()}
    assert any(widths[n] != single_widths[n] for n in widths)  # four times the features reach the decoder
    logits = model(torch.randn(2, 60, 32, 32))
    nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


def test_terramind_time_steps_must_repeat_the_same_bands() -> None:
    bands, modalities = steps_labels(2)
    with pytest.raises(ModelConfigError, match="needs a multiple of 2 input bands, got 29"):
        _build(temporal_params(2, "concat"), in_channels=29, band_names=bands[:29], modalities=modalities[:29])
    swapped = [*bands[:15], *bands[16:17], *bands[15:16], *bands[17:]]
    with pytest.raises(ModelConfigError, match="time step 1 holds bands"):
        _build(temporal_params(2, "concat"), in_channels=30, band_names=swapped, modalities=modalities)
    mislabelled = [*bands[:14], "DEM_t1", *bands[15:]]
    with pytest.raises(ModelConfigError, match=r"band labels \['DEM_t1'\] sit in time step 0"):
        _build(temporal_params(2, "concat"), in_channels=30, band_names=mislabelled, modalities=modalities)


def test_time_steps_from_geotiffs_per_modality_and_step_feed_terramind(tmp_path: Path) -> None:
    """One GeoTIFF per modality and time step, ingested into a store, builds and runs a two-step model."""
    from conftest import load_fakes

    from workbench.data.ingest import ingest
    from workbench.data.store import read_store_meta

    fakes = load_fakes()
    transform = fakes.utm_transform()
    images = []
    for step in range(2):
        for modality, count in (("S1RTC", 2), ("DEM", 1)):
            path = tmp_path / f"{modality}_t{step}.tif"
            fakes.write_tif(path, fakes.band_pattern(count, 32, 32) + step, transform, fakes.UTM_CRS)
            images.append(path.name)
    fakes.write_tif(tmp_path / "label.tif", fakes.square_label(32, 32, 4, 4, 8), transform, fakes.UTM_CRS)
    names = ["VV_t0", "VH_t0", "DEM_t0", "VV_t1", "VH_t1", "DEM_t1"]
    ingest("geotiff", tmp_path, tmp_path / "store", chip_size=32, progress=False,
           images=images, label="label.tif", band_names=names)  # fmt: skip
    meta = read_store_meta(tmp_path / "store")
    bands = [band["name"] for band in meta["bands"]]
    modalities = [band["modality"] for band in meta["bands"]]
    assert bands == names and modalities == ["S1RTC_t0", "S1RTC_t0", "DEM_t0", "S1RTC_t1", "S1RTC_t1", "DEM_t1"]
    config = TerraMindConfig(modalities=["S1RTC", "DEM"], decoder_channels=16, timesteps=2)
    model = _build(_params(architecture="terramind", terramind=config), 6, band_names=bands, modalities=modalities)
    assert model.channels_S1RTC.tolist() == [0, 1] and model.channels_DEM.tolist() == [2]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 6, 32, 32)).shape == (1, 1, 32, 32)

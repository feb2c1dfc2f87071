"""The model dir: round trip, calibration, clear errors for missing files and mismatched bands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from workbench.data.normalize import NormalizationStats
from workbench.models.bundle import BandMismatchError, check_bands, load_bundle, save_bundle, write_calibration
from workbench.params import ModelParams
from workbench.run import CALIBRATION_FILE, CHECKSUMS_FILE, MODEL_FILE, STATS_FILE

BANDS = ["B03", "B11", "VV"]
MODALITIES = ["S2L2A", "S2L2A", "S1GRD"]


def conv_model(params: ModelParams, in_channels: int) -> nn.Module:
    return nn.Conv2d(in_channels, params.num_classes, kernel_size=1)


def stats(bands: list[str] = BANDS) -> NormalizationStats:
    return NormalizationStats(
        bands=bands, method="zscore", mean=[float(i) for i in range(len(bands))], std=[2.0] * len(bands)
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = conv_model(ModelParams(), len(BANDS))
    save_bundle(tmp_path / "model", model, ModelParams(architecture="Unet"), BANDS, MODALITIES, stats())
    return tmp_path / "model", model


def test_round_trip_restores_weights_and_metadata(saved: tuple[Path, nn.Module]) -> None:
    model_dir, model = saved
    bundle = load_bundle(model_dir, conv_model)
    assert not bundle.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[key], value)
    assert bundle.bands == BANDS and bundle.modalities == MODALITIES
    assert bundle.model_params == ModelParams(architecture="Unet")
    assert bundle.normalization.mean == [0.0, 1.0, 2.0]
    assert (bundle.temperature, bundle.threshold) == (1.0, 0.5)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), model(x))


def test_model_file_holds_only_plain_data(saved: tuple[Path, nn.Module]) -> None:
    payload = torch.load(saved[0] / MODEL_FILE, weights_only=True)
    assert payload["format"] == 1
    assert payload["bands"] == BANDS
    assert ModelParams.model_validate(payload["model_params"]).architecture == "Unet"


def test_statistics_are_stored_in_model_band_order(tmp_path: Path) -> None:
    shuffled = NormalizationStats(bands=["VV", "B03", "B11"], method="zscore", mean=[5.0, 6.0, 7.0], std=[1, 2, 3])
    save_bundle(tmp_path, conv_model(ModelParams(), 3), ModelParams(), BANDS, MODALITIES, shuffled)
    bundle = load_bundle(tmp_path, conv_model)
    assert bundle.normalization.bands == BANDS
    assert bundle.normalization.mean == [6.0, 7.0, 5.0]


def test_statistics_can_come_from_a_file(tmp_path: Path) -> None:
    stats().save(tmp_path / "stats.json")
    save_bundle(tmp_path / "m", conv_model(ModelParams(), 3), ModelParams(), BANDS, MODALITIES, tmp_path / "stats.json")
    assert json.loads((tmp_path / "m" / STATS_FILE).read_text())["bands"] == BANDS


def test_compiled_model_prefix_is_stripped(tmp_path: Path) -> None:
    wrapper = nn.Module()
    wrapper._orig_mod = conv_model(ModelParams(), 3)  # the attribute name torch.compile uses
    save_bundle(tmp_path, wrapper, ModelParams(), BANDS, MODALITIES, stats())
    assert set(torch.load(tmp_path / MODEL_FILE, weights_only=True)["state_dict"]) == {"weight", "bias"}


def test_calibration_is_read(saved: tuple[Path, nn.Module]) -> None:
    write_calibration(saved[0], {"temperature": 1.7, "threshold": 0.35, "ece": 0.01})
    bundle = load_bundle(saved[0], conv_model)
    assert (bundle.temperature, bundle.threshold) == (1.7, 0.35)
    assert bundle.calibration["ece"] == 0.01


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"temperature": -1}, {"threshold": 1.0}, {"threshold": 0}])
def test_invalid_calibration_is_rejected(saved: tuple[Path, nn.Module], bad: dict[str, float]) -> None:
    (saved[0] / CALIBRATION_FILE).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=CALIBRATION_FILE):
        load_bundle(saved[0], conv_model)


@pytest.mark.parametrize("name", [MODEL_FILE, STATS_FILE])
def test_missing_file_names_the_file(saved: tuple[Path, nn.Module], name: str) -> None:
    (saved[0] / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        load_bundle(saved[0], conv_model)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_bundle(tmp_path / "nowhere", conv_model)


def test_pickled_objects_are_refused(saved: tuple[Path, nn.Module]) -> None:
    # a full pickled module is not plain data: weights_only loading must refuse it
    buffer = io.BytesIO()
    torch.save({"format": 1, "model": nn.Conv2d(3, 1, 1)}, buffer)
    (saved[0] / MODEL_FILE).write_bytes(buffer.getvalue())
    (saved[0] / CHECKSUMS_FILE).unlink()  # past the checksum check (which refuses any changed file)
    with pytest.warns(UserWarning, match="checksums"), pytest.raises(ValueError, match="not a readable model file"):
        load_bundle(saved[0], conv_model)


def test_other_format_is_refused(saved: tuple[Path, nn.Module]) -> None:
    payload = torch.load(saved[0] / MODEL_FILE, weights_only=True)
    payload["format"] = 7
    torch.save(payload, saved[0] / MODEL_FILE)
    (saved[0] / CHECKSUMS_FILE).unlink()  # past the checksum check (which refuses any changed file)
    with pytest.warns(UserWarning, match="checksums"), pytest.raises(ValueError, match="format 7"):
        load_bundle(saved[0], conv_model)


def test_weights_that_do_not_fit_are_refused(saved: tuple[Path, nn.Module]) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        load_bundle(saved[0], lambda params, c: nn.Conv2d(c, 2, kernel_size=1))


def test_statistics_for_other_bands_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="VV"):
        save_bundle(tmp_path, conv_model(ModelParams(), 3), ModelParams(), BANDS, MODALITIES, stats(["B03", "B11"]))


def test_one_modality_per_band(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modalit"):
        save_bundle(tmp_path, conv_model(ModelParams(), 3), ModelParams(), BANDS, ["S2L2A"], stats())


def test_check_bands_accepts_identical_list(saved: tuple[Path, nn.Module]) -> None:
    check_bands(load_bundle(saved[0], conv_model), list(BANDS))


@pytest.mark.parametrize(
    ("bands", "expected"),
    [
        (["B03", "B11"], r"missing \['VV'\]"),
        (["B03", "B11", "VV", "DEM"], r"extra \['DEM'\]"),
        (["VV", "B03", "B11"], "another order"),
    ],
)
def test_check_bands_explains_the_difference(bands: list[str], expected: str) -> None:
    with pytest.raises(BandMismatchError, match=expected) as info:
        check_bands(BANDS, bands, source="scene.tif")
    assert "scene.tif" in str(info.value)


def test_default_builder_round_trips_an_smp_unet(tmp_path: Path) -> None:
    factory = pytest.importorskip("workbench.models.factory")
    params = ModelParams(architecture="Unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 4])
    model = factory.build_model(params, len(BANDS))
    save_bundle(tmp_path, model, params, BANDS, MODALITIES, stats())
    bundle = load_bundle(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), model(x))

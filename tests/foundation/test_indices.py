"""Spectral indices: hand-computed values, numpy/torch parity and physical facts on real samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.indices import (
    BandNotFoundError,
    mndwi,
    ndsi,
    ndvi,
    ndwi,
    normalized_difference,
    water_mask,
)

S2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


def _image(pixels: list[dict[str, float]], names: list[str] = S2) -> np.ndarray:
    """A (band, 1, n) image from per-pixel band values (missing bands 0)."""
    return np.array([[[pixel.get(name, 0.0) for pixel in pixels]] for name in names], dtype=np.float32)


def test_normalized_difference_hand_values_and_zero_denominator() -> None:
    a = np.array([3.0, 0.0, 1.0, -1.0, 2.0, 5.0])
    b = np.array([1.0, 0.0, 1.0, 0.0, -1.0, -7.0])
    # (3-1)/4, 0/0 -> 0, 0/2, denom -1 <= 0 -> 0, 3/1, denom -2 <= 0 -> 0
    expected = np.array([0.5, 0.0, 0.0, 0.0, 3.0, 0.0])
    with np.errstate(all="raise"):  # no division warnings either
        result = normalized_difference(a, b)
    np.testing.assert_allclose(result, expected)
    assert result.dtype == np.float64


def test_normalized_difference_integer_input_gives_float32() -> None:
    result = normalized_difference(np.array([1000, 0], dtype=np.uint16), np.array([100, 0], dtype=np.uint16))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, [900 / 1100, 0.0], rtol=1e-6)


def test_torch_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(-100, 3000, size=(2, 5, 5))
    b = rng.uniform(-100, 3000, size=(2, 5, 5))
    a[0, 0, 0] = b[0, 0, 0] = 0.0
    expected = normalized_difference(a, b)
    result = normalized_difference(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(result, torch.Tensor)
    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), expected)
    assert float(result[0, 0, 0]) == 0.0
    assert torch.isfinite(result).all()


def test_mndwi_selects_bands_by_name_in_any_order() -> None:
    pixels = [{"B03": 1000.0, "B11": 100.0}, {"B03": 1500.0, "B11": 2500.0}, {}]
    names = list(reversed(S2))
    image = _image(pixels, names)
    np.testing.assert_allclose(mndwi(image, names)[0], [900 / 1100, -1000 / 4000, 0.0], rtol=1e-6)
    # custom band names for another sensor
    image = _image([{"green": 0.2, "swir": 0.05}], ["blue", "green", "swir"])
    np.testing.assert_allclose(mndwi(image, ["blue", "green", "swir"], green="green", swir="swir"), [[0.6]], rtol=1e-6)


def test_indices_work_on_torch_batches() -> None:
    image = _image([{"B03": 800.0, "B04": 500.0, "B08": 3600.0, "B11": 2200.0}])
    batch = torch.from_numpy(np.stack([image, image * 2]))  # (B, C, H, W)
    assert tuple(ndvi(batch, S2).shape) == (2, 1, 1)
    np.testing.assert_allclose(ndvi(batch, S2).numpy(), np.full((2, 1, 1), 3100 / 4100), rtol=1e-6)
    np.testing.assert_allclose(ndwi(batch, S2).numpy(), np.full((2, 1, 1), -2800 / 4400), rtol=1e-6)
    np.testing.assert_allclose(mndwi(batch, S2).numpy(), np.full((2, 1, 1), -1400 / 3000), rtol=1e-6)


def test_ndsi_equals_mndwi_and_water_mask_thresholds() -> None:
    pixels = [{"B03": 1000.0, "B11": 100.0}, {"B03": 1200.0, "B11": 800.0}, {"B03": 1500.0, "B11": 2500.0}]
    image = _image(pixels)
    np.testing.assert_array_equal(ndsi(image, S2), mndwi(image, S2))
    # MNDWI = 0.818, 0.2, -0.25
    assert water_mask(image, S2).tolist() == [[True, True, False]]
    assert water_mask(image, S2, threshold=0.3).tolist() == [[True, False, False]]
    assert water_mask(torch.from_numpy(image), S2).dtype == torch.bool


def test_physical_facts_on_typical_spectra() -> None:
    """Textbook reflectances (x 10000): water dark in SWIR, meadow with a red edge, snow dark in SWIR."""
    water = {"B03": 900.0, "B04": 450.0, "B08": 200.0, "B11": 100.0}
    meadow = {"B03": 800.0, "B04": 500.0, "B08": 3600.0, "B11": 2200.0}
    rock = {"B03": 1700.0, "B04": 2000.0, "B08": 2500.0, "B11": 2900.0}
    snow = {"B03": 8900.0, "B04": 8600.0, "B08": 7400.0, "B11": 900.0}
    image = _image([water, meadow, rock, snow])
    index = mndwi(image, S2)[0]
    assert index[0] > 0 and index[1] < 0 and index[2] < 0
    assert index[3] > 0.4  # snow: the classic MNDWI confuser
    vegetation = ndvi(image, S2)[0]
    assert vegetation[1] > 0.5 and vegetation[0] < 0 and vegetation[1] > vegetation[2]


def test_unknown_band_and_shape_mismatch_are_clear_errors() -> None:
    image = _image([{"B03": 1.0}])
    with pytest.raises(BandNotFoundError, match=r"'B99'.*B01"):
        mndwi(image, S2, swir="B99")
    with pytest.raises(ValueError, match="12 band names"):
        mndwi(image[:5], S2)


@pytest.mark.shared_data
def test_real_sentinel2_water_trees_and_snow(shared_data: Path) -> None:
    """TerraMesh S2 L2A samples with their land-cover map: 1 = water, 2 = trees, 7 = snow/ice."""
    rasterio = pytest.importorskip("rasterio")
    folder = shared_data / "terramesh-examples"

    def read(kind: str, name: str) -> np.ndarray:
        with rasterio.open(folder / kind / f"{name}.tif") as src:
            return np.asarray(src.read())

    image = read("S2L2A", "282D_485L_3_3")
    cover = read("LULC", "282D_485L_3_3")[0]
    index, vegetation = mndwi(image, S2), ndvi(image, S2)
    assert np.median(index[cover == 1]) > 0 > np.median(index[cover == 2])
    assert np.median(vegetation[cover == 2]) > 0.5 > np.median(vegetation[cover == 1])

    snow_image = read("S2L2A", "609U_541L_3_0")
    snow = read("LULC", "609U_541L_3_0")[0] == 7
    assert snow.mean() > 0.9
    assert np.mean(ndsi(snow_image, S2)[snow] > 0) > 0.95  # snow passes a water test by MNDWI


@pytest.mark.shared_data
def test_real_cloud_shadows_raise_mndwi(shared_data: Path) -> None:
    """Landsat reference masks (0 = cloud shadow, 3 = clear): shadows keep blue-rich skylight, so MNDWI rises."""
    bands = ["Blue", "Green", "Red", "NIR", "SWIR16", "SWIR22"]
    for name in ("landsat5", "landsat7"):
        with np.load(shared_data / "ukis-csmask" / f"{name}.npz") as data:
            image = np.moveaxis(data["img"], -1, 0)
            mask = data["msk"][..., 0]
        index = mndwi(image, bands, green="Green", swir="SWIR16")
        assert np.median(index[mask == 0]) > np.median(index[mask == 3]) + 0.1, name

"""Sliding-window and large-raster inference against hand-computed and library expectations."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from pyproj import Geod
from rasterio.transform import from_origin
from scipy import ndimage
from scipy.signal.windows import gaussian
from shapely.geometry import shape
from torch import nn

from workbench.arrays import window_starts
from workbench.data.normalize import NormalizationStats
from workbench.infer import (
    RasterInputError,
    block_size_for_memory,
    gaussian_weight,
    plan_blocks,
    predict_array,
    predict_raster,
    sliding_window_logits,
)
from workbench.infer.raster import NoCrsWarning
from workbench.models.bundle import BandMismatchError, ModelBundle, load_bundle, save_bundle, write_calibration
from workbench.params import ModelParams

BANDS = ["B03", "B11"]
NODATA = -9999.0
PIXEL = 10.0
ORIGIN = (500_000.0, 4_800_000.0)  # UTM 43N, near Almaty


class FirstChannel(nn.Module):
    """Returns its first input channel as the logit."""

    def __init__(self) -> None:
        super().__init__()
        self.windows_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows_seen += x.shape[0]
        return x[:, :1].clone()


class ConstantLogit(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], self.value)


class WindowMean(nn.Module):
    """Each window's logit is the mean of its first channel: windows disagree, so blending shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].mean(dim=(-2, -1), keepdim=True).expand_as(x[:, :1]).clone()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def identity_bundle(method: str = "none", temperature: float = 1.0) -> ModelBundle:
    stats = NormalizationStats(bands=BANDS, method="zscore", mean=[1.0, 0.0], std=[2.0, 1.0])
    if method == "none":
        stats = NormalizationStats(bands=BANDS, method="none")
    return ModelBundle(FirstChannel(), ModelParams(), list(BANDS), ["S2L2A"] * 2, stats, temperature=temperature)


# --------------------------------------------------------------------------- window geometry


@pytest.mark.parametrize(
    ("size", "window", "stride", "expected"),
    [
        (500, 224, 112, [0, 112, 224, 276]),
        (224, 224, 112, [0]),
        (100, 224, 112, [0]),
        (448, 224, 224, [0, 224]),
        (450, 224, 224, [0, 224, 226]),
        (10, 4, 3, [0, 3, 6]),
    ],
)
def test_window_starts(size: int, window: int, stride: int, expected: list[int]) -> None:
    assert window_starts(size, window, stride) == expected


@pytest.mark.parametrize(("size", "window", "stride"), [(97, 16, 5), (64, 16, 16), (1000, 224, 112), (17, 16, 1)])
def test_window_starts_cover_every_pixel_and_end_flush(size: int, window: int, stride: int) -> None:
    starts = window_starts(size, window, stride)
    covered = np.zeros(size, dtype=int)
    for start in starts:
        covered[start : start + window] += 1
    assert covered.min() >= 1
    assert starts[-1] + window == size
    assert all(b - a <= stride for a, b in itertools.pairwise(starts))


def test_stride_larger_than_window_is_refused() -> None:
    with pytest.raises(ValueError, match="stride"):
        window_starts(100, 16, 32)


@pytest.mark.parametrize("window", [8, 15, 224])
def test_gaussian_weight_matches_scipy(window: int) -> None:
    expected = np.outer(gaussian(window, window / 4), gaussian(window, window / 4))
    np.testing.assert_allclose(gaussian_weight(window), expected / expected.max(), rtol=1e-6)


# --------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize(
    ("height", "width", "window", "stride"),
    [
        (20, 30, 32, 16),  # smaller than the window (padded)
        (32, 32, 32, 16),  # equal
        (70, 45, 32, 16),  # larger, overlapping windows
        (70, 45, 32, 32),  # larger, windows only touch (last one flush)
        (64, 64, 32, 32),  # exact tiling
    ],
)
@pytest.mark.parametrize("pad_mode", ["reflect", "zero"])
def test_identity_model_is_reproduced_exactly(height: int, width: int, window: int, stride: int, pad_mode: str) -> None:
    image = np.random.default_rng(0).normal(0, 3, (2, height, width)).astype(np.float32)
    logits = sliding_window_logits(
        FirstChannel(), image, window, stride, batch_size=3, pad_mode=pad_mode, progress=False
    )
    assert logits.shape == (1, height, width)
    np.testing.assert_allclose(logits[0], image[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tta", ["minimal", "standard", "full"])
def test_identity_model_with_tta(tta: str) -> None:
    image = np.random.default_rng(1).normal(size=(2, 50, 40)).astype(np.float32)
    logits = sliding_window_logits(FirstChannel(), image, 16, 8, tta=tta, progress=False)
    np.testing.assert_allclose(logits[0], image[0], rtol=1e-6, atol=1e-6)


def test_predict_array_gives_sigmoid_of_input() -> None:
    image = np.random.default_rng(2).normal(0, 4, (2, 70, 45)).astype(np.float32)
    probs = predict_array(identity_bundle(), image, window=32, stride=16, progress=False)
    np.testing.assert_allclose(probs[0], sigmoid(image[0]), atol=1e-6)


def test_predict_array_applies_normalisation_and_temperature() -> None:
    image = np.random.default_rng(3).normal(0, 4, (2, 40, 40)).astype(np.float32)
    probs = predict_array(identity_bundle("zscore", temperature=2.0), image, window=16, stride=8, progress=False)
    np.testing.assert_allclose(probs[0], sigmoid((image[0] - 1.0) / 2.0 / 2.0), atol=1e-6)


def test_constant_logit_survives_blending() -> None:
    logits = sliding_window_logits(ConstantLogit(2.5), np.zeros((3, 70, 45), np.float32), 32, 16, progress=False)
    np.testing.assert_allclose(logits, 2.5, rtol=1e-6)


def test_blending_is_the_gaussian_weighted_average_of_window_logits() -> None:
    rng = np.random.default_rng(4)
    image = rng.normal(size=(1, 40, 24)).astype(np.float32)
    window, stride = 16, 8
    profile = gaussian(window, window / 4)
    weight = np.outer(profile, profile)
    numerator = np.zeros((40, 24))
    denominator = np.zeros((40, 24))
    for r in (0, 8, 16, 24):
        for c in (0, 8):
            patch = image[0, r : r + window, c : c + window]
            numerator[r : r + window, c : c + window] += weight * patch.mean()
            denominator[r : r + window, c : c + window] += weight
    logits = sliding_window_logits(WindowMean(), image, window, stride, batch_size=5, progress=False)
    np.testing.assert_allclose(logits[0], numerator / denominator, rtol=1e-5, atol=1e-6)


def test_invalid_pixels_are_nan_and_empty_windows_are_skipped() -> None:
    image = np.random.default_rng(5).normal(size=(2, 64, 16)).astype(np.float32)
    valid = np.ones((64, 16), dtype=bool)
    valid[:16] = False  # the first window holds only nodata
    valid[40, 3] = False
    image[1, 50, 7] = np.nan  # a non-finite value in any band is nodata too
    model = FirstChannel()
    logits = sliding_window_logits(model, image, 16, 16, valid=valid, progress=False)[0]
    assert model.windows_seen == 3
    expected_invalid = ~valid
    expected_invalid[50, 7] = True
    np.testing.assert_array_equal(np.isnan(logits), expected_invalid)
    np.testing.assert_allclose(logits[~expected_invalid], image[0][~expected_invalid], rtol=1e-6)


def test_all_nodata_image_gives_all_nan() -> None:
    model = FirstChannel()
    logits = sliding_window_logits(model, np.full((2, 20, 20), np.nan, np.float32), 16, 8, progress=False)
    assert np.isnan(logits).all() and model.windows_seen == 0


def test_multiscale_keeps_a_constant_and_approximates_a_smooth_field() -> None:
    logits = sliding_window_logits(ConstantLogit(-1.0), np.zeros((1, 48, 40), np.float32), 16, 8, scales=(1.0, 0.5))
    np.testing.assert_allclose(logits, -1.0, rtol=1e-6)
    ramp = np.broadcast_to(np.linspace(-2, 2, 40, dtype=np.float32), (1, 48, 40)).copy()
    smooth = sliding_window_logits(FirstChannel(), ramp, 16, 8, scales=(1.0, 0.5), progress=False)
    np.testing.assert_allclose(smooth[0, :, 2:-2], ramp[0, :, 2:-2], atol=0.02)


def test_model_changing_the_size_is_reported() -> None:
    class Shrinks(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1, :-1, :-1]

    with pytest.raises(ValueError, match="spatial size"):
        sliding_window_logits(Shrinks(), np.zeros((1, 20, 20), np.float32), 16, 8, progress=False)


# --------------------------------------------------------------------------- block plan


def test_blocks_read_every_window_touching_their_core() -> None:
    blocks = plan_blocks(1000, 300, 64, 32, 256)
    assert len(blocks) == 4 * 2
    covered = np.zeros((1000, 300), dtype=int)
    for block in blocks:
        for span, size in ((block.rows, 1000), (block.cols, 300)):
            touching = [s for s in window_starts(size, 64, 32) if s < span.core1 and s + 64 > span.core0]
            assert [s + span.read0 for s in span.starts] == touching
            assert span.read0 <= span.core0 and span.read1 >= span.core1
        covered[block.rows.core0 : block.rows.core1, block.cols.core0 : block.cols.core1] += 1
    assert (covered == 1).all()


def test_block_size_shrinks_with_the_memory_limit() -> None:
    large = block_size_for_memory(4096, 15, 1, 224, 8)
    small = block_size_for_memory(256, 15, 1, 224, 8)
    assert large > small >= 256 and large % 256 == 0 and small % 256 == 0


# --------------------------------------------------------------------------- predict_raster


def write_raster(
    path: Path,
    image: np.ndarray,
    descriptions: tuple[str | None, ...] | None = tuple(BANDS),
    crs: str | None = "EPSG:32643",
    transform: rasterio.Affine | None = None,
    nodata: float | None = NODATA,
) -> Path:
    profile = {"driver": "GTiff", "height": image.shape[1], "width": image.shape[2], "count": image.shape[0]}
    profile.update(dtype="float32", nodata=nodata)
    if crs is not None:
        profile.update(crs=crs, transform=transform or from_origin(*ORIGIN, PIXEL, PIXEL))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image.astype(np.float32))
        if descriptions is not None:
            dst.descriptions = descriptions
    return path


def blob_scene(height: int = 300, width: int = 70) -> np.ndarray:
    """Background logit -6; a 10x10 lake, a 2x2 pond, two 3x3 squares touching at a corner, a lake across row 256."""
    image = np.full((2, height, width), -6.0, dtype=np.float32)
    image[1] = 3.0
    image[0, 100:110, 20:30] = 6.0
    image[0, 40:42, 50:52] = 6.0
    image[0, 150:153, 10:13] = 6.0
    image[0, 153:156, 13:16] = 6.0
    image[0, 250:262, 40:48] = 6.0
    image[:, :40, :] = NODATA  # all-nodata rows (more than one window)
    return image


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    stats = NormalizationStats(bands=BANDS, method="none")
    save_bundle(tmp_path / "model", FirstChannel(), ModelParams(), BANDS, ["S2L2A", "S2L2A"], stats)
    write_calibration(tmp_path / "model", {"temperature": 1.0, "threshold": 0.4})
    return tmp_path / "model"


def run_raster(model_dir: Path, raster: object, out: Path, **kwargs: object) -> object:
    bundle = load_bundle(model_dir, lambda params, c: FirstChannel())
    return predict_raster(bundle, raster, out, window=32, stride=16, progress=False, **kwargs)  # type: ignore[arg-type]


def read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), {
            "crs": src.crs,
            "transform": src.transform,
            "dtype": src.dtypes[0],
            "nodata": src.nodata,
            "block": src.block_shapes[0],
            "compress": src.compression,
        }


def test_predict_raster_outputs(model_dir: Path, tmp_path: Path) -> None:
    image = blob_scene()
    image[0, 200:205, 60:65] = np.log(0.45 / 0.55)  # probability 0.45: foreground only at the calibrated 0.4
    raster = write_raster(tmp_path / "scene.tif", image)
    result = run_raster(model_dir, raster, tmp_path / "out")
    probs, prob_meta = read(result.probability)
    mask, mask_meta = read(result.mask)
    with rasterio.open(raster) as src:
        assert prob_meta["crs"] == src.crs and prob_meta["transform"] == src.transform
        assert mask_meta["crs"] == src.crs and mask_meta["transform"] == src.transform
    assert prob_meta["dtype"] == "float32" and np.isnan(prob_meta["nodata"])
    assert prob_meta["block"] == (256, 256) and prob_meta["compress"].name.lower() == "deflate"
    assert mask_meta["dtype"] == "uint8" and mask_meta["nodata"] == 255
    # identity model: probability = sigmoid(first band); nodata rows are NaN / 255, never zeros
    np.testing.assert_allclose(probs[0, 40:], sigmoid(image[0, 40:]), atol=1e-6)
    assert np.isnan(probs[0, :40]).all() and (mask[0, :40] == 255).all()
    np.testing.assert_array_equal(mask[0, 40:], (sigmoid(image[0, 40:]) > 0.4).astype(np.uint8))
    assert mask[0, 200:205, 60:65].all()


def test_polygons_have_metric_areas_and_4_connectivity(model_dir: Path, tmp_path: Path) -> None:
    image = blob_scene()
    result = run_raster(model_dir, write_raster(tmp_path / "scene.tif", image), tmp_path / "out")
    features = json.loads(result.polygons.read_text())["features"]
    labels, count = ndimage.label(image[0] > 0)  # scipy's default structure is 4-connectivity
    sizes = sorted(np.bincount(labels.ravel())[1:] * PIXEL * PIXEL)
    assert len(features) == count == result.n_polygons == 5
    assert sorted(f["properties"]["area_m2"] for f in features) == pytest.approx(sizes, rel=1e-9)
    lon, lat = shape(features[0]["geometry"]).centroid.coords[0]
    assert 74.0 < lon < 76.0 and 43.0 < lat < 44.0  # GeoJSON is in EPSG:4326 (lon, lat)


def test_min_area_filters_polygons(model_dir: Path, tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "scene.tif", blob_scene())
    result = run_raster(model_dir, raster, tmp_path / "out", min_area_m2=1000.0)
    areas = sorted(f["properties"]["area_m2"] for f in json.loads(result.polygons.read_text())["features"])
    assert areas == pytest.approx([10_000.0, 9_600.0][::-1])


def test_memory_limited_run_matches_unlimited(model_dir: Path, tmp_path: Path) -> None:
    image = blob_scene(height=600, width=300)
    image[0, 250:262, 250:262] = 6.0  # a lake across the corner of four 256-pixel blocks
    image[0, 253:256, 100:103] = 6.0  # two squares meeting at one corner on the row-256 seam
    image[0, 256:259, 103:106] = 6.0
    raster = write_raster(tmp_path / "scene.tif", image)
    full = run_raster(model_dir, raster, tmp_path / "full")
    limited = run_raster(model_dir, raster, tmp_path / "limited", memory_limit_mb=1)
    assert full.n_blocks == 1 and limited.n_blocks == 3 * 2
    np.testing.assert_allclose(read(limited.probability)[0], read(full.probability)[0], rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(read(limited.mask)[0], read(full.mask)[0])
    areas = [
        sorted(f["properties"]["area_m2"] for f in json.loads(r.polygons.read_text())["features"])
        for r in (full, limited)
    ]
    labels, count = ndimage.label(image[0] > 0)
    expected = sorted(np.bincount(labels.ravel())[1:] * PIXEL * PIXEL)
    assert areas[0] == areas[1] == pytest.approx(expected)
    assert limited.n_polygons == count


def test_dask_backed_dataarray_input(model_dir: Path, tmp_path: Path) -> None:
    rioxarray = pytest.importorskip("rioxarray")
    raster = write_raster(tmp_path / "scene.tif", blob_scene())
    from_file = run_raster(model_dir, raster, tmp_path / "file")
    array = rioxarray.open_rasterio(raster, chunks={"y": 64})
    from_array = run_raster(model_dir, array, tmp_path / "array", memory_limit_mb=1)
    np.testing.assert_allclose(read(from_array.probability)[0], read(from_file.probability)[0], equal_nan=True)


def test_distributed_client_runs_blocks_and_matches_local_run(model_dir: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")

    raster = write_raster(tmp_path / "scene.tif", blob_scene(height=600, width=300))
    local = run_raster(model_dir, raster, tmp_path / "local", memory_limit_mb=1)
    client = distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None)
    with client, distributed.get_task_stream(client) as stream:
        remote = run_raster(model_dir, raster, tmp_path / "remote", memory_limit_mb=1)
    block_tasks = [task for task in stream.data if "_call_job" in task["key"]]
    assert len(block_tasks) == remote.n_blocks == local.n_blocks == 6  # every block ran on the cluster
    np.testing.assert_array_equal(read(remote.probability)[0], read(local.probability)[0])
    np.testing.assert_array_equal(read(remote.mask)[0], read(local.mask)[0])
    areas = [
        sorted(f["properties"]["area_m2"] for f in json.loads(r.polygons.read_text())["features"])
        for r in (local, remote)
    ]
    assert areas[0] == areas[1] and remote.n_polygons == local.n_polygons


def test_geographic_raster_area_matches_geodesic_area(model_dir: Path, tmp_path: Path) -> None:
    image = np.full((2, 60, 60), -6.0, np.float32)
    image[0, 20:40, 10:30] = 6.0
    step = 0.0001
    transform = from_origin(76.70, 43.00, step, step)
    raster = write_raster(tmp_path / "geo.tif", image, crs="EPSG:4326", transform=transform)
    result = run_raster(model_dir, raster, tmp_path / "out")
    (feature,) = json.loads(result.polygons.read_text())["features"]
    west, north = 76.70 + 10 * step, 43.00 - 20 * step
    lons = [west, west + 20 * step, west + 20 * step, west, west]
    lats = [north, north, north - 20 * step, north - 20 * step, north]
    geodesic, _ = Geod(ellps="WGS84").polygon_area_perimeter(lons, lats)
    assert feature["properties"]["area_m2"] == pytest.approx(abs(geodesic), rel=1e-3)


def test_band_count_mismatch_names_both_band_lists(model_dir: Path, tmp_path: Path) -> None:
    image = np.zeros((3, 40, 40), np.float32)
    raster = write_raster(tmp_path / "three.tif", image, descriptions=("B03", "B11", "VV"))
    with pytest.raises(BandMismatchError, match=r"three\.tif") as info:
        run_raster(model_dir, raster, tmp_path / "out")
    assert "VV" in str(info.value) and "B03" in str(info.value)


def test_band_order_mismatch_is_refused(model_dir: Path, tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "swapped.tif", np.zeros((2, 40, 40), np.float32), descriptions=("B11", "B03"))
    with pytest.raises(BandMismatchError, match="order"):
        run_raster(model_dir, raster, tmp_path / "out")


def test_band_names_argument_names_unlabelled_bands(model_dir: Path, tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "plain.tif", blob_scene(100, 40), descriptions=None)
    with pytest.raises(RasterInputError, match="band_names"):
        run_raster(model_dir, raster, tmp_path / "out")
    with pytest.raises(RasterInputError, match="3"):
        run_raster(model_dir, raster, tmp_path / "out", band_names=["B03", "B11", "VV"])
    assert run_raster(model_dir, raster, tmp_path / "out", band_names=BANDS).probability.is_file()


def test_raster_without_crs_is_predicted_with_a_warning_and_outputs_carry_none(model_dir: Path, tmp_path: Path) -> None:
    image = blob_scene()
    raster = write_raster(tmp_path / "nogeo.tif", image, crs=None)
    with pytest.warns(NoCrsWarning, match=r"nogeo\.tif"):
        result = run_raster(model_dir, raster, tmp_path / "out")
    probs, meta = read(result.probability)
    assert meta["crs"] is None
    np.testing.assert_allclose(probs[0, 40:], sigmoid(image[0, 40:]), atol=1e-6)
    features = json.loads(result.polygons.read_text())["features"]
    assert sorted(f["properties"]["area_px"] for f in features) == [4.0, 9.0, 9.0, 96.0, 100.0]  # areas in pixels


def test_missing_raster(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.tif"):
        run_raster(model_dir, tmp_path / "absent.tif", tmp_path / "out")

"""`workbench predict` options: band mapping, thresholds, precision, dask paths, COG outputs, inputs and sanity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch import nn

from workbench.cli import main
from workbench.data.normalize import NormalizationStats
from workbench.infer import InputMismatchError, predict_input, predict_raster
from workbench.infer.raster import RasterInputError
from workbench.models.bundle import (
    BandMismatchError,
    InputProfile,
    ModelBundle,
    load_bundle,
    save_bundle,
    write_calibration,
)
from workbench.params import ModelParams

BANDS = ["B03", "B11"]
ORIGIN = (500_000.0, 4_800_000.0)


class FirstChannel(nn.Module):
    """The first input channel is the logit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].clone()


class Mix(nn.Module):
    """A 1x1 convolution (logit = 3 * first - second), so reduced precision changes the result a little."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([3.0, -1.0]).view(1, 2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def bundle(
    model: nn.Module | None = None, profile: InputProfile | None = None, calibration: dict | None = None
) -> ModelBundle:
    stats = NormalizationStats(bands=BANDS, method="none")
    calibration = calibration or {}
    return ModelBundle(
        model or FirstChannel(),
        ModelParams(),
        list(BANDS),
        ["S2L2A"] * 2,
        stats,
        threshold=float(calibration.get("threshold", 0.5)),
        calibration=calibration,
        input_profile=profile,
    )


def scene(height: int = 96, width: int = 80, seed: int = 0) -> np.ndarray:
    """Band 0: logits in [-4, 4] (typical magnitude ~2.3); band 1: 0.2 everywhere."""
    rng = np.random.default_rng(seed)
    image = np.empty((2, height, width), np.float32)
    image[0] = rng.uniform(-4, 4, size=(height, width))
    image[1] = 0.2
    return image


def write(
    path: Path,
    image: np.ndarray,
    descriptions: tuple[str, ...] | None = tuple(BANDS),
    pixel: float = 10.0,
    crs: str | None = "EPSG:32643",
) -> Path:
    profile = {"driver": "GTiff", "height": image.shape[1], "width": image.shape[2], "count": image.shape[0]}
    profile.update(dtype="float32")
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(*ORIGIN, pixel, pixel))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image.astype(np.float32))
        if descriptions is not None:
            dst.descriptions = descriptions
    return path


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def predict(model: ModelBundle, raster: object, out: Path, **kwargs: object) -> object:
    options: dict = {"window": 32, "stride": 16, "progress": False, **kwargs}
    return predict_raster(model, raster, out, **options)


# --------------------------------------------------------------------------- band mapping


def test_bands_map_raster_bands_by_index_name_or_pairs(tmp_path: Path) -> None:
    image = scene()
    reference = predict(bundle(Mix()), write(tmp_path / "ref.tif", image), tmp_path / "ref")
    expected = read(reference.probability)
    np.testing.assert_allclose(expected[0], sigmoid(3 * image[0] - image[1]), atol=1e-5)
    # three bands without descriptions, in the order VV, B11, B03
    shuffled = np.stack([np.full_like(image[0], 7.0), image[1], image[0]])
    plain = write(tmp_path / "plain.tif", shuffled, descriptions=None)
    with pytest.raises(RasterInputError, match="--bands"):
        predict(bundle(Mix()), plain, tmp_path / "x")
    by_index = predict(bundle(Mix()), plain, tmp_path / "index", bands=["3", "2"])
    np.testing.assert_array_equal(read(by_index.probability), expected)
    named = write(tmp_path / "named.tif", shuffled, descriptions=("VV", "B11", "B03"))
    by_name = predict(bundle(Mix()), named, tmp_path / "name", bands=["B03", "B11"])
    by_pairs = predict(bundle(Mix()), named, tmp_path / "pairs", bands=["B11=2", "B03=B03"])
    np.testing.assert_array_equal(read(by_name.probability), expected)
    np.testing.assert_array_equal(read(by_pairs.probability), expected)
    with pytest.raises(RasterInputError, match=r"no band 'B04'.*\['VV', 'B11', 'B03'\]"):
        predict(bundle(Mix()), named, tmp_path / "bad", bands=["B04", "B11"])
    with pytest.raises(RasterInputError, match="lists 1 raster band"):
        predict(bundle(Mix()), named, tmp_path / "bad", bands=["3"])


# --------------------------------------------------------------------------- thresholds


def test_region_threshold_comes_from_the_calibration(tmp_path: Path) -> None:
    calibration = {"temperature": 1.0, "threshold": 0.5, "per_region": {"north": 0.8, "south": 0.2}}
    raster = write(tmp_path / "s.tif", scene())
    probs = sigmoid(scene()[0])
    for region, cut in [("north", 0.8), ("south", 0.2)]:
        result = predict(bundle(calibration=calibration), raster, tmp_path / region, region=region)
        assert result.threshold == cut
        np.testing.assert_array_equal(read(result.mask)[0], (probs > cut).astype(np.uint8))
    fixed = predict(bundle(calibration=calibration), raster, tmp_path / "fixed", threshold=0.65)
    np.testing.assert_array_equal(read(fixed.mask)[0], (probs > 0.65).astype(np.uint8))
    with pytest.raises(ValueError, match=r"calibrated regions: \['north', 'south'\]"):
        predict(bundle(calibration=calibration), raster, tmp_path / "x", region="east")
    with pytest.raises(ValueError, match="no per-region thresholds"):
        predict(bundle(calibration={"temperature": 1.0, "threshold": 0.5}), raster, tmp_path / "x", region="north")
    with pytest.raises(ValueError, match="not both"):
        predict(bundle(calibration=calibration), raster, tmp_path / "x", region="north", threshold=0.3)


def test_region_threshold_from_a_saved_bundle_through_the_cli(tmp_path: Path) -> None:
    stats = NormalizationStats(bands=BANDS, method="none")
    model_dir = tmp_path / "model"
    save_bundle(model_dir, nn.Identity(), ModelParams(), BANDS, ["S2L2A"] * 2, stats)
    write_calibration(model_dir, {"temperature": 1.0, "threshold": 0.5, "per_region": {"north": 0.8}})
    loaded = load_bundle(model_dir, lambda params, c: FirstChannel())
    raster = write(tmp_path / "s.tif", scene())
    result = predict(loaded, raster, tmp_path / "out", region="north")
    np.testing.assert_array_equal(read(result.mask)[0], (sigmoid(scene()[0]) > 0.8).astype(np.uint8))


# --------------------------------------------------------------------------- precision and device


def test_precision_bf16_on_cpu_is_close_and_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    raster = write(tmp_path / "s.tif", scene())
    full = read(predict(bundle(Mix()), raster, tmp_path / "fp32", device="cpu").probability)
    half = read(predict(bundle(Mix()), raster, tmp_path / "bf16", device="cpu", precision="bf16").probability)
    assert not np.array_equal(half, full)  # the forward really ran in bfloat16 ...
    np.testing.assert_allclose(half, full, atol=0.02)  # ... whose 8-bit mantissa keeps probabilities within 0.02
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        predict(bundle(Mix()), raster, tmp_path / "fp16", device="cpu", precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        predict(bundle(), write(tmp_path / "s.tif", scene()), tmp_path / "out", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_cpu(tmp_path: Path) -> None:
    raster = write(tmp_path / "s.tif", scene())
    cpu = read(predict(bundle(Mix()), raster, tmp_path / "cpu", device="cpu").probability)
    for precision in ("fp32", "bf16", "fp16"):
        out = predict(bundle(Mix()), raster, tmp_path / precision, device="cuda", precision=precision, batch_size=4)
        np.testing.assert_allclose(read(out.probability), cpu, atol=0.02 if precision == "bf16" else 2e-3)


# --------------------------------------------------------------------------- dask


def test_dask_threads_and_distributed_scheduler_equal_the_in_process_run(tmp_path: Path) -> None:
    from dask.callbacks import Callback
    from distributed import Client, LocalCluster, get_task_stream

    image = scene(600, 300)
    raster = write(tmp_path / "s.tif", image)
    local = predict(bundle(), raster, tmp_path / "local", block_size=256)
    tasks: list[str] = []
    with Callback(pretask=lambda key, dsk, state: tasks.append(str(key))):
        threaded = predict(bundle(), raster, tmp_path / "threads", block_size=256, scheduler="threads", workers=2)
    assert local.n_blocks == threaded.n_blocks == 6 and len(tasks) == 6  # each block was one dask task
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        remote = predict(bundle(), raster, tmp_path / "remote", block_size=256, scheduler=cluster.scheduler_address)
    assert len([task for task in stream.data if "_call_job" in task["key"]]) == 6  # every block ran on the cluster
    for other in (threaded, remote):
        np.testing.assert_array_equal(read(other.probability), read(local.probability))
        np.testing.assert_array_equal(read(other.mask), read(local.mask))
        assert other.n_polygons == local.n_polygons
    np.testing.assert_allclose(read(local.probability)[0], sigmoid(image[0]), atol=1e-6)


def test_unreachable_scheduler_is_a_clear_error(tmp_path: Path) -> None:
    raster = write(tmp_path / "s.tif", scene())
    with pytest.raises(ValueError, match="neither one of"):
        predict(bundle(), raster, tmp_path / "out", scheduler="bogus")


# --------------------------------------------------------------------------- Cloud-Optimized GeoTIFF


def test_outputs_are_valid_cogs_with_overviews(tmp_path: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    image = scene(700, 600)
    result = predict(bundle(), write(tmp_path / "s.tif", image), tmp_path / "out")
    for path in (result.probability, result.mask):
        valid, errors, _ = cog_validate(str(path), quiet=True)
        assert valid, errors
        with rasterio.open(path) as src:
            assert src.overviews(1) == [2, 4] and src.block_shapes[0] == (256, 256)
            assert src.crs.to_epsg() == 32643
    with rasterio.open(result.probability) as src:
        np.testing.assert_allclose(src.read(1), sigmoid(image[0]), atol=1e-6)
        overview = src.read(1, out_shape=(350, 300))  # the 2x overview: averages of 2x2 probabilities
    block_means = sigmoid(image[0]).reshape(350, 2, 300, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(overview, block_means, atol=1e-5)
    with rasterio.open(result.mask) as src:
        assert set(np.unique(src.read(1, out_shape=(175, 150)))) <= {0, 1}  # nearest: still class ids


# --------------------------------------------------------------------------- inputs of the ingest readers


def test_npz_input_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = NormalizationStats(bands=BANDS, method="none")
    model_dir = tmp_path / "model"
    first_band = nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        first_band.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        first_band.bias.zero_()
    save_bundle(model_dir, first_band, ModelParams(), BANDS, ["S2L2A"] * 2, stats)
    image = scene(64, 48)
    archive = tmp_path / "scene.npz"
    np.savez(archive, img=np.moveaxis(image, 0, -1))  # HWC, no label
    out = tmp_path / "out"
    import workbench.models.bundle as bundle_module

    original = bundle_module._build_from_factory
    bundle_module._build_from_factory = lambda params, bands, modalities: nn.Conv2d(2, 1, 1)  # type: ignore[assignment]
    try:
        code = main(
            [
                "predict",
                str(model_dir),
                str(archive),
                str(out),
                "--bands",
                "1",
                "2",
                "--device",
                "cpu",
                "--uncalibrated",
            ]
        )
        err = capsys.readouterr().err
        assert code == 0, err
        assert "has no CRS" in err
        np.testing.assert_allclose(read(out / "probability.tif")[0], sigmoid(image[0]), atol=1e-6)
        with rasterio.open(out / "probability.tif") as src:
            assert src.crs is None
        # a file GDAL cannot read: a clear message pointing at --format, not a raw traceback
        junk = tmp_path / "scene.dat"
        junk.write_bytes(b"not a raster")
        assert main(["predict", str(model_dir), str(junk), str(out), "--uncalibrated"]) == 2
        assert "--format" in capsys.readouterr().err
    finally:
        bundle_module._build_from_factory = original  # type: ignore[assignment]


def test_npz_input_without_band_mapping_names_its_bands(tmp_path: Path) -> None:
    archive = tmp_path / "scene.npz"
    np.savez(archive, img=np.moveaxis(scene(32, 32), 0, -1))
    with pytest.raises(BandMismatchError, match=r"has bands \['b1', 'b2'\].*--bands"):
        predict_input(bundle(), archive, tmp_path / "out", window=32, progress=False)


# --------------------------------------------------------------------------- input sanity


def profile(pixel: float | None = 10.0) -> InputProfile:
    image = scene()
    means = [float(image[0].mean()), 0.2]
    stds = [float(image[0].std()), 0.0]
    return InputProfile(BANDS, means, stds, chip_size=32, pixel_size_m=pixel)


def test_window_defaults_to_the_training_chip_size(tmp_path: Path) -> None:
    result = predict_raster(
        bundle(profile=profile()), write(tmp_path / "s.tif", scene()), tmp_path / "o", progress=False
    )
    assert result.window == 32
    assert result.input_check is not None and result.input_check.scale_factor == pytest.approx(1.0, rel=0.05)


def test_raster_scaled_x10000_is_refused_unless_allowed(tmp_path: Path) -> None:
    raster = write(tmp_path / "dn.tif", scene() * 10_000)
    with pytest.raises(InputMismatchError, match=r"about 1(\.\d+)?e\+04 times .*x10000"):
        predict(bundle(profile=profile()), raster, tmp_path / "out")
    assert not (tmp_path / "out" / "probability.tif").exists()
    with pytest.warns(RuntimeWarning, match="times those the model was trained on"):
        result = predict(bundle(profile=profile()), raster, tmp_path / "out", allow_input_mismatch=True)
    assert result.input_check.scale_factor == pytest.approx(10_000, rel=0.05)


def test_pixel_size_is_compared_with_the_training_pixel(tmp_path: Path) -> None:
    coarse = write(tmp_path / "30m.tif", scene(), pixel=30.0)
    with pytest.raises(InputMismatchError, match=r"30 m pixels but the model was trained on 10 m.*gdalwarp -tr 10 10"):
        predict(bundle(profile=profile()), coarse, tmp_path / "out")
    with pytest.warns(RuntimeWarning, match="12 m pixels"):
        result = predict(bundle(profile=profile()), write(tmp_path / "12m.tif", scene(), pixel=12.0), tmp_path / "o")
    assert result.input_check.pixel_size_m == pytest.approx(12.0)
    result = predict(bundle(profile=profile()), write(tmp_path / "10m.tif", scene()), tmp_path / "ok")
    assert result.input_check.pixel_size_m == pytest.approx(10.0)


def test_nonsensical_window_and_memory_options_are_refused(tmp_path: Path) -> None:
    raster = write(tmp_path / "s.tif", scene())
    with pytest.raises(ValueError, match="window must be a positive"):
        predict(bundle(), raster, tmp_path / "o", window=0)
    with pytest.raises(ValueError, match=r"stride must lie in 1\.\.window"):
        predict(bundle(), raster, tmp_path / "o", stride=64)
    with pytest.raises(ValueError, match="batch size"):
        predict(bundle(), raster, tmp_path / "o", batch_size=0)
    with pytest.raises(ValueError, match=r"memory limit 1 MiB is below the smallest workable one, about \d+ MiB"):
        predict(bundle(), raster, tmp_path / "o", memory_limit_mb=1, refuse_small_memory_limit=True)


def test_bundle_keeps_its_input_profile(tmp_path: Path) -> None:
    stats = NormalizationStats(bands=["B11", "B03"], method="none")
    wide = InputProfile(["B11", "B03"], [0.3, 0.1], [0.05, 0.02], chip_size=64, pixel_size_m=20.0)
    save_bundle(tmp_path / "m", nn.Identity(), ModelParams(), BANDS, ["S2L2A"] * 2, stats, input_profile=wide)
    loaded = load_bundle(tmp_path / "m", lambda params, c: nn.Identity())
    assert loaded.input_profile == InputProfile(BANDS, [0.1, 0.3], [0.02, 0.05], 64, 20.0)  # in the model's order
    assert json.loads((tmp_path / "m" / "input_profile.json").read_text())["bands"] == BANDS


def test_training_records_chip_size_pixel_size_and_band_scale(tmp_path: Path) -> None:
    from workbench.data.prepare import PreparedData
    from workbench.data.store import BandSpec, Chip, StoreWriter, read_catalog, read_store_meta
    from workbench.train.fit import training_input_profile

    rng = np.random.default_rng(5)
    images = []
    store = tmp_path / "store"
    specs = [BandSpec(name, "S2L2A", True) for name in BANDS]
    with StoreWriter(store, specs, source="unit", attrs={"pixel_size_m": 10.0}) as writer:
        for i in range(6):
            image = (
                rng.uniform(0.0, 0.4, size=(2, 32, 32)).astype(np.float32) * np.array([1, 3], np.float32)[:, None, None]
            )
            valid = np.ones((32, 32), bool)
            valid[:4] = False
            label = np.zeros((32, 32), np.uint8)
            split = "train" if i < 4 else "val"
            writer.append(Chip(f"c{i}", image, label, valid, lat=0.0, lon=0.0, region="r", split=split))
            if split == "train":
                images.append(image[:, valid])
    stats_path = NormalizationStats(bands=BANDS, method="none").save(tmp_path / "normalization_stats.json")
    catalog = read_catalog(store)
    prepared = PreparedData(store, store / "catalog.parquet", stats_path, catalog, list(BANDS))
    profile = training_input_profile(prepared, read_store_meta(store))
    pixels = np.concatenate(images, axis=1)
    assert profile.chip_size == 32 and profile.pixel_size_m == 10.0 and profile.bands == BANDS
    np.testing.assert_allclose(profile.mean, pixels.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(profile.std, pixels.std(axis=1), rtol=1e-5)

"""Large-raster inference: a GeoTIFF or DataArray predicted block by block into GeoTIFFs and polygons.

`predict_raster` checks the raster's bands and georeference against a model bundle, predicts it
in blocks sized for a memory limit (`workbench.infer.blocks`, with Gaussian-blended sliding
windows from `workbench.infer.windows`), writes each block's rows into tiled GeoTIFFs with
windowed writes before the next block is read, and vectorises the mask into polygons.

Nodata is never turned into silent zeros: a pixel that is nodata in any input band is NaN in
`probability.tif` and 255 in `mask.tif`; windows holding only nodata are not run at all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows
from affine import Affine
from tqdm.auto import tqdm

from workbench.infer.blocks import (
    DEFAULT_MEMORY_LIMIT_MB,
    OUTPUT_TILE,
    BlockJob,
    PeakMemory,
    Span,
    block_size_for_memory,
    gdal_cache_mb,
    plan_blocks,
    run_blocks,
)
from workbench.infer.vectorize import MASK_NODATA, BlockPolygons, polygons_geojson, probability_to_mask
from workbench.infer.windows import DEFAULT_WINDOW
from workbench.io import commit_temp, create_temp_file, ensure_free_space, sweep_leftovers, write_text_atomic
from workbench.models.bundle import BuildModel, ModelBundle, check_bands, load_bundle


class RasterInputError(ValueError):
    """A raster cannot be used for inference (bands, georeference); the message names the file."""


# --------------------------------------------------------------------------- raster sources


@dataclass(frozen=True)
class RasterInfo:
    """What inference needs to know about an input raster."""

    name: str
    height: int
    width: int
    band_names: list[str]
    crs: Any
    transform: Affine
    nodata: list[float | None]
    itemsize: int


@dataclass(frozen=True)
class FileReader:
    """Reads windows of a GeoTIFF (re-opened per call, so it can run in another process)."""

    path: str

    def __call__(self, rows: Span, cols: Span) -> np.ndarray:
        with rasterio.open(self.path) as src:
            return src.read(window=rasterio.windows.Window.from_slices(rows, cols))


@dataclass(frozen=True)
class ArrayReader:
    """Reads windows of a (band, y, x) DataArray; a dask-backed array loads only that window."""

    array: Any

    def __call__(self, rows: Span, cols: Span) -> np.ndarray:
        _, y_dim, x_dim = self.array.dims
        return np.asarray(self.array.isel({y_dim: slice(*rows), x_dim: slice(*cols)}).values)


def _names(source: str, count: int, descriptions: Sequence[str | None], band_names: Sequence[str] | None) -> list[str]:
    if band_names is not None:
        if len(band_names) != count:
            raise RasterInputError(f"raster {source} has {count} bands but band_names lists {len(band_names)}")
        return [str(name) for name in band_names]
    if any(not name for name in descriptions):
        raise RasterInputError(
            f"raster {source} does not name its bands (GeoTIFF band descriptions are empty); pass band_names"
        )
    return [str(name) for name in descriptions]


def _open_file(path: Path, band_names: Sequence[str] | None) -> tuple[RasterInfo, FileReader]:
    if not path.is_file():
        raise FileNotFoundError(f"raster {path} does not exist")
    with rasterio.open(path) as src:
        if src.crs is None or src.transform == Affine.identity():
            raise RasterInputError(
                f"raster {path} has no georeference (CRS and geotransform); outputs could not be placed on a map"
            )
        info = RasterInfo(
            name=str(path),
            height=src.height,
            width=src.width,
            band_names=_names(str(path), src.count, src.descriptions, band_names),
            crs=src.crs,
            transform=src.transform,
            nodata=[None if v is None else float(v) for v in src.nodatavals],
            itemsize=np.dtype(src.dtypes[0]).itemsize,
        )
    return info, FileReader(str(path))


def _open_array(array: Any, band_names: Sequence[str] | None) -> tuple[RasterInfo, ArrayReader]:
    if array.ndim == 2:
        array = array.expand_dims("band")
    if array.ndim != 3:
        raise RasterInputError(f"DataArray {array.name!r} must be (band, y, x), got dims {array.dims}")
    name = f"DataArray {array.name!r}"
    y_dim, x_dim = array.rio.y_dim, array.rio.x_dim
    band_dim = next(dim for dim in array.dims if dim not in (y_dim, x_dim))
    array = array.transpose(band_dim, y_dim, x_dim)
    if array.rio.crs is None:
        raise RasterInputError(f"{name} has no georeference (set one with .rio.write_crs); outputs need a CRS")
    descriptions = array.attrs.get("long_name")
    if isinstance(descriptions, str):
        descriptions = [descriptions]
    if descriptions is None and array[band_dim].dtype.kind in "UO":
        descriptions = [str(v) for v in array[band_dim].values]
    nodata = array.rio.nodata
    info = RasterInfo(
        name=name,
        height=int(array.shape[1]),
        width=int(array.shape[2]),
        band_names=_names(name, int(array.shape[0]), list(descriptions or [None] * array.shape[0]), band_names),
        crs=array.rio.crs,
        transform=array.rio.transform(),
        nodata=[None if nodata is None else float(nodata)] * int(array.shape[0]),
        itemsize=array.dtype.itemsize,
    )
    return info, ArrayReader(array)


def open_raster(raster: str | Path | Any, band_names: Sequence[str] | None = None) -> tuple[RasterInfo, Any]:
    """Describe a GeoTIFF path or a rioxarray DataArray and return a picklable window reader."""
    if isinstance(raster, str | Path):
        return _open_file(Path(raster), band_names)
    if hasattr(raster, "rio"):
        return _open_array(raster, band_names)
    raise TypeError(f"expected a GeoTIFF path or an xarray DataArray, got {type(raster).__name__}")


# --------------------------------------------------------------------------- outputs


@dataclass
class PredictionResult:
    """Where predict_raster wrote its outputs and what the run cost."""

    probability: Path
    mask: Path
    polygons: Path
    n_polygons: int
    n_blocks: int
    block_size: int
    peak_rss_mb: float
    peak_increase_mb: float
    seconds: float

    @property
    def paths(self) -> dict[str, Path]:
        return {"probability": self.probability, "mask": self.mask, "polygons": self.polygons}


def _output_profile(info: RasterInfo, count: int, dtype: str, nodata: float) -> dict[str, Any]:
    return {
        "driver": "GTiff",
        "height": info.height,
        "width": info.width,
        "count": count,
        "dtype": dtype,
        "crs": info.crs,
        "transform": info.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": OUTPUT_TILE,
        "blockysize": OUTPUT_TILE,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }


def _temporary_beside(path: Path) -> Path:
    """An empty temporary file beside `path` (user's normal permissions; swept when its process is gone)."""
    return create_temp_file(path, ".partial")


class OutputWriteError(OSError):
    """A written GeoTIFF does not read back completely (GDAL reports some write errors only as warnings)."""


def verify_geotiff(path: Path, height: int, width: int, count: int, dtype: str) -> None:
    """Reopen a finished GeoTIFF and decode every block; raise OutputWriteError naming it when that fails.

    GDAL logs a failed tile write (a full disk, a cut network file system) without raising, so a
    raster is only renamed into place once it reads back whole.
    """
    try:
        with rasterio.open(path) as src:
            if (src.height, src.width, src.count, src.dtypes[0]) != (height, width, count, dtype):
                raise OutputWriteError(
                    f"{path} reads back as {src.count}x{src.height}x{src.width} {src.dtypes[0]}, "
                    f"expected {count}x{height}x{width} {dtype}"
                )
            for _, window in src.block_windows(1):
                src.read(window=window)
    except rasterio.errors.RasterioError as exc:
        raise OutputWriteError(
            f"{path} does not read back ({exc}); the write failed (a full disk?). The previous outputs are "
            "unchanged; free some space and run predict again"
        ) from exc


def _output_bytes(info: RasterInfo, classes: int) -> int:
    """Uncompressed size of probability.tif and mask.tif: the free space predict asks for."""
    return int(info.height) * int(info.width) * (4 * classes + 1)


def _resolve_bundle(
    model: str | Path | ModelBundle, build_model: BuildModel | None, allow_uncalibrated: bool = False
) -> ModelBundle:
    if isinstance(model, ModelBundle):
        return model
    return load_bundle(model, build_model, require_calibration=not allow_uncalibrated)


def predict_raster(
    model_dir: str | Path | ModelBundle,
    raster: str | Path | Any,
    out_dir: str | Path,
    window: int | None = None,
    stride: int | None = None,
    memory_limit_mb: float | None = None,
    min_area_m2: float = 0.0,
    scales: Sequence[float] = (1.0,),
    tta: str = "none",
    band_names: Sequence[str] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    block_size: int | None = None,
    model_memory_mb: float | None = None,
    build_model: BuildModel | None = None,
    progress: bool = True,
    allow_uncalibrated: bool = False,
) -> PredictionResult:
    """Predict a georeferenced raster block by block into probability.tif, mask.tif and polygons.geojson.

    The raster's bands (GeoTIFF band descriptions, or `band_names`) must be the model's bands in its
    order. Square blocks (`block_size` pixels, by default sized so that one block stays under
    `memory_limit_mb`, 1024 MiB when not given; `model_memory_mb` is one batch forward's working
    memory, estimated when not given) are read, predicted and written with windowed writes
    one at a time, so rasters larger than memory work; the result does not depend on the block size.
    Outputs replace earlier files only once complete and read back whole. A model dir without
    calibration.json is refused unless `allow_uncalibrated`.
    """
    started = time.perf_counter()
    bundle = _resolve_bundle(model_dir, build_model, allow_uncalibrated)
    info, reader = open_raster(raster, band_names)
    check_bands(bundle, info.band_names, source=f"raster {info.name}")
    window = window or DEFAULT_WINDOW
    stride = stride or window // 2
    classes = bundle.num_classes
    limit_mb = memory_limit_mb or DEFAULT_MEMORY_LIMIT_MB
    side = block_size or block_size_for_memory(
        limit_mb, len(bundle.bands), classes, window, batch_size, info.itemsize, model_memory_mb
    )
    blocks = plan_blocks(info.height, info.width, window, stride, side, scales)
    job = BlockJob(bundle, reader, info.nodata, window, stride, batch_size, tta, device, tuple(scales))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out)  # temporary outputs of an interrupted predict
    ensure_free_space(out, _output_bytes(info, classes), "probability.tif and mask.tif (uncompressed size)")
    final = {"probability": out / "probability.tif", "mask": out / "mask.tif", "polygons": out / "polygons.geojson"}
    temporary = {key: _temporary_beside(path) for key, path in final.items() if key != "polygons"}
    polygons = BlockPolygons(info.height, info.width)
    try:
        with rasterio.Env(GDAL_CACHEMAX=gdal_cache_mb(limit_mb)), PeakMemory() as memory, ExitStack() as stack:
            prob_dst = stack.enter_context(
                rasterio.open(temporary["probability"], "w", **_output_profile(info, classes, "float32", float("nan")))
            )
            mask_dst = stack.enter_context(
                rasterio.open(temporary["mask"], "w", **_output_profile(info, 1, "uint8", MASK_NODATA))
            )
            prob_dst.descriptions = ("probability",) if classes == 1 else tuple(f"class_{k}" for k in range(classes))
            mask_dst.descriptions = ("mask",)
            for block, probs in tqdm(
                run_blocks(job, blocks), total=len(blocks), desc="blocks", unit="block", disable=not progress
            ):
                rows, cols = block.rows, block.cols
                target = rasterio.windows.Window.from_slices((rows.core0, rows.core1), (cols.core0, cols.core1))
                mask = probability_to_mask(probs, bundle.threshold)
                prob_dst.write(probs.astype(np.float32, copy=False), window=target)
                mask_dst.write(mask[None], window=target)
                polygons.add_block(mask, rows.core0, cols.core0)
                del probs, mask
        merged = polygons.merged()
        geojson, n_polygons = polygons_geojson(merged, info.transform, info.crs, min_area_m2)
        verify_geotiff(temporary["probability"], info.height, info.width, classes, "float32")
        verify_geotiff(temporary["mask"], info.height, info.width, 1, "uint8")
        for key, path in temporary.items():
            commit_temp(path, final[key])
        write_text_atomic(final["polygons"], geojson)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return PredictionResult(
        probability=final["probability"],
        mask=final["mask"],
        polygons=final["polygons"],
        n_polygons=n_polygons,
        n_blocks=len(blocks),
        block_size=side,
        peak_rss_mb=memory.peak_mb,
        peak_increase_mb=memory.increase_mb,
        seconds=time.perf_counter() - started,
    )

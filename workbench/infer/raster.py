"""Large-raster inference: a raster, DataArray or ingest-readable file predicted block by block.

`predict_raster` maps the raster's bands to the model's (by name or index), checks its value scale
and pixel size against the training inputs recorded in the bundle, predicts it in blocks sized for
a memory limit (`workbench.infer.blocks`, with Gaussian-blended sliding windows from
`workbench.infer.windows`; in process or through dask), writes each block's rows into tiled
GeoTIFFs with windowed writes before the next block is read, turns them into Cloud-Optimized
GeoTIFFs with overviews, and vectorises the mask into polygons. `predict_input` also reads the
formats of the ingest readers (npz, ...).

Nodata is never turned into silent zeros: a pixel that is nodata in any input band is NaN in
`probability.tif` and 255 in `mask.tif`; windows holding only nodata are not run at all.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
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
    smallest_memory_limit_mb,
)
from workbench.infer.vectorize import MASK_NODATA, BlockPolygons, polygons_geojson, probability_to_mask
from workbench.infer.windows import DEFAULT_WINDOW, autocast_context
from workbench.io import commit_temp, create_temp_file, ensure_free_space, sweep_leftovers, write_text_atomic
from workbench.models.bundle import BandMismatchError, BuildModel, ModelBundle, check_bands, load_bundle
from workbench.params import resolve_classes


class RasterInputError(ValueError):
    """A raster cannot be used for inference (bands, georeference); the message names the file."""


class InputMismatchError(RasterInputError):
    """A raster's values or pixel size differ from what the model was trained on."""


class NoCrsWarning(UserWarning):
    """A raster without a CRS is predicted; its outputs carry none."""


# --------------------------------------------------------------------------- raster sources


@dataclass(frozen=True)
class RasterInfo:
    """What inference needs to know about an input raster (bands already those the model reads)."""

    name: str
    height: int
    width: int
    band_names: list[str]
    crs: Any  # None when the input has no CRS (outputs then carry none)
    transform: Affine
    nodata: list[float | None]
    itemsize: int


@dataclass(frozen=True)
class FileReader:
    """Reads windows of a raster file (re-opened per call, so it can run in another process)."""

    path: str
    indexes: tuple[int, ...] | None = None  # 1-based raster bands, in the model's order; None = all

    def __call__(self, rows: Span, cols: Span) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(self.path) as src:
                window = rasterio.windows.Window.from_slices(rows, cols)
                return src.read(list(self.indexes) if self.indexes else None, window=window)


@dataclass(frozen=True)
class ArrayReader:
    """Reads windows of a (band, y, x) DataArray; a dask-backed array loads only that window."""

    array: Any
    indexes: tuple[int, ...] | None = None  # 0-based bands in the model's order; None = all

    def __call__(self, rows: Span, cols: Span) -> np.ndarray:
        band_dim, y_dim, x_dim = self.array.dims
        selection: dict[str, Any] = {y_dim: slice(*rows), x_dim: slice(*cols)}
        if self.indexes is not None:
            selection[band_dim] = list(self.indexes)
        return np.asarray(self.array.isel(selection).values)


@dataclass(frozen=True)
class MemoryReader:
    """Reads windows of an in-memory (band, y, x) array (inputs read by an ingest reader)."""

    array: np.ndarray

    def __call__(self, rows: Span, cols: Span) -> np.ndarray:
        return self.array[:, slice(*rows), slice(*cols)]


@dataclass(frozen=True)
class RasterInput:
    """An input already opened: its description and a window reader (see `open_raster`)."""

    info: RasterInfo
    reader: Any


def _raw_names(
    source: str, count: int, descriptions: Sequence[str | None], band_names: Sequence[str] | None
) -> list[str | None]:
    """The raster's own band names: `band_names` when given, else the descriptions (None where empty)."""
    if band_names is not None:
        if len(band_names) != count:
            raise RasterInputError(f"raster {source} has {count} bands but band_names lists {len(band_names)}")
        return [str(name) for name in band_names]
    return [str(name) if name else None for name in descriptions]


def select_bands(
    model_bands: Sequence[str], names: Sequence[str | None], spec: Sequence[str] | None, source: str
) -> list[int]:
    """0-based raster bands feeding each model band, in the model's order.

    `spec` None: the raster's bands must be named and be exactly the model's bands in order. Otherwise
    `spec` gives, for each model band in order, a raster band by name (its description) or by 1-based
    index; or `MODEL=RASTER` pairs naming every model band once, in any order.
    """
    count = len(names)
    if spec is None:
        if any(name is None for name in names):
            raise RasterInputError(
                f"raster {source} does not name its bands (band descriptions are empty); pass band_names, or map "
                f"the model's bands {list(model_bands)} to raster bands by 1-based index with --bands"
            )
        try:
            check_bands(list(model_bands), [str(n) for n in names], source=f"raster {source}")
        except BandMismatchError as exc:
            raise BandMismatchError(f"{exc}; map them explicitly with --bands (names or 1-based indexes)") from None
        return list(range(count))
    items = [str(item).strip() for item in spec]
    if any("=" in item for item in items):
        if not all("=" in item for item in items):
            raise RasterInputError(f"--bands {items}: give either MODEL=RASTER pairs for every band or a plain list")
        pairs = dict(item.split("=", 1) for item in items)
        unknown = sorted(set(pairs) - set(model_bands))
        missing = [band for band in model_bands if band not in pairs]
        if unknown or missing or len(pairs) != len(items):
            raise RasterInputError(
                f"--bands {items} must name each model band {list(model_bands)} once; unknown {unknown}, "
                f"missing {missing}"
            )
        refs = [pairs[band] for band in model_bands]
    else:
        if len(items) != len(model_bands):
            raise RasterInputError(
                f"--bands lists {len(items)} raster band(s) {items} but the model reads {len(model_bands)} "
                f"{list(model_bands)}; give one raster band (name or 1-based index) per model band, in that order"
            )
        refs = items
    indexes = []
    for band, ref in zip(model_bands, refs):
        if ref in names:
            indexes.append(names.index(ref))
        elif ref.isdigit() and 1 <= int(ref) <= count:
            indexes.append(int(ref) - 1)
        else:
            raise RasterInputError(
                f"--bands: raster {source} has no band {ref!r} for model band {band!r}; its bands are "
                f"{[n or '(unnamed)' for n in names]} (1-based indexes 1..{count})"
            )
    return indexes


def _check_crs(name: str, crs: Any, transform: Affine) -> Any:
    if crs is None:
        warnings.warn(
            f"raster {name} has no CRS; the outputs carry none (their grid is the input's pixel grid) and "
            "polygon areas are given in pixels, not square metres",
            NoCrsWarning,
            stacklevel=3,
        )
        return None
    return crs


def _open_file(
    path: Path, model_bands: Sequence[str], band_names: Sequence[str] | None, bands: Sequence[str] | None
) -> RasterInput:
    if not path.is_file():
        raise FileNotFoundError(f"raster {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioIOError as exc:
        from workbench.data.ingest import FORMATS

        raise RasterInputError(
            f"{path} is not a raster GDAL can read ({exc}); for inputs the ingest readers know give --format "
            f"(one of {', '.join(sorted(FORMATS))}), e.g. --format npz for a NumPy archive"
        ) from None
    with src:
        names = _raw_names(str(path), src.count, src.descriptions, band_names)
        indexes = select_bands(model_bands, names, bands, str(path))
        crs = _check_crs(str(path), src.crs, src.transform)
        info = RasterInfo(
            name=str(path),
            height=src.height,
            width=src.width,
            band_names=list(model_bands),
            crs=crs,
            transform=src.transform,
            nodata=[None if src.nodatavals[i] is None else float(src.nodatavals[i]) for i in indexes],
            itemsize=max(np.dtype(src.dtypes[i]).itemsize for i in indexes),
        )
    plain = indexes == list(range(src.count))
    return RasterInput(info, FileReader(str(path), None if plain else tuple(i + 1 for i in indexes)))


def _open_array(
    array: Any, model_bands: Sequence[str], band_names: Sequence[str] | None, bands: Sequence[str] | None
) -> RasterInput:
    if array.ndim == 2:
        array = array.expand_dims("band")
    if array.ndim != 3:
        raise RasterInputError(f"DataArray {array.name!r} must be (band, y, x), got dims {array.dims}")
    name = f"DataArray {array.name!r}"
    y_dim, x_dim = array.rio.y_dim, array.rio.x_dim
    band_dim = next(dim for dim in array.dims if dim not in (y_dim, x_dim))
    array = array.transpose(band_dim, y_dim, x_dim)
    descriptions = array.attrs.get("long_name")
    if isinstance(descriptions, str):
        descriptions = [descriptions]
    if descriptions is None and array[band_dim].dtype.kind in "UO":
        descriptions = [str(v) for v in array[band_dim].values]
    count = int(array.shape[0])
    names = _raw_names(name, count, list(descriptions or [None] * count), band_names)
    indexes = select_bands(model_bands, names, bands, name)
    nodata = array.rio.nodata
    info = RasterInfo(
        name=name,
        height=int(array.shape[1]),
        width=int(array.shape[2]),
        band_names=list(model_bands),
        crs=_check_crs(name, array.rio.crs, array.rio.transform()),
        transform=array.rio.transform(),
        nodata=[None if nodata is None else float(nodata)] * len(indexes),
        itemsize=array.dtype.itemsize,
    )
    return RasterInput(info, ArrayReader(array, None if indexes == list(range(count)) else tuple(indexes)))


def open_raster(
    raster: str | Path | Any,
    band_names: Sequence[str] | None = None,
    model_bands: Sequence[str] | None = None,
    bands: Sequence[str] | None = None,
) -> tuple[RasterInfo, Any]:
    """Describe a raster file, a rioxarray DataArray or a `RasterInput`, and return a picklable window reader.

    `band_names` names the raster's bands (else its band descriptions); `bands` maps them to the
    model's bands `model_bands` (see `select_bands`); without `model_bands` the raster's own named
    bands are read, all of them.
    """
    if isinstance(raster, RasterInput):
        return raster.info, raster.reader
    if not isinstance(raster, str | Path) and not hasattr(raster, "rio"):
        raise TypeError(f"expected a raster path or an xarray DataArray, got {type(raster).__name__}")
    if model_bands is None:
        if band_names is None:
            raise RasterInputError("open_raster needs the model's bands (model_bands) or the raster's band_names")
        model_bands = list(band_names)
    opened = (
        _open_file(Path(raster), model_bands, band_names, bands)
        if isinstance(raster, str | Path)
        else _open_array(raster, model_bands, band_names, bands)
    )
    return opened.info, opened.reader


def read_with_ingest_reader(
    path: str | Path,
    format: str,
    model_bands: Sequence[str],
    bands: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
) -> list[tuple[str, RasterInput]]:
    """Inputs in a format the ingest readers know (npz, landslide4sense, ...) as in-memory rasters, one per scene.

    The reader is asked for whole scenes (`WHOLE_SCENE`, no tiling; readers that tile from files
    read windows instead); nodata pixels become NaN. The chips carry no CRS, so the outputs carry
    none either.
    """
    from workbench.data.ingest import check_options, get_reader, reader_options
    from workbench.data.sources import WHOLE_SCENE

    options = dict(options or {})
    if "label_key" in reader_options(format):
        options.setdefault("label_key", None)  # predicting needs no label
    check_options(format, options)
    source = get_reader(format)(Path(path), chip_size=WHOLE_SCENE, **options)
    names: list[str | None] = [band.name for band in source.bands]
    indexes = select_bands(model_bands, names, bands, str(path))
    inputs = []
    for chip in source.chips:
        image = np.asarray(chip.image, dtype=np.float32)[indexes].copy()
        image[:, ~np.asarray(chip.valid, dtype=bool)] = np.nan
        name = f"{path} [{chip.chip_id}]"
        info = RasterInfo(
            name=name,
            height=int(image.shape[1]),
            width=int(image.shape[2]),
            band_names=list(model_bands),
            crs=_check_crs(name, None, Affine.identity()),
            transform=Affine.identity(),
            nodata=[None] * len(indexes),
            itemsize=4,
        )
        inputs.append((chip.chip_id, RasterInput(info, MemoryReader(image))))
    if not inputs:
        raise RasterInputError(f"the {format} reader found no scene in {path}")
    return inputs


# --------------------------------------------------------------------------- input sanity


def _sample_pixels(info: RasterInfo, reader: Any, side: int = 256, grid: int = 3) -> np.ndarray:
    """Valid pixels (n, C) of up to grid x grid windows of `side` pixels spread over the raster."""
    from workbench.infer.blocks import input_valid

    rows = sorted({int(r) for r in np.linspace(0, max(0, info.height - side), grid)})
    cols = sorted({int(c) for c in np.linspace(0, max(0, info.width - side), grid)})
    samples = []
    for r in rows:
        for c in cols:
            raw = reader((r, min(info.height, r + side)), (c, min(info.width, c + side)))
            valid = input_valid(raw, info.nodata)
            samples.append(raw[:, valid].T.astype(np.float64))
    return np.concatenate(samples) if samples else np.zeros((0, len(info.band_names)))


@dataclass
class InputCheck:
    """What the input sanity check measured: value scale and pixel size against the training inputs."""

    scale_factor: float | None = None  # geometric mean over bands of raster / training typical magnitude
    band_factors: dict[str, float] | None = None
    pixel_size_m: float | None = None
    train_pixel_size_m: float | None = None
    notes: list[str] = field(default_factory=list)


SCALE_REFUSE = 10.0  # a raster whose values are 10x (or 1/10) those of training is refused
PIXEL_REFUSE = 1.5  # a pixel 1.5x (or 1/1.5) the training pixel is refused
PIXEL_WARN = 1.1


def check_input(bundle: ModelBundle, info: RasterInfo, reader: Any, allow_mismatch: bool = False) -> InputCheck:
    """Compare a raster's value scale and pixel size with the bundle's input profile.

    Values: per band the root mean square of a sample of valid pixels against the training one; a
    geometric-mean factor beyond 10x either way (digital numbers x10000 against reflectance, percent
    against fractions) raises `InputMismatchError`, single bands beyond it warn. Pixel size: beyond
    1.5x either way raises, beyond 1.1x warns. `allow_mismatch` turns the refusals into warnings.
    Bundles without an input profile are not checked.
    """
    from workbench.data.sources.geotiff import pixel_size_m

    check = InputCheck()
    profile = bundle.input_profile
    if profile is None:
        check.notes = ["the model bundle has no input profile; value scale and pixel size were not checked"]
        return check
    problems: list[str] = []

    def complain(message: str, refuse: bool) -> None:
        if refuse and not allow_mismatch:
            problems.append(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    pixels = _sample_pixels(info, reader)
    if len(pixels):
        raster_scale = np.sqrt((pixels**2).mean(axis=0))
        factors = {}
        for band, train, got in zip(info.band_names, profile.typical_scale(), raster_scale):
            if train > 0 and got > 0:
                factors[band] = float(got / train)
        check.band_factors = factors
        if factors:
            overall = float(np.exp(np.mean(np.log(list(factors.values())))))
            check.scale_factor = overall
            shown = ", ".join(f"{band} x{factor:.3g}" for band, factor in factors.items())
            if not 1 / SCALE_REFUSE < overall < SCALE_REFUSE:
                complain(
                    f"raster {info.name} has values about {overall:.3g} times those the model was trained on "
                    f"(typical magnitude per band: {shown}); a reflectance raster stored as digital numbers "
                    "(x10000) or percent? rescale it to the training units (or pass --allow-input-mismatch)",
                    refuse=True,
                )
            else:
                odd = [band for band, f in factors.items() if not 1 / SCALE_REFUSE < f < SCALE_REFUSE]
                if odd:
                    complain(
                        f"raster {info.name}: bands {odd} have values far from their training magnitude ({shown})",
                        refuse=False,
                    )
    raster_pixel = pixel_size_m(info.transform, info.crs)
    check.pixel_size_m, check.train_pixel_size_m = raster_pixel, profile.pixel_size_m
    if profile.pixel_size_m is None:
        check.notes.append("the training pixel size is unknown; pixel size not checked")
    elif raster_pixel is None:
        check.notes.append(f"raster {info.name} has no CRS; pixel size not checked")
    else:
        ratio = raster_pixel / profile.pixel_size_m
        if not 1 / PIXEL_WARN <= ratio <= PIXEL_WARN:
            refuse = not 1 / PIXEL_REFUSE <= ratio <= PIXEL_REFUSE
            complain(
                f"raster {info.name} has {raster_pixel:.3g} m pixels but the model was trained on "
                f"{profile.pixel_size_m:.3g} m pixels; resample it first, e.g. gdalwarp -tr "
                f"{profile.pixel_size_m:g} {profile.pixel_size_m:g} -r bilinear"
                + (" (or pass --allow-input-mismatch)" if refuse else ""),
                refuse=refuse,
            )
    if problems:
        raise InputMismatchError("; ".join(problems))
    return check


# --------------------------------------------------------------------------- outputs


@dataclass
class PredictionResult:
    """Where predict_raster wrote its outputs, what it used and what the run cost."""

    probability: Path | None  # None: a softmax model predicted with probabilities=False
    mask: Path
    polygons: Path
    n_polygons: int
    n_blocks: int
    block_size: int
    peak_rss_mb: float
    peak_increase_mb: float
    seconds: float
    threshold: float = 0.5
    window: int = DEFAULT_WINDOW
    input_check: InputCheck | None = None

    @property
    def paths(self) -> dict[str, Path]:
        paths = {"mask": self.mask, "polygons": self.polygons}
        return paths if self.probability is None else {"probability": self.probability, **paths}


def _output_profile(info: RasterInfo, count: int, dtype: str, nodata: float) -> dict[str, Any]:
    profile = {
        "driver": "GTiff",
        "height": info.height,
        "width": info.width,
        "count": count,
        "dtype": dtype,
        "transform": info.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": OUTPUT_TILE,
        "blockysize": OUTPUT_TILE,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    if info.crs is not None:
        profile["crs"] = info.crs
    return profile


def _temporary_beside(path: Path, suffix: str = ".partial") -> Path:
    """An empty temporary file beside `path` (user's normal permissions; swept when its process is gone)."""
    return create_temp_file(path, suffix)


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


def class_colormap(colors: Sequence[str]) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table {class id: (r, g, b, 255)} from "#rrggbb" colours; the mask's nodata 255 is transparent."""
    table = {i: (int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16), 255) for i, c in enumerate(colors)}
    table[MASK_NODATA] = (0, 0, 0, 0)
    return table


def _output_bytes(info: RasterInfo, classes: int) -> int:
    """Uncompressed size of probability.tif and mask.tif: the free space predict asks for."""
    return int(info.height) * int(info.width) * (4 * classes + 1)


def write_cog(source: Path, target: Path, resampling: str) -> Path:
    """Copy a tiled GeoTIFF into a Cloud-Optimized GeoTIFF with internal overviews, checked by rio-cogeo.

    GDAL's COG driver streams the copy (memory stays bounded), writes 256-pixel tiles, deflate
    compression and overviews down to one tile (`resampling`: average for probabilities, nearest for
    masks); the result must pass `rio_cogeo.cogeo.cog_validate` and read back before it is kept.
    """
    import rasterio.shutil
    from rio_cogeo.cogeo import cog_validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        rasterio.shutil.copy(
            source,
            target,
            driver="COG",
            BLOCKSIZE=OUTPUT_TILE,
            COMPRESS="DEFLATE",
            OVERVIEWS="IGNORE_EXISTING",
            OVERVIEW_RESAMPLING=resampling.upper(),
            RESAMPLING=resampling.upper(),
            BIGTIFF="IF_SAFER",
        )
        valid, errors, _ = cog_validate(str(target), quiet=True)
        with rasterio.open(target) as check:  # readable through to the last tile
            check.read(1, window=rasterio.windows.Window(check.width - 1, check.height - 1, 1, 1))
    if not valid:
        raise RuntimeError(f"{target} is not a valid Cloud-Optimized GeoTIFF: {errors}")
    return target


def _resolve_bundle(
    model: str | Path | ModelBundle, build_model: BuildModel | None, allow_uncalibrated: bool = False
) -> ModelBundle:
    if isinstance(model, ModelBundle):
        return model
    return load_bundle(model, build_model, require_calibration=not allow_uncalibrated)


def resolve_threshold(bundle: ModelBundle, threshold: float | None = None, region: str | None = None) -> float:
    """The operating threshold: `threshold` when given, else the calibrated one of `region`, else the global one."""
    if threshold is not None and region is not None:
        raise ValueError("give either a threshold or a region (whose calibrated threshold is used), not both")
    if threshold is not None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
        return float(threshold)
    if region is None:
        return bundle.threshold
    per_region = bundle.calibration.get("per_region") or {}
    if not per_region:
        raise ValueError(
            f"region {region!r} asked for, but the calibration of {bundle.model_dir} has no per-region thresholds "
            "(run calibration with calibrate.per_region: true, or drop the region to use the global threshold "
            f"{bundle.threshold:g})"
        )
    if region not in per_region:
        raise ValueError(f"region {region!r} has no calibrated threshold; calibrated regions: {sorted(per_region)}")
    return float(per_region[region])


def resolve_device(device: str) -> str:
    """`auto` is cuda when available, else cpu; a CUDA device asked for on a machine without one is refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto, got {device!r}")
    return device


def check_options(window: int, stride: int, batch_size: int, memory_limit_mb: float | None) -> None:
    """Refuse nonsensical sliding-window and memory options with the value and what is allowed."""
    if window < 1:
        raise ValueError(f"window must be a positive number of pixels, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must lie in 1..window ({window}) so windows overlap or touch, got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if memory_limit_mb is not None and not memory_limit_mb > 0:
        raise ValueError(f"memory limit must be a positive number of MiB, got {memory_limit_mb}")


def _polygons_geojson(
    merged: list[tuple[Any, int]], info: RasterInfo, min_area_m2: float, class_names: Sequence[str] | None = None
) -> tuple[str, int]:
    """Polygons in EPSG:4326 with areas in m2; without a CRS, in the pixel grid with areas in pixels."""
    if info.crs is not None:
        return polygons_geojson(merged, info.transform, info.crs, min_area_m2, class_names)
    import geopandas as gpd
    from shapely import affinity

    t = info.transform
    geometries = [affinity.affine_transform(poly, [t.a, t.b, t.d, t.e, t.c, t.f]) for poly, _ in merged]
    frame = gpd.GeoDataFrame({"class": [value for _, value in merged]}, geometry=geometries)
    if class_names is not None:
        frame["class_name"] = [str(class_names[value]) for _, value in merged]
    pixel_area = abs(t.a * t.e - t.b * t.d) or 1.0
    frame["area_px"] = np.asarray(frame.area, dtype=np.float64) / pixel_area if len(frame) else np.zeros(0)
    frame["id"] = np.arange(len(frame))
    return str(frame.to_json(drop_id=True)), len(frame)


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
    bands: Sequence[str] | None = None,
    precision: str = "fp32",
    threshold: float | None = None,
    region: str | None = None,
    scheduler: str | None = None,
    workers: int = 4,
    allow_input_mismatch: bool = False,
    refuse_small_memory_limit: bool = False,
    probabilities: bool = True,
) -> PredictionResult:
    """Predict a raster block by block into probability.tif, mask.tif (Cloud-Optimized GeoTIFFs) and polygons.

    The raster's bands (band descriptions, or `band_names`) must be the model's bands in its order,
    unless `bands` maps them (by name or 1-based index, see `select_bands`). Its value scale and pixel
    size are compared with the training inputs first (`check_input`). The window defaults to the
    training chip size recorded in the bundle. Square blocks (`block_size` pixels, by default sized so
    that one block stays under `memory_limit_mb`, 1024 MiB when not given; `model_memory_mb` is one batch
    forward's working memory, estimated when not given) are read, predicted and written with windowed
    writes, so rasters larger than memory work; the result does not depend on the block size nor on
    the `scheduler` (None: in process; "threads": dask delayed tasks, `workers` at a time, each block
    then sized for limit / workers; an address: a dask distributed cluster). `precision` bf16/fp16
    runs the model under autocast; `threshold` replaces the calibrated threshold, `region` picks the
    region's calibrated one. A raster without a CRS gives outputs without one. Outputs replace earlier
    files only once complete, validated and read back whole; a model dir without
    calibration.json is refused unless `allow_uncalibrated`. A memory limit below the smallest block warns, or with
    `refuse_small_memory_limit` (as the command line does) raises.

    A softmax model (num_classes >= 2) writes `mask.tif` as its class raster (uint8 class ids, 255 nodata)
    with a GDAL colour table of the class colours, decided by argmax of the calibrated probabilities (per-class
    temperatures and a calibrated class-of-interest threshold applied); `probability.tif` holds one float32
    band per class named after it (skipped with `probabilities=False`); polygons carry `class`, `class_name`
    and `area_m2`, one set per class (background, class 0, is not vectorised).
    """
    started = time.perf_counter()
    bundle = _resolve_bundle(model_dir, build_model, allow_uncalibrated)
    device = resolve_device(device)
    import torch

    with autocast_context(device, precision):  # refuse an unusable precision before any work
        torch.zeros(1)
    cut = resolve_threshold(bundle, threshold, region)
    profile = bundle.input_profile
    window = window if window is not None else (profile.chip_size if profile and profile.chip_size else DEFAULT_WINDOW)
    stride = stride if stride is not None else max(1, window // 2)
    check_options(window, stride, batch_size, memory_limit_mb)
    if isinstance(raster, str | Path) or hasattr(raster, "rio"):
        info, reader = open_raster(raster, band_names, bundle.bands, bands)
    else:
        info, reader = open_raster(raster)
    check_bands(bundle, info.band_names, source=f"raster {info.name}")
    input_check = check_input(bundle, info, reader, allow_input_mismatch)
    classes = bundle.num_classes
    specs = resolve_classes(bundle.model_params)
    names = [spec.name for spec in specs] if classes >= 2 else None
    class_thresholds = (
        {names.index(name): float(t) for name, t in (bundle.calibration.get("class_thresholds") or {}).items()}
        if names
        else {}
    )
    write_probs = probabilities or classes == 1
    limit_mb = memory_limit_mb or DEFAULT_MEMORY_LIMIT_MB
    in_flight = max(1, workers) if scheduler is not None else 1
    if refuse_small_memory_limit and memory_limit_mb is not None and block_size is None:
        smallest = in_flight * smallest_memory_limit_mb(
            len(bundle.bands), classes, window, batch_size, info.itemsize, model_memory_mb
        )
        if memory_limit_mb < smallest:
            raise ValueError(
                f"memory limit {memory_limit_mb:g} MiB is below the smallest workable one, about {smallest:.0f} MiB "
                f"for {len(bundle.bands)} bands, window {window}, batch size {batch_size} and {in_flight} block(s) "
                "in flight; raise --memory-limit-mb or lower --window / --batch-size"
            )
    side = block_size or block_size_for_memory(
        limit_mb / in_flight, len(bundle.bands), classes, window, batch_size, info.itemsize, model_memory_mb
    )
    blocks = plan_blocks(info.height, info.width, window, stride, side, scales)
    job = BlockJob(bundle, reader, info.nodata, window, stride, batch_size, tta, device, tuple(scales), precision)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out)  # temporary outputs of an interrupted predict
    ensure_free_space(out, _output_bytes(info, classes), "probability.tif and mask.tif (uncompressed size)")
    final = {"probability": out / "probability.tif", "mask": out / "mask.tif", "polygons": out / "polygons.geojson"}
    rasters = [key for key in ("probability", "mask") if key != "probability" or write_probs]
    tiled = {key: _temporary_beside(final[key]) for key in rasters}
    cogs = {key: _temporary_beside(final[key], ".cog.partial") for key in rasters}
    polygons = BlockPolygons(info.height, info.width)
    try:
        with (
            rasterio.Env(GDAL_CACHEMAX=gdal_cache_mb(limit_mb)),
            PeakMemory() as memory,
            ExitStack() as stack,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            prob_dst = (
                stack.enter_context(
                    rasterio.open(tiled["probability"], "w", **_output_profile(info, classes, "float32", float("nan")))
                )
                if write_probs
                else None
            )
            mask_dst = stack.enter_context(
                rasterio.open(tiled["mask"], "w", **_output_profile(info, 1, "uint8", MASK_NODATA))
            )
            mask_dst.descriptions = ("mask",) if names is None else ("class",)
            if names is not None:
                mask_dst.write_colormap(1, class_colormap([spec.color for spec in specs]))
                mask_dst.update_tags(classes=",".join(names), model=str(bundle.model_dir or ""))
            if prob_dst is not None:
                prob_dst.descriptions = ("probability",) if names is None else tuple(names)
                prob_dst.update_tags(threshold=str(cut), model=str(bundle.model_dir or ""))
            for block, probs in tqdm(
                run_blocks(job, blocks, max_in_flight=in_flight, scheduler=scheduler),
                total=len(blocks),
                desc="blocks",
                unit="block",
                disable=not progress,
            ):
                rows, cols = block.rows, block.cols
                target = rasterio.windows.Window.from_slices((rows.core0, rows.core1), (cols.core0, cols.core1))
                mask = probability_to_mask(probs, cut, class_thresholds)
                if prob_dst is not None:
                    prob_dst.write(probs.astype(np.float32, copy=False), window=target)
                mask_dst.write(mask[None], window=target)
                polygons.add_block(mask, rows.core0, cols.core0)
                del probs, mask
            stack.close()
            if write_probs:
                write_cog(tiled["probability"], cogs["probability"], "average")
            write_cog(tiled["mask"], cogs["mask"], "nearest")
        merged = polygons.merged()
        geojson, n_polygons = _polygons_geojson(merged, info, min_area_m2, names)
        if write_probs:
            verify_geotiff(cogs["probability"], info.height, info.width, classes, "float32")
        verify_geotiff(cogs["mask"], info.height, info.width, 1, "uint8")
        for key, path in cogs.items():
            commit_temp(path, final[key])
        write_text_atomic(final["polygons"], geojson)
    finally:
        for path in [*tiled.values(), *cogs.values()]:
            path.unlink(missing_ok=True)
    return PredictionResult(
        probability=final["probability"] if write_probs else None,
        mask=final["mask"],
        polygons=final["polygons"],
        n_polygons=n_polygons,
        n_blocks=len(blocks),
        block_size=side,
        peak_rss_mb=memory.peak_mb,
        peak_increase_mb=memory.increase_mb,
        seconds=time.perf_counter() - started,
        threshold=cut,
        window=window,
        input_check=input_check,
    )


def predict_input(
    model_dir: str | Path | ModelBundle,
    path: str | Path,
    out_dir: str | Path,
    format: str | None = None,
    options: dict[str, Any] | None = None,
    build_model: BuildModel | None = None,
    **kwargs: Any,
) -> list[PredictionResult]:
    """Predict any input: a raster file (GDAL), or a file/folder in a format the ingest readers know.

    `format` None reads `.npz` archives with the npz reader and everything else with GDAL. An ingest
    format may yield several scenes: each gets its own folder `out_dir/<scene id>/` (one scene
    writes into `out_dir`). `kwargs` are `predict_raster`'s options.
    """
    path = Path(path)
    if format is None and path.suffix.lower() == ".npz":
        format = "npz"
    bundle = _resolve_bundle(model_dir, build_model, bool(kwargs.get("allow_uncalibrated", False)))
    if format is None or format == "geotiff":
        if options:
            raise ValueError(f"reader options {sorted(options)} need --format (GDAL rasters take none)")
        return [predict_raster(bundle, path, out_dir, **kwargs)]
    scenes = read_with_ingest_reader(path, format, bundle.bands, kwargs.pop("bands", None), options)
    if len(scenes) == 1:
        return [predict_raster(bundle, scenes[0][1], out_dir, **kwargs)]
    return [predict_raster(bundle, scene, Path(out_dir) / scene_id, **kwargs) for scene_id, scene in scenes]

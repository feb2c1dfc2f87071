"""Co-registered GeoTIFF image stacks plus a label raster, tiled into georeferenced chips.

The image is one or more GeoTIFFs on the same pixel grid, stacked band-wise in the order given; the label
is a single-band raster on that grid. Large rasters are read window by window, so memory holds one chip.
A pixel is nodata when any band is not finite, or when all bands of one file equal that file's nodata
value. Label pixels equal to the label file's nodata value (or listed in ``label_ignore``) get the
ignore index 255.

This module also holds the raster helpers the other GeoTIFF-based readers use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.sources import (
    Scene,
    Source,
    SourceError,
    SourceNotFoundError,
    as_class_map,
    as_number_list,
    as_str_list,
    map_classes,
    resolve_tiling,
    scene_chips,
)
from workbench.data.store import BandSpec, Chip


@dataclass
class Raster:
    """A raster read into memory with its grid."""

    path: Path
    data: np.ndarray  # (band, y, x)
    transform: Any
    crs: Any
    nodata: float | None


def pixel_size_m(transform: Any, crs: Any) -> float | None:
    """The mean pixel side of a grid in metres (degrees converted at the grid's latitude); None without a CRS."""
    import math

    if transform is None or crs is None:
        return None
    side_x, side_y = math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)
    if side_x == 0 or side_y == 0:
        return None
    if crs.is_geographic:
        lat = transform.f + transform.e * 0.5  # near the top edge; enough for a scale check
        metres_per_degree = 111_320.0
        return float((side_x * math.cos(math.radians(lat)) + side_y) / 2 * metres_per_degree)
    factor = crs.linear_units_factor[1] if crs.is_projected else 1.0
    return float((side_x + side_y) / 2 * factor)


def open_raster(path: Path) -> Any:
    """Open a raster with rasterio; a missing or unreadable file gives an error that names it."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path} does not exist; expected a GeoTIFF")
    try:
        with warnings.catch_warnings():  # patches such as 38-Cloud's carry no georeference on purpose
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as error:
        raise SourceError(f"{path}: cannot read as a raster ({error}); expected a GeoTIFF") from None


def read_raster(path: Path, bands: int | None = None) -> Raster:
    """Read a whole raster; `bands` checks the band count and names the file when it differs."""
    from rasterio.errors import RasterioError

    with open_raster(path) as dataset:
        if bands is not None and dataset.count != bands:
            raise SourceError(f"{path}: has {dataset.count} bands, expected {bands}")
        try:
            data = dataset.read()
        except RasterioError as error:
            raise SourceError(f"{path}: cannot read pixel data ({error}); the file may be truncated") from None
        return Raster(Path(path), data, dataset.transform, dataset.crs, dataset.nodata)


def check_same_grid(first: Any, second: Any, first_path: Path, second_path: Path) -> None:
    """Raise when two open rasters are not on the same pixel grid, naming both files."""
    if (first.height, first.width) != (second.height, second.width):
        raise SourceError(
            f"shape mismatch: {first_path} is {first.height}x{first.width} but {second_path} is "
            f"{second.height}x{second.width}; they must be co-registered"
        )
    if first.crs and second.crs and first.crs != second.crs:
        raise SourceError(f"CRS mismatch: {first_path} is {first.crs} but {second_path} is {second.crs}")
    if not first.transform.almost_equals(second.transform, precision=1e-6 * max(abs(first.transform.a), 1e-9)):
        raise SourceError(f"grid mismatch: {first_path} and {second_path} have different geotransforms")


def nodata_valid(image: np.ndarray, nodata: float | None) -> np.ndarray:
    """Valid pixels of one file's bands: all finite and not every band equal to `nodata`."""
    valid = np.all(np.isfinite(image), axis=0)
    if nodata is not None and not np.isnan(nodata):
        valid &= ~np.all(image == nodata, axis=0)
    return np.asarray(valid)


def resolve_path(name: str | Path, base: Path) -> Path:
    """`name` relative to `base` when it exists there, otherwise as given (absolute or relative to cwd)."""
    candidate = base / name
    return candidate if candidate.exists() else Path(name)


@dataclass
class RasterStack:
    """Co-registered image files read window by window as one (band, y, x) stack."""

    paths: list[Path]
    band_counts: list[int]
    nodata: list[float | None]
    height: int
    width: int
    transform: Any
    crs: Any

    @classmethod
    def open(cls, paths: list[Path]) -> RasterStack:
        """Check the files share one grid and record their band counts and nodata values."""
        if not paths:
            raise SourceNotFoundError("no image GeoTIFF given")
        with ExitStack() as stack:
            datasets = [stack.enter_context(open_raster(path)) for path in paths]
            for dataset, path in zip(datasets[1:], paths[1:]):
                check_same_grid(datasets[0], dataset, paths[0], path)
            first = datasets[0]
            return cls(
                paths=list(paths),
                band_counts=[dataset.count for dataset in datasets],
                nodata=[dataset.nodata for dataset in datasets],
                height=first.height,
                width=first.width,
                transform=first.transform,
                crs=first.crs,
            )

    def default_band_names(self) -> list[str]:
        """b1..bn for one file; <file stem>_b1.. for several."""
        if len(self.paths) == 1:
            return [f"b{i + 1}" for i in range(self.band_counts[0])]
        return [f"{path.stem}_b{i + 1}" for path, count in zip(self.paths, self.band_counts) for i in range(count)]

    def windows(
        self, chip_size: int | None, stride: int | None
    ) -> Iterator[tuple[int, int, int, np.ndarray, np.ndarray]]:
        """(row, col, size, image, valid) for every tiling window, reading only that window from disk."""
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        with ExitStack() as stack:
            datasets = [stack.enter_context(open_raster(path)) for path in self.paths]
            for row, col, size in resolve_tiling(self.height, self.width, chip_size, stride):
                window = Window(col, row, size, size)
                parts, valid = [], np.ones((size, size), dtype=bool)
                for dataset, nodata, path in zip(datasets, self.nodata, self.paths):
                    try:
                        part = dataset.read(window=window).astype(np.float32)
                    except RasterioError as error:
                        raise SourceError(f"{path}: cannot read pixels ({error}); the file may be corrupt") from None
                    valid &= nodata_valid(part, nodata)
                    parts.append(part)
                image = np.nan_to_num(np.concatenate(parts), nan=0.0, posinf=0.0, neginf=0.0)
                yield row, col, size, image, valid


LabelFn = Callable[[int, int, int], tuple[np.ndarray, dict[str, np.ndarray]]]


def stack_chips(
    stack: RasterStack,
    label_fn: LabelFn,
    name: str,
    chip_size: int | None,
    stride: int | None,
    source: str,
    file: str,
    region: str = "",
    year: int = 0,
    split: str = "",
) -> Iterator[Chip]:
    """Chips of a raster stack; `label_fn(row, col, size)` gives each window's label and extra planes."""
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    n_windows = len(resolve_tiling(stack.height, stack.width, chip_size, stride))
    for row, col, size, image, valid in stack.windows(chip_size, stride):
        label, planes = label_fn(row, col, size)
        scene = Scene(
            name=name if n_windows == 1 else f"{name}_r{row}_c{col}",
            image=image,
            label=label,
            valid=valid,
            file=file,
            transform=window_transform(Window(col, row, size, size), stack.transform),
            crs=stack.crs,
            region=region,
            year=year,
            split=split,
            planes=planes,
            extra={"row": int(row), "col": int(col)},  # the window's place in the raster (split.method=rows)
        )
        yield from scene_chips(scene, None, None, source)


def band_table(stack: RasterStack, band_names: Any, modality: str, optical: bool) -> list[BandSpec]:
    """BandSpecs for a stack; `band_names` must match the total band count."""
    names = stack.default_band_names() if band_names is None else as_str_list(band_names, "band_names")
    if len(names) != sum(stack.band_counts):
        raise SourceError(
            f"band_names lists {len(names)} names but {', '.join(map(str, stack.paths))} hold "
            f"{sum(stack.band_counts)} bands"
        )
    if len(stack.paths) == 1 or modality:
        modalities = [modality or "image"] * len(names)
    else:
        modalities = [path.stem for path, count in zip(stack.paths, stack.band_counts) for _ in range(count)]
    return [BandSpec(name, kind, optical=bool(optical)) for name, kind in zip(names, modalities)]


def image_paths(src: Path, images: Any, exclude: set[Path]) -> list[Path]:
    """Image files: `src` itself when it is a file, the `images` option, or every .tif in the folder."""
    src = Path(src)
    if not src.exists():
        raise SourceNotFoundError(f"{src} does not exist; expected a GeoTIFF or a folder of GeoTIFFs")
    base = src if src.is_dir() else src.parent
    if images is not None:
        return [resolve_path(name, base) for name in as_str_list(images, "images")]
    if src.is_file():
        return [src]
    found = sorted(p for p in src.iterdir() if p.suffix.lower() in {".tif", ".tiff"} and p.resolve() not in exclude)
    if not found:
        raise SourceNotFoundError(f"no GeoTIFF (.tif) image found in {src}")
    return found


def read_geotiff(
    src: Path,
    chip_size: int | None = None,
    stride: int | None = None,
    label: str | None = None,
    images: Any = None,
    band_names: Any = None,
    modality: str = "",
    optical: bool = False,
    class_map: Any = None,
    label_ignore: Any = None,
    region: str = "",
    year: int = 0,
    split: str = "",
) -> Source:
    """A GeoTIFF image stack and its label raster as georeferenced chips.

    `src` is the image GeoTIFF, or a folder whose .tif files (all but the label) form the stack;
    `images` lists the stack's files explicitly (relative to the folder or absolute). `label` is the
    label raster (None: unlabelled, every label pixel 255). `class_map` maps raw label values to class ids.
    """
    src = Path(src)
    base = src if src.is_dir() else src.parent
    label_path = None if label is None else resolve_path(label, base)
    exclude = set() if label_path is None else {label_path.resolve()}
    stack = RasterStack.open(image_paths(src, images, exclude))
    bands = band_table(stack, band_names, modality, optical)
    mapping = as_class_map(class_map)
    ignore = as_number_list(label_ignore, "label_ignore")
    label_fn = raster_label_fn(stack, label_path, mapping, ignore)
    name = stack.paths[0].stem
    chips = stack_chips(stack, label_fn, name, chip_size, stride, "geotiff", str(stack.paths[0]), region, year, split)
    total = len(resolve_tiling(stack.height, stack.width, chip_size, stride))
    attrs = {
        "images": [str(p) for p in stack.paths],
        "label": None if label_path is None else str(label_path),
        "pixel_size_m": pixel_size_m(stack.transform, stack.crs),
    }
    return Source(bands=bands, chips=chips, total=total, attrs=attrs)


def raster_label_fn(stack: RasterStack, label_path: Path | None, mapping: Any, ignore: list[Any]) -> LabelFn:
    """A label_fn reading windows of a label raster (checked against the stack's grid)."""
    from rasterio.windows import Window

    if label_path is None:
        return lambda row, col, size: (np.full((size, size), 255, dtype=np.uint8), {})
    with open_raster(label_path) as labels, open_raster(stack.paths[0]) as first:
        check_same_grid(first, labels, stack.paths[0], label_path)
        if labels.count != 1:
            raise SourceError(f"{label_path}: a label raster must have 1 band, found {labels.count}")
        nodata = labels.nodata
    values = [*ignore, *([] if nodata is None else [nodata])]

    def read_label(row: int, col: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with open_raster(label_path) as dataset:
            raw = dataset.read(1, window=Window(col, row, size, size))
        try:
            return map_classes(raw, mapping, ignore_values=values), {}
        except ValueError as error:
            raise SourceError(f"{label_path}: {error}") from None

    return read_label

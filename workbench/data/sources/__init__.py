"""Readers that turn external Earth-observation formats into chips for the chip store.

Every reader is a function ``read_<format>(src, chip_size=None, stride=None, **options) -> Source``.
It finds and pairs the files eagerly (cheap, so problems such as unpaired files are known at once) and
returns a lazy generator of :class:`~workbench.data.store.Chip` objects, so an ingest reads one file
(or one window of a large raster) at a time and memory stays bounded.

This module holds what the readers share: the :class:`Source` bundle, tiling of rasters larger than a
chip, the chip centre in WGS84, class mapping, and coercion of option values that arrive as strings or
YAML-parsed values from the command line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from workbench.arrays import IGNORE_INDEX, window_starts
from workbench.data.store import BandSpec, Chip

S2_L1C_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
S2_L2A_BANDS = [name for name in S2_L1C_BANDS if name != "B10"]


class SourceError(ValueError):
    """An input file or folder does not match the layout its reader expects."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """An input file or folder is missing, or a folder holds no file of the expected kind."""


@dataclass
class Source:
    """What a reader hands to the ingest: the band table, a lazy chip stream and what could not be paired."""

    bands: list[BandSpec]
    chips: Iterator[Chip]
    unpaired: list[str] = field(default_factory=list)  # files without their partner, with the reason
    total: int | None = None  # number of chips when known in advance (for progress bars)
    attrs: dict[str, Any] = field(default_factory=dict)  # stored in store.json


@dataclass
class Scene:
    """One co-registered image and label in memory, before it is cut into chips."""

    name: str
    image: np.ndarray  # (band, y, x) float32, finite
    label: np.ndarray  # (y, x) uint8 class ids, IGNORE_INDEX = no label
    valid: np.ndarray  # (y, x) bool
    file: str
    transform: Any = None  # affine.Affine of the scene's pixel grid, or None
    crs: Any = None  # rasterio CRS of the grid, or None
    lat: float = float("nan")  # used when there is no transform
    lon: float = float("nan")
    region: str = ""
    year: int = 0
    split: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    planes: dict[str, np.ndarray] = field(default_factory=dict)


# tiling -------------------------------------------------------------------------------------------
def tile_windows(height: int, width: int, chip_size: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(row, col) offsets of square windows covering a height x width raster; the last row/column of
    windows is flush with the edge, so every pixel lies in at least one window.

    >>> tile_windows(500, 224, 224, 112)
    [(0, 0), (112, 0), (224, 0), (276, 0)]
    """
    stride = chip_size if stride is None else stride
    if chip_size < 1 or stride < 1:
        raise ValueError(f"chip_size and stride must be positive, got {chip_size} and {stride}")
    if min(height, width) < chip_size:
        raise ValueError(f"a {height}x{width} raster is smaller than the chip size {chip_size}")
    rows = window_starts(height, chip_size, stride, allow_gaps=True)
    cols = window_starts(width, chip_size, stride, allow_gaps=True)
    return [(row, col) for row in rows for col in cols]


WHOLE_SCENE = 0  # chip_size asking in-memory readers for whole scenes of any shape (as inference reads them)


def resolve_tiling(height: int, width: int, chip_size: int | None, stride: int | None) -> list[tuple[int, int, int]]:
    """(row, col, size) windows for a raster: the whole raster when chip_size is None (it must be square
    then) or WHOLE_SCENE (any shape: the window is the longer side, clipped by slicing), otherwise
    `tile_windows`."""
    if chip_size == WHOLE_SCENE:
        return [(0, 0, max(height, width))]
    if chip_size is None:
        if height != width:
            raise ValueError(f"a {height}x{width} raster is not square; give a chip_size to tile it")
        return [(0, 0, height)]
    return [(row, col, chip_size) for row, col in tile_windows(height, width, chip_size, stride)]


def chip_count(height: int, width: int, chip_size: int | None, stride: int | None) -> int:
    """Number of chips `resolve_tiling` cuts from a raster of this size."""
    return len(resolve_tiling(height, width, chip_size, stride))


# georeference -----------------------------------------------------------------------------------------
def centre_lonlat(transform: Any, crs: Any, row: float, col: float, size_y: int, size_x: int) -> tuple[float, float]:
    """(lon, lat) in WGS84 of the centre of a window whose top-left pixel is (row, col)."""
    if transform is None or crs is None:
        return float("nan"), float("nan")
    x, y = transform @ (col + size_x / 2.0, row + size_y / 2.0)
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp_transform

    if CRS.from_user_input(crs) == CRS.from_epsg(4326):
        return float(x), float(y)
    lons, lats = warp_transform(crs, "EPSG:4326", [x], [y])
    return float(lons[0]), float(lats[0])


def chip_georeference(transform: Any, crs: Any, row: int, col: int, size_y: int, size_x: int) -> dict[str, Any]:
    """Catalog columns placing a window exactly: `crs` (its text form) and the window's bounds in that CRS
    (`x_min`, `y_min`, `x_max`, `y_max`); empty when the raster has no transform or CRS.

    The review map draws a chip's footprint from them (`workbench.review.geometry`) and burns polygons drawn
    on it onto the chip's pixels.
    """
    if transform is None or crs is None:
        return {}
    from rasterio.crs import CRS

    corners = [transform @ (col + dx, row + dy) for dx in (0, size_x) for dy in (0, size_y)]
    xs, ys = [float(x) for x, _ in corners], [float(y) for _, y in corners]
    return {
        "crs": CRS.from_user_input(crs).to_string(),
        "x_min": min(xs),
        "y_min": min(ys),
        "x_max": max(xs),
        "y_max": max(ys),
    }


def scene_chips(scene: Scene, chip_size: int | None, stride: int | None, source: str = "") -> Iterator[Chip]:
    """Cut a scene into chips (one chip when chip_size is None); ids gain `_r<row>_c<col>` when tiled."""
    height, width = scene.label.shape
    windows = resolve_tiling(height, width, chip_size, stride)
    for row, col, size in windows:
        window = (slice(row, row + size), slice(col, col + size))
        lon, lat = centre_lonlat(scene.transform, scene.crs, row, col, size, size)
        if scene.transform is None:
            lon, lat = scene.lon, scene.lat
        yield Chip(
            chip_id=scene.name if len(windows) == 1 else f"{scene.name}_r{row}_c{col}",
            image=scene.image[(slice(None), *window)],
            label=scene.label[window],
            valid=scene.valid[window],
            lat=lat,
            lon=lon,
            region=scene.region,
            year=scene.year,
            split=scene.split,
            source=source,
            extra={
                "file": scene.file,
                "row": int(row),
                "col": int(col),
                **chip_georeference(scene.transform, scene.crs, row, col, size, size),
                **scene.extra,
            },
            planes={name: plane[window] for name, plane in scene.planes.items()},
        )


# labels -------------------------------------------------------------------------------------------
OTHER = "other"
"""Class-map key for every raw value the map does not name (target a class id or "ignore")."""


def map_classes(
    raw: np.ndarray,
    class_map: Mapping[Any, int] | None,
    default: int = 0,
    ignore_values: Iterable[float] = (),
    where: str = "",
) -> np.ndarray:
    """Map raw label values to class ids (uint8).

    With `class_map` None the raw values are kept (they must fit 0..254, or be 255 = ignore). Otherwise
    each raw value in the map gets its target (a class id, or 255 for "ignore"). Other values: the map's
    `other` entry when it has one; `default` for a one-vs-rest map (every target 1: the listed values are
    the foreground); for a multiclass map (a target >= 2 or "ignore") they are an error naming the value,
    its pixel count and `where` (the file), since a silent background would mislabel them. Raw values
    listed in `ignore_values` become IGNORE_INDEX (255).
    """
    raw = np.asarray(raw)
    ignore = np.zeros(raw.shape, dtype=bool)
    for value in ignore_values:
        ignore |= raw == value
    if class_map is None:
        kept = raw[~ignore]
        if kept.size and (kept.min() < 0 or kept.max() > IGNORE_INDEX or not np.all(kept == np.round(kept))):
            raise ValueError(
                f"label values must be integers in 0..{IGNORE_INDEX} (found {kept.min()}..{kept.max()}); "
                "give a class_map"
            )
        out = np.where(ignore, IGNORE_INDEX, raw).astype(np.uint8)
        return out
    targets = {key: target for key, target in class_map.items() if key != OTHER}
    one_vs_rest = all(target == 1 for target in targets.values())
    fallback = class_map.get(OTHER, default if one_vs_rest else None)
    mapped = np.zeros(raw.shape, dtype=bool)
    out = np.full(raw.shape, IGNORE_INDEX if fallback is None else fallback, dtype=np.uint8)
    for value, target in targets.items():
        hit = raw == value
        out[hit] = target
        mapped |= hit
    if fallback is None:
        unmapped = ~mapped & ~ignore
        if unmapped.any():
            values, counts = np.unique(raw[unmapped], return_counts=True)
            listed = ", ".join(f"{v.item()} ({c} px)" for v, c in zip(values[:10], counts[:10], strict=True))
            raise ValueError(
                f"{where or 'label'}: raw label value(s) {listed} are not in the class_map "
                f"{dict(class_map)}; map each to a class id or 'ignore', or add 'other: <class id | ignore>'"
            )
    out[ignore] = IGNORE_INDEX
    return out


# option coercion (values from YAML, the command line or Python) ------------------------------------------
def _parse_text(value: Any) -> Any:
    if isinstance(value, str) and value.strip()[:1] in "[{":
        return yaml.safe_load(value)
    return value


def as_str_list(value: Any, name: str) -> list[str]:
    """A list of strings from a list/tuple, a YAML list string or a comma-separated string."""
    value = _parse_text(value)
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, Sequence):
        return [str(part) for part in value]
    raise ValueError(f"option {name!r} must be a list of names, got {value!r}")


def _as_number(key: Any, name: str) -> int | float:
    if isinstance(key, bool):
        return int(key)
    if isinstance(key, int | float):
        return key
    try:
        number = float(str(key))
    except ValueError:
        raise ValueError(f"option {name!r}: {key!r} is not a number") from None
    return int(number) if number.is_integer() else number


def as_class_map(value: Any, name: str = "class_map") -> dict[Any, int] | None:
    """A {raw value: class id} mapping from a dict (keys may be strings) or a YAML mapping string.

    A target may be "ignore" (stored as 255, no label); the key "other" maps every value not listed.
    """
    value = _parse_text(value)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"option {name!r} must be a mapping raw value -> class id, e.g. {{4: 1}}, got {value!r}")

    def target_of(target: Any) -> int:
        if isinstance(target, str) and target.strip().lower() == "ignore":
            return IGNORE_INDEX
        return int(_as_number(target, name))

    mapping: dict[Any, int] = {
        (OTHER if str(key).strip().lower() == OTHER else _as_number(key, name)): target_of(target)
        for key, target in value.items()
    }
    bad = [target for target in mapping.values() if not 0 <= target <= IGNORE_INDEX]
    if bad:
        raise ValueError(f"option {name!r}: class ids must lie in 0..{IGNORE_INDEX} or be 'ignore', got {bad}")
    return mapping


def as_mapping(value: Any, name: str) -> dict[str, Any]:
    """A dict of options from a dict, a YAML mapping string or None."""
    value = _parse_text(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"option {name!r} must be a mapping, got {value!r}")
    return {str(key): item for key, item in value.items()}


def as_number_list(value: Any, name: str) -> list[int | float]:
    """A list of numbers from a number, a list or a comma-separated string."""
    value = _parse_text(value)
    if value is None:
        return []
    if isinstance(value, int | float):
        return [value]
    return [_as_number(part, name) for part in as_str_list(value, name)]


# files ------------------------------------------------------------------------------------------------
def require_dir(src: Path, what: str) -> Path:
    """`src` as a Path, which must be an existing folder."""
    src = Path(src)
    if not src.exists():
        raise SourceNotFoundError(f"{src} does not exist; expected a folder of {what}")
    if not src.is_dir():
        raise SourceError(f"{src} is not a folder; expected a folder of {what}")
    return src


def find_files(root: Path, pattern: str, what: str) -> list[Path]:
    """Files under `root` (recursively) whose name matches the regular expression `pattern`, sorted
    naturally; a clear error when there are none."""
    regex = re.compile(pattern, re.IGNORECASE)
    found = sorted((path for path in root.rglob("*") if path.is_file() and regex.fullmatch(path.name)), key=natural_key)
    if not found:
        raise SourceNotFoundError(f"no {what} found under {root} (file names matching {pattern!r})")
    return found


def natural_key(path: Path) -> list[Any]:
    """Sort key that orders image_2 before image_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def split_from_name(name: str) -> str:
    """Canonical split name ('train', 'val', 'test') found in a folder name, or ''."""
    lowered = name.lower()
    for key, split in (("train", "train"), ("valid", "val"), ("val", "val"), ("test", "test")):
        if key in lowered:
            return split
    return ""

"""Where a chip lies on the map: its pixel grid, its footprint in lon/lat, and polygons drawn on it.

A chip's grid is exact when the store's catalog carries the chip's CRS (`crs`) and its bounds in that CRS
(`x_min`, `y_min`, `x_max`, `y_max`), which the GeoTIFF-based readers and the synthetic generator record
(`workbench.data.sources.chip_georeference`). Without them the grid is approximate: a square of
chip size x pixel size metres around the chip's centre (lat, lon), laid out in lon/lat (EPSG:4326), so a
polygon drawn on the approximate footprint still lands on the pixels it was drawn over.

* `chip_grid`: the (CRS, affine transform, shape) of one catalog row, and whether it is exact;
* `chip_footprints`: the footprint of every row as a closed lon/lat ring (the chip's corners reprojected);
* `rasterize_drawn_polygon`: a lon/lat polygon (GeoJSON, e.g. from the map's draw control) burnt onto a chip's
  grid as a 0/1 label, refused with a clear message when it misses the chip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

METRES_PER_DEGREE = 111_320.0
BOUNDS_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
LONLAT = "EPSG:4326"


class DrawnPolygonError(ValueError):
    """A drawn geometry cannot become a chip's corrected label; the message says why and what to do."""


@dataclass(frozen=True)
class ChipGrid:
    """A chip's pixel grid: CRS, affine transform (pixel -> CRS coordinates) and (height, width)."""

    crs: str
    transform: Any  # affine.Affine
    shape: tuple[int, int]
    exact: bool  # False: the approximate square around the chip's centre


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def has_georeference(row: Mapping[Any, Any]) -> bool:
    """True when a catalog row carries its chip's CRS and bounds (an exact footprint is possible)."""
    crs = row.get("crs")
    return isinstance(crs, str) and bool(crs) and all(_finite(row.get(c)) for c in BOUNDS_COLUMNS)


def chip_grid(row: Mapping[Any, Any], shape: tuple[int, int], pixel_size_m: float = 10.0) -> ChipGrid:
    """The pixel grid of one catalog row: exact from crs and bounds, else the square around (lat, lon)."""
    from affine import Affine

    height, width = int(shape[0]), int(shape[1])
    if has_georeference(row):
        x_min, y_min, x_max, y_max = (float(row[c]) for c in BOUNDS_COLUMNS)
        transform = Affine((x_max - x_min) / width, 0.0, x_min, 0.0, -(y_max - y_min) / height, y_max)
        return ChipGrid(str(row["crs"]), transform, (height, width), True)
    lat, lon = float(row["lat"]), float(row["lon"])
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise DrawnPolygonError(
            f"chip {row.get('chip_id', '')!r} has neither a CRS with bounds nor a lat/lon centre; it cannot be placed"
        )
    half_x, half_y = width * pixel_size_m / 2.0, height * pixel_size_m / 2.0
    dlat = half_y / METRES_PER_DEGREE
    dlon = half_x / (METRES_PER_DEGREE * max(math.cos(math.radians(lat)), 1e-6))
    transform = Affine(2 * dlon / width, 0.0, lon - dlon, 0.0, -2 * dlat / height, lat + dlat)
    return ChipGrid(LONLAT, transform, (height, width), False)


def _transformer(source: str, target: str, cache: dict[tuple[str, str], Any]) -> Any:
    from pyproj import Transformer

    key = (source, target)
    if key not in cache:
        cache[key] = Transformer.from_crs(source, target, always_xy=True)
    return cache[key]


def grid_footprint(grid: ChipGrid, cache: dict[tuple[str, str], Any] | None = None) -> list[tuple[float, float]]:
    """The chip's outer pixel corners (bottom-left, bottom-right, top-right, top-left, closed) in lon/lat."""
    height, width = grid.shape
    corners = [grid.transform @ (col, row) for col, row in ((0, height), (width, height), (width, 0), (0, 0))]
    if grid.crs != LONLAT:
        transformer = _transformer(grid.crs, LONLAT, {} if cache is None else cache)
        corners = [transformer.transform(x, y) for x, y in corners]
    ring = [(float(x), float(y)) for x, y in corners]
    return [*ring, ring[0]]


def chip_footprints(
    catalog: pd.DataFrame, chip_size: int, pixel_size_m: float = 10.0
) -> list[list[tuple[float, float]]]:
    """Footprint of each catalog row as a closed ring of (lon, lat) corners.

    Exact (the chip's corners in its own CRS, reprojected) where the row has crs and bounds; otherwise a
    square of chip_size x pixel_size_m metres around the chip's centre (see `footprint_note`); an empty
    ring where the row has neither (`is_placeable`).
    """
    cache: dict[tuple[str, str], Any] = {}
    return [
        grid_footprint(chip_grid(row, (chip_size, chip_size), pixel_size_m), cache) if is_placeable(row) else []
        for row in catalog.to_dict(orient="records")
    ]


def is_placeable(row: Mapping[Any, Any]) -> bool:
    """True when a catalog row can be drawn on a map: CRS and bounds, or a finite lat/lon centre.

    Chips of stores without coordinates (38-Cloud patches, Landslide4Sense HDF5) get an empty footprint
    and the maps leave them out; the ranking, figures and decisions work without them.
    """
    return has_georeference(row) or (_finite(row.get("lat")) and _finite(row.get("lon")))


def store_pixel_size(store: Any, default: float = 10.0) -> float:
    """The store's pixel size in metres (`pixel_size_m` in store.json), else `default`."""
    from workbench.data.store import read_store_meta

    value = read_store_meta(store).get("attrs", {}).get("pixel_size_m")
    return float(value) if _finite(value) and float(value) > 0 else default


def footprint_note(catalog: pd.DataFrame) -> str:
    """One line for a map legend: how many footprints are exact and how many approximate."""
    rows = catalog.to_dict(orient="records")
    exact = sum(has_georeference(row) for row in rows)
    unplaced = sum(not is_placeable(row) for row in rows)
    approximate = len(catalog) - exact - unplaced
    if unplaced:
        return (
            f"{unplaced} of {len(catalog)} chips carry no coordinates (neither CRS and bounds nor a centre) and "
            f"are not on the map; {exact} exact and {approximate} approximate footprints"
        )
    if approximate == 0:
        return f"footprints: all {exact} exact (chip CRS and bounds)"
    if exact == 0:
        return (
            f"footprints: all {approximate} approximate (a square around each chip's centre; "
            "the store records no CRS and bounds)"
        )
    return f"footprints: {exact} exact, {approximate} approximate (squares around the centre: no CRS and bounds)"


def _polygon_rings(geometry: Mapping[str, Any]) -> list[list[list[list[float]]]]:
    """Polygons (each a list of rings of [lon, lat]) of a GeoJSON Feature, Polygon or MultiPolygon."""
    if geometry.get("type") == "Feature":
        inner = geometry.get("geometry")
        if not isinstance(inner, Mapping):
            raise DrawnPolygonError("the drawn feature has no geometry; draw a polygon on the chip")
        geometry = inner
    kind = geometry.get("type")
    coordinates = geometry.get("coordinates")
    if kind == "Polygon":
        polygons = [coordinates] if isinstance(coordinates, (list, tuple)) else []
    elif kind == "MultiPolygon":
        polygons = list(coordinates) if isinstance(coordinates, (list, tuple)) else []
    else:
        raise DrawnPolygonError(
            f"a {kind or 'shapeless'} geometry cannot be a label; draw a polygon or a rectangle on the chip"
        )
    if not polygons or not all(polygons) or any(len(polygon[0]) < 4 for polygon in polygons):
        raise DrawnPolygonError("the drawn polygon has fewer than three corners; draw it again")
    return polygons  # type: ignore[return-value]


def rasterize_drawn_polygon(geometry: Mapping[str, Any], grid: ChipGrid, chip_id: str = "") -> np.ndarray:
    """Burn a lon/lat polygon (GeoJSON Feature, Polygon or MultiPolygon) onto a chip's grid as a 0/1 label.

    The polygon is reprojected to the chip's CRS and every pixel whose centre lies inside it becomes 1
    (rasterio's rule for `all_touched=False`). Raises `DrawnPolygonError` for a geometry that is not a
    polygon, one that lies outside the chip, or one too small to cover any pixel centre.
    """
    from rasterio.features import rasterize
    from shapely.geometry import MultiPolygon, Polygon, box
    from shapely.ops import transform as shapely_transform

    polygons = _polygon_rings(geometry)
    try:
        shape = MultiPolygon([Polygon(rings[0], rings[1:]) for rings in polygons])
    except (TypeError, ValueError, IndexError) as error:
        raise DrawnPolygonError(f"the drawn polygon cannot be read ({error}); draw it again") from None
    if grid.crs != LONLAT:
        transformer = _transformer(LONLAT, grid.crs, {})
        shape = shapely_transform(transformer.transform, shape)
    if not shape.is_valid:
        shape = shape.buffer(0)  # a self-crossing outline, as a quick hand draws it
    height, width = grid.shape
    left, top = grid.transform @ (0, 0)
    right, bottom = grid.transform @ (width, height)
    chip_box = box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    name = f"chip {chip_id!r}" if chip_id else "the chip"
    if not shape.intersects(chip_box):
        raise DrawnPolygonError(
            f"the drawn polygon lies outside {name}; draw it on the chip's footprint (the highlighted square)"
        )
    label = rasterize([(shape, 1)], out_shape=(height, width), transform=grid.transform, fill=0, dtype="uint8")
    if not label.any():
        raise DrawnPolygonError(
            f"the drawn polygon covers no pixel centre of {name}; draw it larger (pixels are "
            f"{abs(grid.transform.a):.3g} x {abs(grid.transform.e):.3g} {'degrees' if grid.crs == LONLAT else 'units'})"
        )
    return np.asarray(label, dtype=np.uint8)

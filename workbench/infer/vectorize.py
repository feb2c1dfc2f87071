"""From probabilities to a class mask and polygons with areas, block by block.

`probability_to_mask` thresholds (one channel) or takes the argmax (several) and marks nodata
with 255; `BlockPolygons` collects each block's polygons and merges the pieces cut by block seams;
`polygons_geojson` places them on the map and measures their areas in square metres.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio.features
from affine import Affine

MASK_NODATA = 255


def probability_to_mask(
    probs: np.ndarray, threshold: float, class_thresholds: Mapping[int, float] | None = None
) -> np.ndarray:
    """uint8 mask (H, W): prob > threshold for one channel, argmax for several; 255 where probs are NaN.

    With several channels, `class_thresholds` {class index: t} (a calibrated class of interest) gives a
    class every pixel whose probability of it reaches t, as `workbench.evaluate.calibration.predict_classes`.
    """
    nodata = ~np.isfinite(probs).all(axis=0)
    if probs.shape[0] == 1:
        mask = (np.nan_to_num(probs[0], nan=0.0) > threshold).astype(np.uint8)
    else:
        filled = np.nan_to_num(probs, nan=-1.0)
        mask = filled.argmax(axis=0).astype(np.uint8)
        for c, t in (class_thresholds or {}).items():
            mask[filled[c] >= float(t)] = c
    mask[nodata] = MASK_NODATA
    return mask


@dataclass
class BlockPolygons:
    """Pixel-space polygons of each block; pieces cut by block seams are merged at the end."""

    height: int
    width: int
    inner: list[tuple[Any, int]] = field(default_factory=list)
    seam: dict[int, list[Any]] = field(default_factory=dict)

    def _on_seam(self, polygon: Any, row0: int, col0: int, shape: tuple[int, ...]) -> bool:
        row1, col1 = row0 + shape[0], col0 + shape[1]
        minx, miny, maxx, maxy = polygon.bounds
        return (
            (row0 > 0 and miny <= row0)
            or (row1 < self.height and maxy >= row1)
            or (col0 > 0 and minx <= col0)
            or (col1 < self.width and maxx >= col1)
        )

    def add_block(self, mask: np.ndarray, row0: int, col0: int) -> None:
        from shapely.geometry import shape

        foreground = (mask != MASK_NODATA) & (mask > 0)
        if not foreground.any():
            return
        offset = Affine.translation(col0, row0)
        for geometry, value in rasterio.features.shapes(mask, mask=foreground, connectivity=4, transform=offset):
            polygon = shape(geometry)
            if self._on_seam(polygon, row0, col0, mask.shape):
                self.seam.setdefault(int(value), []).append(polygon)
            else:
                self.inner.append((polygon, int(value)))

    def merged(self) -> list[tuple[Any, int]]:
        from shapely import unary_union

        result = list(self.inner)
        for value, pieces in self.seam.items():
            union = unary_union(pieces)
            parts = getattr(union, "geoms", [union])
            result.extend((part, value) for part in parts if not part.is_empty)
        return result


def _area_m2(frame: Any) -> np.ndarray:
    """Polygon areas in square metres: in the raster CRS when projected, else in a local equal-area projection."""
    crs = frame.crs
    if crs.is_geographic:
        centre = frame.to_crs(4326).union_all().centroid
        laea = f"+proj=laea +lat_0={centre.y} +lon_0={centre.x} +datum=WGS84 +units=m"
        return np.asarray(frame.to_crs(laea).area, dtype=np.float64)
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return np.asarray(frame.area, dtype=np.float64) * factor**2


def polygons_geojson(
    polygons: list[tuple[Any, int]],
    transform: Affine,
    crs: Any,
    min_area_m2: float,
    class_names: Sequence[str] | None = None,
) -> tuple[str, int]:
    """GeoJSON (EPSG:4326) of pixel-space polygons placed with `transform`, with id, class and area_m2
    (and `class_name` when `class_names` are given: the name of each polygon's class id).

    Returns the GeoJSON text and the number of features kept (area >= min_area_m2).
    """
    import geopandas as gpd
    from shapely import affinity

    coefficients = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    geometries = [affinity.affine_transform(polygon, coefficients) for polygon, _ in polygons]
    frame = gpd.GeoDataFrame(
        {"class": [value for _, value in polygons]}, geometry=geometries, crs=crs.to_wkt() if crs else None
    )
    if class_names is not None:
        frame.insert(1, "class_name", [str(class_names[value]) for _, value in polygons])
    frame["area_m2"] = _area_m2(frame) if len(frame) else np.zeros(0)
    frame = frame[frame["area_m2"] >= min_area_m2].reset_index(drop=True)
    frame.insert(0, "id", np.arange(len(frame)))
    return str(frame.to_crs(4326).to_json(drop_id=True)), len(frame)

"""Chip footprints and drawn polygons: exact grids from the catalog's CRS and bounds, the fallback square,
and a polygon drawn in lon/lat burnt onto the chip's pixels (checked against pyproj and rasterio)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from affine import Affine

from workbench.review.geometry import (
    ChipGrid,
    DrawnPolygonError,
    chip_footprints,
    chip_grid,
    footprint_note,
    is_placeable,
    rasterize_drawn_polygon,
)

UTM = "EPSG:32643"  # the UTM zone of the demo's Tien Shan chips
X0, Y0 = 660_000.0, 4_770_000.0  # top-left corner of the test chip
PIXEL = 10.0
SIZE = 32


def _to_lonlat(points: list[tuple[float, float]], crs: str = UTM) -> list[list[float]]:
    from pyproj import Transformer

    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    return [list(to_lonlat.transform(x, y)) for x, y in points]


def _utm_grid() -> ChipGrid:
    row = {"chip_id": "c", "crs": UTM, "x_min": X0, "y_min": Y0 - SIZE * PIXEL, "x_max": X0 + SIZE * PIXEL, "y_max": Y0}
    return chip_grid(row, (SIZE, SIZE))


def _pixel_box(rows: tuple[int, int], cols: tuple[int, int]) -> dict:
    """A GeoJSON Feature (lon/lat) of the pixel block rows[0]:rows[1], cols[0]:cols[1] of the UTM test chip."""
    x_a, x_b = X0 + cols[0] * PIXEL, X0 + cols[1] * PIXEL
    y_a, y_b = Y0 - rows[0] * PIXEL, Y0 - rows[1] * PIXEL
    ring = _to_lonlat([(x_a, y_b), (x_b, y_b), (x_b, y_a), (x_a, y_a), (x_a, y_b)])
    return {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}


def test_exact_grid_from_crs_and_bounds() -> None:
    grid = _utm_grid()
    assert grid.exact and grid.crs == UTM and grid.shape == (SIZE, SIZE)
    assert grid.transform.almost_equals(Affine(PIXEL, 0, X0, 0, -PIXEL, Y0))


def test_drawn_square_becomes_exactly_its_pixels() -> None:
    label = rasterize_drawn_polygon(_pixel_box((4, 12), (8, 20)), _utm_grid(), "c")
    assert label.dtype == np.uint8 and label.shape == (SIZE, SIZE)
    assert int(label.sum()) == 8 * 12  # the square covers 8 rows x 12 columns of pixel centres
    assert label[4:12, 8:20].all()


def test_polygon_partly_outside_is_clipped_to_the_chip() -> None:
    label = rasterize_drawn_polygon(_pixel_box((-5, 3), (28, 40)), _utm_grid(), "c")
    assert int(label.sum()) == 3 * 4 and label[0:3, 28:32].all()


def test_polygon_outside_the_chip_or_not_a_polygon_is_refused() -> None:
    with pytest.raises(DrawnPolygonError, match="lies outside chip 'c'; draw it on the chip's footprint"):
        rasterize_drawn_polygon(_pixel_box((4, 12), (200, 220)), _utm_grid(), "c")
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [77.0, 43.0]}}
    with pytest.raises(DrawnPolygonError, match="a Point geometry cannot be a label"):
        rasterize_drawn_polygon(point, _utm_grid(), "c")
    sliver = _pixel_box((4.1, 4.3), (8.1, 8.3))  # inside one pixel, away from its centre
    with pytest.raises(DrawnPolygonError, match="covers no pixel centre"):
        rasterize_drawn_polygon(sliver, _utm_grid(), "c")


def test_fallback_square_around_the_centre_and_polygons_on_it() -> None:
    catalog = pd.DataFrame({"chip_id": ["a"], "lat": [60.0], "lon": [10.0]})
    grid = chip_grid(catalog.iloc[0].to_dict(), (SIZE, SIZE), PIXEL)
    assert not grid.exact and grid.crs == "EPSG:4326"
    (ring,) = chip_footprints(catalog, SIZE, PIXEL)
    half_lat = SIZE * PIXEL / 2 / 111_320.0
    half_lon = half_lat / np.cos(np.radians(60.0))
    np.testing.assert_allclose(ring[0], (10.0 - half_lon, 60.0 - half_lat))
    np.testing.assert_allclose(ring[2], (10.0 + half_lon, 60.0 + half_lat))
    assert "approximate" in footprint_note(catalog)
    west_half = [[ring[0][0], ring[0][1]], [10.0, ring[0][1]], [10.0, ring[2][1]], [ring[0][0], ring[2][1]]]
    polygon = {"type": "Polygon", "coordinates": [[*west_half, west_half[0]]]}
    label = rasterize_drawn_polygon(polygon, grid, "a")
    assert int(label.sum()) == SIZE * SIZE // 2 and label[:, : SIZE // 2].all()


def _write_geotiff(path: Path, crs: str, transform: Affine, size: int = 64) -> Path:
    rasterio = pytest.importorskip("rasterio")
    data = np.random.default_rng(0).uniform(0, 1, (2, size, size)).astype(np.float32)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 2, "dtype": "float32"}
    with rasterio.open(path, "w", crs=crs, transform=transform, **profile) as dst:
        dst.write(data)
    return path


def test_geotiff_chips_record_crs_and_bounds_and_footprints_match_rasterio(tmp_path: Path) -> None:
    from rasterio.warp import transform as warp_transform
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds

    from workbench.data.sources.geotiff import read_geotiff

    transform = Affine(PIXEL, 0, X0, 0, -PIXEL, Y0)
    image = _write_geotiff(tmp_path / "scene.tif", UTM, transform)
    chips = list(read_geotiff(image, chip_size=32).chips)
    assert len(chips) == 4
    catalog = pd.DataFrame([{"chip_id": c.chip_id, "lat": c.lat, "lon": c.lon, **c.extra} for c in chips])
    assert set(catalog["crs"]) == {UTM}
    assert footprint_note(catalog) == "footprints: all 4 exact (chip CRS and bounds)"
    rings = chip_footprints(catalog, 32)
    for (_, row), ring in zip(catalog.iterrows(), rings, strict=True):
        left, bottom, right, top = window_bounds(Window(row["col"], row["row"], 32, 32), transform)
        assert (row["x_min"], row["y_min"], row["x_max"], row["y_max"]) == pytest.approx((left, bottom, right, top))
        lons, lats = warp_transform(UTM, "EPSG:4326", [left, right, right, left], [bottom, bottom, top, top])
        np.testing.assert_allclose(np.array(ring[:4]), np.column_stack([lons, lats]), atol=1e-9)
        assert ring[0] == ring[-1]
        centre = np.mean(np.array(ring[:4]), axis=0)
        np.testing.assert_allclose(centre, (row["lon"], row["lat"]), atol=1e-6)


def test_synthetic_chips_carry_a_utm_grid_centred_on_the_chip() -> None:
    from pyproj import Geod

    from workbench.data.synthetic import iter_synthetic_chips
    from workbench.params import SyntheticConfig

    cfg = SyntheticConfig(n_chips=8, chip_size=16, regions=["tien_shan"], years=[2021])
    chips = list(islice(iter_synthetic_chips(cfg), 2))
    catalog = pd.DataFrame([{"chip_id": c.chip_id, "lat": c.lat, "lon": c.lon, **c.extra} for c in chips])
    for (_, row), ring in zip(catalog.iterrows(), chip_footprints(catalog, 16), strict=True):
        zone = int((row["lon"] + 180) // 6) + 1
        assert row["crs"] == f"EPSG:{32600 + zone}"
        corners = np.array(ring[:4])
        np.testing.assert_allclose(corners.mean(axis=0), (row["lon"], row["lat"]), atol=1e-6)
        _, _, bottom_edge = Geod(ellps="WGS84").inv(*corners[0], *corners[1])
        assert bottom_edge == pytest.approx(16 * 10.0, rel=2e-3)  # UTM scale factor within 0.1 %


def test_fix_takes_the_drawn_polygon_and_refuses_one_outside_the_chip(tmp_path: Path) -> None:
    """The review session burns the last drawn polygon onto the chip's grid; a bad one is refused, nothing written."""
    from workbench.data.ledger import Ledger
    from workbench.review.widget import ReviewSession

    ledger = Ledger(tmp_path / "decisions.jsonl", ["c", "d"], (SIZE, SIZE), "store")
    table = pd.DataFrame({"chip_id": ["c", "d"], "score": [0.9, 0.1], "rank": [1, 2]})
    grid = _utm_grid()
    model = np.ones((SIZE, SIZE), np.uint8)
    session = ReviewSession(
        table,
        ledger,
        model_mask=lambda chip_id: model,
        polygon_label=lambda chip_id, geometry: rasterize_drawn_polygon(geometry, grid, chip_id),
    )
    session.draw(_pixel_box((4, 12), (200, 220)))
    assert not session.decide("fix") and "lies outside chip 'c'" in session.message
    assert not session.pending and ledger.line_count() == 0  # refused before anything was queued
    session.draw(_pixel_box((4, 12), (8, 20)))
    assert session.decide("fix", reviewer="ana")
    fixed = ledger.corrected_label("c")
    assert int(fixed.sum()) == 96 and fixed[4:12, 8:20].all()
    assert session.drawn is None and session.chip_id == "c"
    session.next()
    assert session.decide("fix")  # nothing drawn on this chip: the model's mask
    np.testing.assert_array_equal(ledger.corrected_label("d"), model)


def test_widget_draw_control_feeds_the_fix(tmp_path: Path) -> None:
    pytest.importorskip("ipyleaflet")
    from workbench.data.ledger import Ledger
    from workbench.review.widget import ReviewSession, ReviewWidget

    ledger = Ledger(tmp_path / "decisions.jsonl", ["c"], (SIZE, SIZE), "store")
    catalog = pd.DataFrame(
        {"chip_id": ["c"], "score": [0.9], "rank": [1], "lat": [43.0], "lon": [77.0], "crs": [UTM],
         "x_min": [X0], "y_min": [Y0 - SIZE * PIXEL], "x_max": [X0 + SIZE * PIXEL], "y_max": [Y0]}
    )  # fmt: skip
    session = ReviewSession(
        catalog,
        ledger,
        polygon_label=lambda chip_id, geometry: rasterize_drawn_polygon(geometry, _utm_grid(), chip_id),
    )
    widget = ReviewWidget(session, chip_footprints(catalog, SIZE), legend=footprint_note(catalog))
    assert "exact" in widget.legend.value
    widget._drawn(None, "created", _pixel_box((0, 2), (0, 3)))
    assert "drawn polygon" in widget.status.value
    widget.buttons["fix"].click()
    assert int(ledger.corrected_label("c").sum()) == 6


def test_chips_without_coordinates_are_left_off_the_maps_and_the_legend_says_how_many():
    from workbench.review.maps import review_map_html

    table = pd.DataFrame(
        {
            "chip_id": ["placed", "patch_7"],
            "lat": [43.0, np.nan],
            "lon": [77.0, np.nan],
            "score": [0.9, 0.4],
            "rank": [1, 2],
        }
    )
    rings = chip_footprints(table, 16, 10.0)
    assert len(rings[0]) == 5 and rings[1] == []
    assert [is_placeable(row) for row in table.to_dict(orient="records")] == [True, False]
    note = footprint_note(table)
    assert note.startswith("1 of 2 chips carry no coordinates")
    page = review_map_html(table, rings, {}, {}, title="t", footprint_note=note)
    assert page.count('class="chip"') == 1 and 'data-chip="placed"' in page and "patch_7" not in page.split("<g")[1]

"""The review map shows the chip under review: zoom levels computed by hand, the map following the ranking."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from test_review_loop import SIZE, make_store

from workbench.data.ledger import Ledger
from workbench.data.store import read_catalog
from workbench.review.maps import chip_footprints, fit_zoom

WORLD_LAT = 85.05112878  # the web-Mercator world is square: +-85.05° is its top and bottom edge


def test_fit_zoom_against_hand_computed_levels() -> None:
    # the whole world is one 256 px tile at zoom 0, four at zoom 1
    assert fit_zoom(-WORLD_LAT, -180, WORLD_LAT, 180, 256, 256) == 0
    assert fit_zoom(-WORLD_LAT, -180, WORLD_LAT, 180, 512, 512) == 1
    # one degree of longitude at the equator: 256 * 2**z / 360 px, 182 px at zoom 8, 364 px at zoom 9
    assert fit_zoom(-0.001, 10.0, 0.001, 11.0, 256, 256) == 8
    assert fit_zoom(-0.001, 10.0, 0.001, 11.0, 400, 256) == 9
    # 0.01° of latitude at 60° N spans 0.02° of Mercator "longitude" (1 / cos 60°): 0.02 / 360 * 256 * 2**z px
    assert fit_zoom(60.0, 10.0, 60.01, 10.0001, 256, 256) == math.floor(math.log2(360 / 0.02))  # 14
    assert fit_zoom(60.0, 10.0, 60.0, 10.0, 256, 256) == 18  # a point: the closest zoom


def test_review_map_follows_the_chip_under_review(tmp_path: Path) -> None:
    pytest.importorskip("ipyleaflet")
    from workbench.review.widget import CONTEXT, MAP_SIZE_PX, ReviewSession, ReviewWidget

    store = make_store(tmp_path / "store")
    catalog = read_catalog(store)
    table = catalog.assign(score=np.linspace(1, 0, len(catalog)), rank=np.arange(1, len(catalog) + 1))
    footprints = chip_footprints(table, SIZE)

    def panels(chip_id: str) -> Figure:
        fig = Figure(figsize=(4, 1))
        fig.add_subplot().set_title(chip_id)
        return fig

    widget = ReviewWidget(ReviewSession(table, Ledger.for_store(store)), footprints, panels=panels)
    for chip in (0, 1):
        lons, lats = [p[0] for p in footprints[chip]], [p[1] for p in footprints[chip]]
        assert widget.map.center == pytest.approx([(min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2])
        half_lat, half_lon = (max(lats) - min(lats)) * CONTEXT / 2, (max(lons) - min(lons)) * CONTEXT / 2
        centre_lat, centre_lon = widget.map.center
        expected = fit_zoom(
            centre_lat - half_lat, centre_lon - half_lon, centre_lat + half_lat, centre_lon + half_lon,
            MAP_SIZE_PX, MAP_SIZE_PX,
        )  # fmt: skip
        assert widget.map.zoom == expected
        # a 16 px chip of 10 m pixels (160 m) at that zoom spans about 1 / CONTEXT of the map
        metres_per_px = 156_543.03 * math.cos(math.radians(centre_lat)) / 2**expected
        assert MAP_SIZE_PX / (2 * CONTEXT) < 160 / metres_per_px <= MAP_SIZE_PX / CONTEXT
        widget.next_button.click()


def test_panels_figure_is_shown_as_a_png_not_its_repr() -> None:
    pytest.importorskip("IPython")
    from PIL import Image as PILImage

    from workbench.review.widget import as_image

    fig = Figure(figsize=(8, 2))
    fig.add_subplot().plot([0, 1])
    image = as_image(fig, width=500)
    assert image.format == "png" and image.width == 500
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert PILImage.open(io.BytesIO(image.data)).size == (800, 200)  # 8 x 2 inches at 100 dpi
    text = "no figure for this chip"
    assert as_image(text, width=500) is text

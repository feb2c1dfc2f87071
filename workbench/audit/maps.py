"""Interactive maps of chip centres by split, for the data audit.

`split_map` builds the map with folium (static HTML, no kernel needed; `save_map_html` writes it) or
leafmap (an ipyleaflet widget for JupyterLab). folium, leafmap and ipyleaflet are imported only inside the
functions that build a map, so importing this module needs none of them.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.audit.figures import split_colour
from workbench.audit.stats import AuditInputError
from workbench.figures import SPLIT_COLOURS


def _map_points(catalog: pd.DataFrame) -> pd.DataFrame:
    missing = [column for column in ("lat", "lon", "split") if column not in catalog.columns]
    if missing:
        raise AuditInputError(f"catalog has no column(s) {missing}; a map needs lat, lon and split")
    points = catalog[np.isfinite(catalog["lat"].astype(float)) & np.isfinite(catalog["lon"].astype(float))]
    if not len(points):
        raise AuditInputError("no chip has finite lat/lon; cannot draw a map")
    return points


def _tooltip(row: Mapping[Any, Any]) -> str:
    parts = [str(row.get("chip_id", "")), str(row.get("split", ""))]
    if "region" in row:
        parts.append(f"{row['region']} {row.get('year', '')}".strip())
    if "positive_fraction" in row:
        parts.append(f"positive {float(row['positive_fraction']):.2%}")
    return " · ".join(part for part in parts if part)


def _safe_tooltip(text: str) -> Any:
    """A folium tooltip whose text is HTML-escaped and handed to JavaScript as a JSON string literal.

    folium's own Tooltip pastes its text into a JavaScript template literal, where a backtick or
    `${` in a chip id or region name (they come from file names) would run as code.
    """
    from branca.element import MacroElement
    from jinja2 import Template

    class SafeTooltip(MacroElement):  # type: ignore[misc]
        _template = Template(
            """
            {% macro script(this, kwargs) %}
                {{ this._parent.get_name() }}.bindTooltip({{ this.markup|tojson }}, {"sticky": true});
            {% endmacro %}
            """
        )

        def __init__(self, markup: str) -> None:
            super().__init__()
            self._name = "Tooltip"
            self.markup = markup

    return SafeTooltip(f"<div>{html.escape(text)}</div>")


def split_map(catalog: pd.DataFrame, backend: str = "folium", basemap: bool = True) -> Any:
    """Interactive map of chip centres coloured by split, one toggleable layer per split.

    backend "folium" returns a `folium.Map` (static HTML, no kernel needed: `save_map_html`) with
    Leaflet inlined, so the saved file renders offline; "leafmap" returns a `leafmap.Map` (ipyleaflet
    widget for JupyterLab). With `basemap` an OpenStreetMap layer is added (in the folium map as a layer
    that is off until ticked, so an offline report requests no tiles); the points show either way.
    """
    points = _map_points(catalog)
    centre = (float(points["lat"].mean()), float(points["lon"].mean()))
    bounds = [
        [float(points["lat"].min()), float(points["lon"].min())],
        [float(points["lat"].max()), float(points["lon"].max())],
    ]
    splits = [name for name in SPLIT_COLOURS if name in set(points["split"])] + sorted(
        set(points["split"].astype(str)) - set(SPLIT_COLOURS)
    )
    colours = {name: split_colour(name, position) for position, name in enumerate(splits)}
    if backend == "folium":
        return _folium_map(points, centre, bounds, colours, basemap)
    if backend == "leafmap":
        return _leafmap_map(points, centre, bounds, colours, basemap)
    raise ValueError(f"map backend must be 'folium' or 'leafmap', got {backend!r}")


LEAFLET_ASSETS = Path(__file__).resolve().parent / "assets" / "leaflet"


def _offline_assets(fmap: Any) -> None:
    """Inline the vendored Leaflet script and style into the map's page instead of folium's CDN links.

    The points, layers, tooltips and layer control need Leaflet only (no jQuery, Bootstrap or icon fonts),
    so a saved map renders from a file on a machine without internet access.
    """
    import folium

    fmap.default_js = []
    fmap.default_css = []
    script = (LEAFLET_ASSETS / "leaflet.js").read_text(encoding="utf-8")
    style = (LEAFLET_ASSETS / "leaflet.css").read_text(encoding="utf-8")
    fmap.get_root().header.add_child(folium.Element(f"<style>{style}</style>\n<script>{script}</script>"), index=0)


def _folium_map(
    points: pd.DataFrame, centre: tuple[float, float], bounds: list[list[float]], colours: dict[str, str], basemap: bool
) -> Any:
    import folium

    fmap = folium.Map(location=centre, zoom_start=8, tiles=None)
    _offline_assets(fmap)
    if basemap:  # off until ticked in the layer control: no tile is requested from an offline report
        folium.TileLayer("OpenStreetMap", name="OpenStreetMap (needs internet)", overlay=True, show=False).add_to(fmap)
    for name, colour in colours.items():
        layer = folium.FeatureGroup(name=f"{name} ({int((points['split'] == name).sum())})")
        for row in points[points["split"] == name].to_dict(orient="records"):
            folium.CircleMarker(
                location=(float(row["lat"]), float(row["lon"])),
                radius=4,
                color=colour,
                fill=True,
                fill_opacity=0.8,
                weight=1,
            ).add_child(_safe_tooltip(_tooltip(row))).add_to(layer)
        layer.add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)
    fmap.fit_bounds(bounds)
    return fmap


def _leafmap_map(
    points: pd.DataFrame, centre: tuple[float, float], bounds: list[list[float]], colours: dict[str, str], basemap: bool
) -> Any:
    import ipyleaflet
    import leafmap

    lmap = leafmap.Map(center=centre, zoom=8)
    if not basemap:
        lmap.clear_layers()
    for name, colour in colours.items():
        markers = [
            ipyleaflet.CircleMarker(
                location=(float(row["lat"]), float(row["lon"])),
                radius=4,
                color=colour,
                fill_color=colour,
                fill_opacity=0.8,
                weight=1,
                title=_tooltip(row),
            )
            for row in points[points["split"] == name].to_dict(orient="records")
        ]
        lmap.add_layer(ipyleaflet.LayerGroup(layers=markers, name=f"{name} ({len(markers)})"))
    lmap.add_legend(title="split", legend_dict=colours)
    lmap.fit_bounds(bounds)
    return lmap


def save_map_html(fmap: Any, path: str | Path) -> Path:
    """Write a folium map as a standalone HTML file, atomically."""
    from workbench.io import write_text_atomic

    path = Path(path)
    if path.suffix.lower() != ".html":
        raise ValueError(f"{path}: maps are written as HTML; use a .html file name")
    return write_text_atomic(path, fmap.get_root().render())

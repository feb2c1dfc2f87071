"""What the review map draws, without any map library: chip footprints, label-noise images, a standalone HTML map.

* `chip_footprints` (from `workbench.review.geometry`): each chip's footprint as a lon/lat polygon, exact
  from the catalog's `crs` and bounds (`x_min`, `y_min`, `x_max`, `y_max` in that CRS) where the store
  records them, otherwise a square around the chip's centre (the map legend says which);
* `noise_image`: the label-noise layer of one chip, an RGBA image where label and prediction disagree
  (missed pixels, labelled but not predicted, in orange; extra pixels, predicted but not labelled, in
  magenta), and `png_data_url` to inline it;
* `score_colour`: the colour of a score on the ranking's scale;
* `fit_zoom`: the web-map zoom level at which given bounds fill a map of a given size in pixels;
* `review_map_html`: one self-contained HTML file (inline SVG, CSS and a few lines of script, no CDN or
  network) with the footprints coloured by score, hover titles with chip id and score, the noise images
  as a layer, layer check boxes that toggle, and a side panel that shows a clicked chip's figure.

The interactive map of notebook 04 (`workbench.review.widget`) draws the same footprints and images.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from workbench.review.geometry import chip_footprints

__all__ = ["chip_footprints", "noise_image", "png_data_url", "review_map_html", "score_colour"]

MISSED_RGBA = (255, 140, 0, 200)  # labelled, not predicted
EXTRA_RGBA = (220, 0, 220, 200)  # predicted, not labelled


def noise_image(label: np.ndarray, prob: np.ndarray, valid: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(H, W, 4) uint8 RGBA: missed pixels orange, extra pixels magenta, everything else transparent."""
    label = np.asarray(label)
    valid = np.asarray(valid, dtype=bool)
    positive = valid & (label > 0) & (label != 255)
    predicted = valid & (np.nan_to_num(np.asarray(prob, dtype=np.float64)) >= threshold) & (label != 255)
    out = np.zeros((*label.shape, 4), dtype=np.uint8)
    out[positive & ~predicted] = MISSED_RGBA
    out[predicted & ~positive] = EXTRA_RGBA
    return out


def png_data_url(rgba: np.ndarray) -> str:
    """A PNG `data:` URL of an RGBA (or RGB) uint8 image, for maps that must work offline."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgba, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def score_colour(score: float, low: float, high: float) -> str:
    """Hex colour of `score` on a yellow (low) to red (high) scale between `low` and `high`."""
    if not math.isfinite(score):
        return "#888888"
    t = 0.0 if high <= low else min(max((score - low) / (high - low), 0.0), 1.0)
    red, green, blue = 255, round(230 * (1 - t) + 20 * t), round(80 * (1 - t))
    return f"#{red:02x}{green:02x}{blue:02x}"


def fit_zoom(
    south: float, west: float, north: float, east: float, width_px: int, height_px: int, max_zoom: int = 18
) -> int:
    """The largest web-Mercator zoom level (256 px tiles) at which the bounds fit a `width_px` x `height_px` map.

    Computed here rather than left to the map (ipyleaflet's `fit_bounds` waits for the browser to report
    the map's bounds, and does nothing for a map not yet shown).
    """

    def mercator_y(lat: float) -> float:  # 0 at the north edge of the world, 1 at the south edge
        lat = min(max(lat, -85.05112878), 85.05112878)
        return 0.5 - math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) / (2 * math.pi)

    span_x = abs(east - west) / 360.0
    span_y = abs(mercator_y(south) - mercator_y(north))
    zooms = [math.log2(size / (256.0 * span)) for size, span in ((width_px, span_x), (height_px, span_y)) if span > 0]
    if not zooms:
        return max_zoom
    return int(min(max(math.floor(min(zooms) + 1e-6), 0), max_zoom))  # 1e-6: exact fits stay exact


def review_map_html(
    table: pd.DataFrame,
    footprints: list[list[tuple[float, float]]],
    overlays: Mapping[str, str] | None = None,
    figures: Mapping[str, str] | None = None,
    title: str = "Label-noise review",
    width: int = 900,
    height: int = 640,
    footprint_note: str = "",
) -> str:
    """A standalone HTML review map (no network): footprints coloured by score, noise layer, side panel.

    `table` is the ranking (chip_id, score, rank, ...), aligned with `footprints`; `overlays` maps chip ids
    to PNG data URLs of their noise images and `figures` to data URLs of their four-panel figures;
    `footprint_note` (see `workbench.review.geometry.footprint_note`) says in the legend whether the
    footprints are exact or approximate.
    """
    overlays = overlays or {}
    figures = figures or {}
    if len(table) != len(footprints):
        raise ValueError(f"{len(table)} table rows but {len(footprints)} footprints")
    points = np.array([point for ring in footprints for point in ring], dtype=np.float64).reshape(-1, 2)
    lon_min, lat_min = points.min(axis=0) if len(points) else (0.0, 0.0)
    lon_max, lat_max = points.max(axis=0) if len(points) else (1.0, 1.0)
    mid = math.cos(math.radians((lat_min + lat_max) / 2))
    span_x = max((lon_max - lon_min) * mid, 1e-9)
    span_y = max(lat_max - lat_min, 1e-9)
    scale = min((width - 20) / span_x, (height - 20) / span_y)

    def xy(lon: float, lat: float) -> tuple[float, float]:
        return 10 + (lon - lon_min) * mid * scale, height - 10 - (lat - lat_min) * scale

    scores = pd.to_numeric(table["score"], errors="coerce").to_numpy(dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    polygons, images = [], []
    for (_, row), ring in zip(table.iterrows(), footprints, strict=True):
        if not ring:  # a chip without coordinates is not drawn
            continue
        chip_id = html.escape(str(row["chip_id"]), quote=True)
        score = float(row["score"]) if pd.notna(row["score"]) else math.nan
        rank = int(row["rank"]) if "rank" in row and pd.notna(row["rank"]) else 0
        corners = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(*point) for point in ring))
        polygons.append(
            f'<polygon class="chip" data-chip="{chip_id}" data-rank="{rank}" data-score="{score:.4f}" '
            f'points="{corners}" fill="{score_colour(score, low, high)}">'
            f"<title>{chip_id} · rank {rank} · score {score:.3f}</title></polygon>"
        )
        if str(row["chip_id"]) in overlays:
            xs = [xy(*point)[0] for point in ring]
            ys = [xy(*point)[1] for point in ring]
            images.append(
                f'<image href="{overlays[str(row["chip_id"])]}" x="{min(xs):.1f}" y="{min(ys):.1f}" '
                f'width="{max(xs) - min(xs):.1f}" height="{max(ys) - min(ys):.1f}" preserveAspectRatio="none" '
                'style="image-rendering:pixelated"/>'
            )
    figure_json = "{" + ",".join(f'"{html.escape(k, quote=True)}":"{v}"' for k, v in figures.items()) + "}"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:sans-serif;margin:0;display:flex}} #map{{flex:0 0 auto}} #side{{padding:8px;max-width:700px}}
.chip{{stroke:#222;stroke-width:0.8;fill-opacity:0.75;cursor:pointer}} .chip:hover{{stroke-width:2.5}}
#side img{{max-width:100%}} .legend span{{display:inline-block;width:12px;height:12px;margin:0 4px}}
</style></head><body>
<div id="map"><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" style="background:#f4f4f0">
<g id="layer-footprints">{"".join(polygons)}</g>
<g id="layer-noise" style="pointer-events:none">{"".join(images)}</g></svg></div>
<div id="side"><h3>{html.escape(title)}</h3>
<label><input type="checkbox" checked onchange="toggle('layer-footprints',this.checked)">
chip footprints (by score)</label><br>
<label><input type="checkbox" checked onchange="toggle('layer-noise',this.checked)"> label noise</label>
<div class="legend"><span style="background:rgb{MISSED_RGBA[:3]}"></span>missed (label, no prediction)
<span style="background:rgb{EXTRA_RGBA[:3]}"></span>extra (prediction, no label);
footprints yellow (low score) to red (high)<br>{html.escape(footprint_note)}</div>
<div id="chip">Click a chip to see its panels.</div></div>
<script>
var figures = {figure_json};
function toggle(id, on) {{ document.getElementById(id).style.display = on ? '' : 'none'; }}
document.querySelectorAll('.chip').forEach(function(p) {{
  p.addEventListener('click', function() {{
    var id = p.getAttribute('data-chip');
    var text = '<h4>' + id + ' · rank ' + p.getAttribute('data-rank') +
      ' · score ' + p.getAttribute('data-score') + '</h4>';
    var figure = figures[id] ? '<img src="' + figures[id] + '">' : '(no figure)';
    document.getElementById('chip').innerHTML = text + figure;
  }});
}});
</script></body></html>
"""

"""The review map of notebook 04: a leafmap (ipyleaflet) map with decision buttons over the ranked chips.

The only review module that imports ipywidgets, ipyleaflet and leafmap (and only when a widget is built).

* `ReviewSession` is the logic without any widget: the ranking, the current chip, next / previous, and
  `decide`, which writes one line to the store's ledger (`workbench.data.ledger.Ledger`) and reports an
  error instead of losing the decision: a decision that could not be written stays pending and is
  written by the next successful `decide` or `retry`. "fix" takes the last polygon drawn on the chip
  (`draw`, burnt onto the chip's grid by `workbench.review.geometry.rasterize_drawn_polygon`) as the
  corrected label, or the model's mask of the chip (from `model_mask`) when none is drawn.
* `ReviewWidget` shows it: chip footprints coloured by score (hover: chip id and score; click: select the
  chip and show its panels under the map), the chip's label-noise image as an image overlay from an
  inline PNG (works offline), check boxes that add and remove the layers, next / previous buttons,
  keep / drop / fix / unsure buttons, a note and the reviewer's name, and a draw control (polygon and
  rectangle) whose last shape becomes the corrected label of a "fix".
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from workbench.data.ledger import DECISIONS, Ledger, LedgerError

MAP_SIZE_PX = 560  # the map is square; its zoom levels are computed for this size
PANELS_WIDTH_PX = 1000  # the chip's four-panel figure under the map (narrower outputs scale it down)
CONTEXT = 5.0  # the map shows this many chip widths around the chip under review


def as_image(panel: Any, width: int) -> Any:
    """A matplotlib Figure as an inline PNG image `width` pixels wide; anything else unchanged.

    The workbench's figures are plain `Figure` objects, which IPython would show as their repr
    (``<Figure size ... with 4 Axes>``) inside a widget's output area.
    """
    from matplotlib.figure import Figure

    if not isinstance(panel, Figure):
        return panel
    from IPython.display import Image

    buffer = io.BytesIO()
    panel.savefig(buffer, format="png", dpi=100)
    return Image(data=buffer.getvalue(), format="png", width=width)


@dataclass
class Pending:
    """A decision not yet in the ledger (the last write failed)."""

    chip_id: str
    decision: str
    note: str
    reviewer: str
    corrected: np.ndarray | None = None


@dataclass
class ReviewSession:
    """Walk through the ranking and record decisions in a ledger (no widgets involved)."""

    table: pd.DataFrame  # the ranking: chip_id, score, rank, ...
    ledger: Ledger
    model_mask: Callable[[str], np.ndarray] | None = None  # chip id -> the model's 0/1 mask, for "fix"
    polygon_label: Callable[[str, Mapping[str, Any]], np.ndarray] | None = None  # (chip id, GeoJSON) -> 0/1 label
    position: int = 0
    drawn: Mapping[str, Any] | None = None  # the last polygon drawn on the current chip (GeoJSON, lon/lat)
    pending: list[Pending] = field(default_factory=list)
    message: str = ""

    def __post_init__(self) -> None:
        self.table = self.table.sort_values("rank", kind="stable").reset_index(drop=True)
        if self.table.empty:
            raise ValueError("the ranking is empty; there is nothing to review")

    @property
    def chip_id(self) -> str:
        """The chip under review."""
        return str(self.table["chip_id"].iloc[self.position])

    def row(self) -> pd.Series:
        """The ranking row of the chip under review."""
        return self.table.iloc[self.position]

    def next(self) -> str:
        """Move to the next chip of the ranking (stays at the last)."""
        self.position = min(self.position + 1, len(self.table) - 1)
        self.drawn = None
        return self.chip_id

    def previous(self) -> str:
        """Move to the previous chip of the ranking (stays at the first)."""
        self.position = max(self.position - 1, 0)
        self.drawn = None
        return self.chip_id

    def select(self, chip_id: str) -> str:
        """Jump to a chip of the ranking (e.g. clicked on the map)."""
        matches = np.flatnonzero(self.table["chip_id"].astype(str).to_numpy() == str(chip_id))
        if matches.size == 0:
            raise KeyError(f"chip {chip_id!r} is not in the ranking")
        if int(matches[0]) != self.position:
            self.drawn = None
        self.position = int(matches[0])
        return self.chip_id

    def draw(self, geometry: Mapping[str, Any] | None) -> None:
        """Remember the last polygon drawn on the map (None forgets it); a "fix" then takes it as the label."""
        self.drawn = geometry
        self.message = "a 'fix' now takes the drawn polygon" if geometry else ""

    def corrected_label(self) -> np.ndarray | None:
        """The corrected label a "fix" of the current chip records: the drawn polygon, else the model's mask.

        Returns None (with `message` saying why) when neither can be had.
        """
        from workbench.review.geometry import DrawnPolygonError

        if self.drawn is not None:
            if self.polygon_label is None:
                self.message = "this review cannot place drawn polygons on the chip"
                return None
            try:
                return (np.asarray(self.polygon_label(self.chip_id, self.drawn)) > 0).astype(np.uint8)
            except DrawnPolygonError as error:
                self.message = f"not saved: {error}"
                return None
        if self.model_mask is None:
            self.message = "'fix' needs the model's mask or a drawn polygon, and this review has neither"
            return None
        return (np.asarray(self.model_mask(self.chip_id)) > 0).astype(np.uint8)

    def decide(self, decision: str, note: str = "", reviewer: str = "") -> bool:
        """Record `decision` for the current chip; True when it (and any pending one) is in the ledger.

        On an error (ledger read-only, locked, of another store, ...) the decision stays in `pending`,
        `message` says why, and nothing is lost.
        """
        if decision not in DECISIONS:
            self.message = f"unknown decision {decision!r}; use one of {DECISIONS}"
            return False
        corrected = None
        if decision == "fix":
            corrected = self.corrected_label()
            if corrected is None:
                return False
        self.pending.append(Pending(self.chip_id, decision, note, reviewer, corrected))
        self.drawn = None
        return self.retry()

    def retry(self) -> bool:
        """Write the pending decisions in order; stop at the first error (kept pending, `message` set)."""
        while self.pending:
            item = self.pending[0]
            try:
                self.ledger.record(item.chip_id, item.decision, item.note, item.reviewer, item.corrected)
            except (LedgerError, OSError) as error:
                self.message = f"not saved, still pending ({len(self.pending)}): {error}"
                return False
            self.pending.pop(0)
            self.message = f"saved: {item.chip_id} → {item.decision}"
        return True


def footprint_geojson(table: pd.DataFrame, footprints: list[list[tuple[float, float]]]) -> dict[str, Any]:
    """GeoJSON FeatureCollection of the chip footprints with chip_id, rank, score and a fill colour."""
    from workbench.review.maps import score_colour

    scores = pd.to_numeric(table["score"], errors="coerce")
    low, high = float(scores.min()), float(scores.max())
    features = []
    for (_, row), ring in zip(table.iterrows(), footprints, strict=True):
        if not ring:  # a chip without coordinates is not drawn
            continue
        score = float(row["score"])
        features.append(
            {
                "type": "Feature",
                "properties": {
                    "chip_id": str(row["chip_id"]),
                    "rank": int(row["rank"]),
                    "score": score,
                    "style": {
                        "color": "#222222",
                        "weight": 1,
                        "fillColor": score_colour(score, low, high),
                        "fillOpacity": 0.6,
                    },
                },
                "geometry": {"type": "Polygon", "coordinates": [[list(point) for point in ring]]},
            }
        )
    return {"type": "FeatureCollection", "features": features}


class ReviewWidget:
    """The review map with its controls; `widget` is what the notebook displays."""

    def __init__(
        self,
        session: ReviewSession,
        footprints: list[list[tuple[float, float]]],
        overlays: Mapping[str, str] | None = None,
        panels: Callable[[str], Any] | None = None,
        basemap: bool = False,
        overlay_for: Callable[[str], str] | None = None,
        legend: str = "",
    ) -> None:
        import ipyleaflet
        import ipywidgets as widgets
        import leafmap.leafmap as leafmap

        self.session = session
        self.footprints = {str(c): ring for c, ring in zip(session.table["chip_id"], footprints, strict=True)}
        self.overlays = dict(overlays or {})
        self.panels = panels
        self.overlay_for = overlay_for  # chip id -> PNG data URL of its noise image, computed when first shown
        from workbench.review.maps import fit_zoom

        points = np.array([p for ring in footprints for p in ring], dtype=np.float64).reshape(-1, 2)
        if len(points) == 0:  # no chip carries coordinates: an empty world map, the panels still work
            points = np.array([[-10.0, -10.0], [10.0, 10.0]])
        south, west, north, east = points[:, 1].min(), points[:, 0].min(), points[:, 1].max(), points[:, 0].max()
        zoom = fit_zoom(south, west, north, east, MAP_SIZE_PX, MAP_SIZE_PX)
        self.map = leafmap.Map(
            center=((south + north) / 2, (west + east) / 2),
            zoom=zoom,
            draw_control=False,
            layout={"width": f"{MAP_SIZE_PX}px", "height": f"{MAP_SIZE_PX}px"},
        )
        if not basemap:  # offline: no tile requests
            self.map.layers = tuple(x for x in self.map.layers if not isinstance(x, ipyleaflet.TileLayer))
        self.footprint_layer = ipyleaflet.GeoJSON(
            data=footprint_geojson(session.table, footprints),
            hover_style={"weight": 3, "fillOpacity": 0.85},
            name="chip footprints (score)",
        )
        self.footprint_layer.on_hover(self._hover)
        self.footprint_layer.on_click(self._click)
        self.noise_layer = ipyleaflet.ImageOverlay(url="", bounds=((0, 0), (0, 0)), name="label noise")
        self.map.add(self.footprint_layer)
        self.map.add(self.noise_layer)
        shape = {"shapeOptions": {"color": "#00a0ff", "fillOpacity": 0.3}}
        self.draw_control = ipyleaflet.DrawControl(polygon=shape, rectangle=shape, polyline={}, circlemarker={})
        self.draw_control.on_draw(self._drawn)
        self.map.add(self.draw_control)
        self.hover = widgets.HTML("hover a chip")
        self.legend = widgets.HTML(
            "label noise: <span style='color:#ff8c00'>■</span> missed, <span style='color:#dc00dc'>■</span> extra; "
            f"draw a polygon or rectangle on the chip, then 'fix' takes it as the label<br>{legend}"
        )
        self.status = widgets.HTML("")
        self.title = widgets.HTML("")
        self.side = widgets.Output()
        self.show_footprints = widgets.Checkbox(value=True, description="chip footprints")
        self.show_noise = widgets.Checkbox(value=True, description="label noise")
        self.show_footprints.observe(lambda change: self._toggle(self.footprint_layer, change["new"]), "value")
        self.show_noise.observe(lambda change: self._toggle(self.noise_layer, change["new"]), "value")
        self.note = widgets.Text(placeholder="note", description="note")
        self.reviewer = widgets.Text(placeholder="your name", description="reviewer")
        self.buttons = {name: widgets.Button(description=name) for name in DECISIONS}
        for name, button in self.buttons.items():
            button.on_click(lambda _, decision=name: self.decide(decision))
        self.previous_button = widgets.Button(description="◀ previous")
        self.next_button = widgets.Button(description="next ▶")
        self.previous_button.on_click(lambda _: self.show(self.session.previous()))
        self.next_button.on_click(lambda _: self.show(self.session.next()))
        controls = widgets.VBox(
            [
                self.title,
                widgets.HBox([self.previous_button, self.next_button]),
                widgets.HBox(list(self.buttons.values())),
                self.note,
                self.reviewer,
                self.status,
                widgets.HBox([self.show_footprints, self.show_noise]),
                self.hover,
                self.legend,
            ]
        )
        # the four panels go under the map: beside it they would be shrunk until their titles are unreadable
        self.widget = widgets.VBox([widgets.HBox([self.map, controls]), self.side])
        # stable CSS classes, so a page (or a browser test) can find the parts without relying on layout
        self.widget.add_class("workbench-review-map")
        parts = ((self.title, "title"), (self.status, "status"), (self.note, "note"), (self.side, "panels"))
        for part, name in parts:
            part.add_class(f"workbench-review-{name}")
        self.reviewer.add_class("workbench-review-reviewer")
        for name, button in self.buttons.items():
            button.add_class(f"workbench-review-decision-{name}")
        self.show(self.session.chip_id)

    def _toggle(self, layer: Any, visible: bool) -> None:
        """Show or hide a layer by adding it to or removing it from the map (ipyleaflet has no visibility flag)."""
        others = [existing for existing in self.map.layers if existing is not layer]
        self.map.layers = (*others, layer) if visible else tuple(others)

    def _drawn(self, target: Any = None, action: str = "", geo_json: Mapping[str, Any] | None = None, **_: Any) -> None:
        """The draw control's callback: the last polygon drawn (or edited) is the one a "fix" takes."""
        if action in ("created", "edited") and geo_json:
            self.session.draw(geo_json)
        elif action == "deleted":
            self.session.draw(None)
        self.status.value = self.session.message

    def _hover(self, feature: Mapping[str, Any] | None = None, **_: Any) -> None:
        if feature:
            props = feature["properties"]
            self.hover.value = f"{props['chip_id']} · rank {props['rank']} · score {props['score']:.3f}"

    def _click(self, feature: Mapping[str, Any] | None = None, **_: Any) -> None:
        if feature:
            self.show(self.session.select(feature["properties"]["chip_id"]))

    def show(self, chip_id: str) -> None:
        """Make `chip_id` the current chip: title, map centred on it with its noise overlay, panels under the map."""
        row = self.session.row()
        self.title.value = f"<b>{chip_id}</b> · rank {int(row['rank'])} · score {float(row['score']):.3f}"
        ring = self.footprints[chip_id]
        lons, lats = [p[0] for p in ring], [p[1] for p in ring]
        if ring:
            self.zoom_to(min(lats), min(lons), max(lats), max(lons))
        if ring and chip_id not in self.overlays and self.overlay_for is not None:
            self.overlays[chip_id] = self.overlay_for(chip_id)
        if not ring:
            self.noise_layer.url = ""
            self.title.value += " · no coordinates: not on the map, its panels are below"
        elif chip_id in self.overlays:
            self.noise_layer.url = self.overlays[chip_id]
            self.noise_layer.bounds = ((min(lats), min(lons)), (max(lats), max(lons)))
        if self.panels is not None:
            self.side.clear_output()
            with self.side:
                from IPython.display import display

                display(as_image(self.panels(chip_id), width=PANELS_WIDTH_PX))

    def zoom_to(self, south: float, west: float, north: float, east: float) -> None:
        """Centre the map on a chip's bounds, zoomed so that the chip and some of its surroundings show.

        Chip footprints are far smaller than the area a store covers: at the zoom that shows every chip, a
        chip and its label-noise image are a few pixels, so the map follows the chip under review.
        """
        from workbench.review.maps import fit_zoom

        lat, lon = (south + north) / 2, (west + east) / 2
        half_lat, half_lon = (north - south) * CONTEXT / 2, (east - west) * CONTEXT / 2
        zoom = fit_zoom(lat - half_lat, lon - half_lon, lat + half_lat, lon + half_lon, MAP_SIZE_PX, MAP_SIZE_PX)
        self.map.center = (lat, lon)
        self.map.zoom = zoom

    def decide(self, decision: str) -> bool:
        """A decision button: record it for the current chip, show the outcome, move on when saved."""
        saved = self.session.decide(decision, self.note.value, self.reviewer.value)
        colour = "green" if saved else "red"
        self.status.value = f'<span style="color:{colour}">{self.session.message}</span>'
        if saved:
            self.note.value = ""
            self.draw_control.clear()
            self.show(self.session.next())
        return saved


def review_widget(params: Any, run_dir: Any, ranking: pd.DataFrame, basemap: bool = False) -> ReviewWidget:
    """The review map of a run (notebook 04): its ranking, the store's ledger, the model's masks and panels."""
    from pathlib import Path

    from workbench.arrays import sigmoid
    from workbench.data.dataset import ChipDataset
    from workbench.data.prepare import load_prepared
    from workbench.figures import chip_title, four_panel
    from workbench.infer.chips import load_predictions
    from workbench.io import read_json
    from workbench.review.geometry import chip_grid, footprint_note, rasterize_drawn_polygon, store_pixel_size
    from workbench.review.maps import chip_footprints, noise_image, png_data_url
    from workbench.run import RunLayout

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    calibration = read_json(layout.calibration) if layout.calibration.is_file() else {}
    temperature = float(calibration.get("temperature", 1.0))
    threshold = float(calibration.get("threshold", params.evaluate.threshold))
    table = ranking.sort_values("rank", kind="stable").reset_index(drop=True)
    by_id = table.set_index("chip_id")
    cache: dict[str, Any] = {}

    def chip(chip_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        row: dict[str, Any] = dict(by_id.loc[chip_id])
        source = str(row.get("scored_by", row["split"]))
        if source not in cache:
            cache[source] = load_predictions(run_dir, source)
        predictions = cache[source]
        index = int(row["store_index"])
        position = int(np.flatnonzero(predictions["chip_index"].values == index)[0])
        image, label, valid = ChipDataset(prepared.store, [index], bands=prepared.bands).read_raw(0)
        logit = np.asarray(predictions["logit"][position].values, dtype=np.float32)
        return image, label, valid, sigmoid(logit / temperature, np.float32)

    def model_mask(chip_id: str) -> np.ndarray:
        _, _, valid, prob = chip(chip_id)
        return (valid & (prob >= threshold)).astype(np.uint8)

    def overlay(chip_id: str) -> str:
        _, label, valid, prob = chip(chip_id)
        return png_data_url(noise_image(label, prob, valid, threshold))

    def panels(chip_id: str) -> Any:
        image, label, valid, prob = chip(chip_id)
        row: dict[str, Any] = dict(by_id.loc[chip_id])
        region, year = str(row.get("region", "")), int(row.get("year", 0))
        title = chip_title(chip_id, region, year, float(row["lat"]), float(row["lon"]), float(row["score"]))
        return four_panel(
            image, prepared.bands, label, prob, valid, title,
            water_threshold=params.review.water_index_threshold, threshold=threshold,
            green=params.data.green_band, swir=params.data.swir_band, rgb=params.data.rgb_bands,
            index=params.review.index, nir=params.review.nir_band,
        )  # fmt: skip

    ledger = Ledger.for_store(prepared.store, params.review.ledger)
    pixel_size = store_pixel_size(prepared.store)

    def polygon_label(chip_id: str, geometry: Mapping[str, Any]) -> np.ndarray:
        grid = chip_grid(dict(by_id.loc[chip_id]), ledger.chip_shape, pixel_size)
        return rasterize_drawn_polygon(geometry, grid, chip_id)

    session = ReviewSession(table, ledger, model_mask=model_mask, polygon_label=polygon_label)
    size = int(ChipDataset(prepared.store, [0], bands=prepared.bands).read_raw(0)[1].shape[-1])
    return ReviewWidget(
        session,
        chip_footprints(table, size, pixel_size),
        panels=panels,
        basemap=basemap,
        overlay_for=overlay,
        legend=footprint_note(table),
    )

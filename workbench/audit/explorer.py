"""Chip explorer of the data audit: band composites of single chips and an ipywidgets browser over a store.

`composite` turns any bands of a chip into a display image (true colour, SWIR, SAR, DEM `hillshade`, any
three bands), `chip_figure` shows composite, label (`label_rgb`) and valid mask side by side, and
`chip_explorer` / `ChipExplorer` let a reader pick split, chip and composite in JupyterLab. This is the
only module of the workbench that imports ipywidgets; everything else in `workbench.audit` runs headless.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from workbench.arrays import IGNORE_INDEX, sigmoid
from workbench.audit.stats import ALL, AuditInputError
from workbench.data.store import ChipReader
from workbench.figures import INVALID_GREY, SPLIT_COLOURS, WATER_BLUE, rgb_composite
from workbench.run import RunLayout

IGNORE_RGB = (0.78, 0.78, 0.78)
BACKGROUND_RGB = (0.11, 0.11, 0.11)

CUSTOM = "any 3 bands"
DEFAULT_COMPOSITES: dict[str, tuple[str, ...]] = {
    "true colour (B04/B03/B02)": ("B04", "B03", "B02"),
    "false colour (B08/B04/B03)": ("B08", "B04", "B03"),
    "SWIR (B12/B8A/B04)": ("B12", "B8A", "B04"),
    "SAR (VV/VH/VV-VH dB ratio)": ("VV", "VH", "VV-VH"),
    "DEM hillshade": ("hillshade(DEM)",),
}


@dataclass
class RunOverlay:
    """A finished run's view of the chips: calibrated probabilities of each predicted chip, review scores.

    `probabilities[store position]` is the chip's probability map (temperature-scaled with the run's
    calibration when it has one); `scores` and `ranks` come from the review's `diagnostics/review.parquet`.
    """

    probabilities: dict[int, np.ndarray]
    threshold: float
    scores: dict[str, float]
    ranks: dict[str, int]
    source: Path

    def probability(self, position: int) -> np.ndarray | None:
        return self.probabilities.get(int(position))

    def describe(self, chip_id: str) -> str:
        """The chip's review score and rank, or '' when the review did not score it."""
        if chip_id not in self.scores:
            return ""
        return f"review score {self.scores[chip_id]:.3f} (rank {self.ranks.get(chip_id, 0)} of {len(self.scores)})"


def run_overlay(run_dir: str | Path) -> RunOverlay | None:
    """The predictions and review scores of a run directory (None when it has no predictions yet).

    Every `predictions/<name>.zarr` is read (out-of-fold train predictions win over in-fold ones), so a
    chip of any predicted split shows the model's probability map.
    """
    import xarray as xr

    layout = RunLayout(Path(run_dir))
    stores = sorted(layout.predictions_dir.glob("*.zarr")) if layout.predictions_dir.is_dir() else []
    if not stores:
        return None
    calibration = json.loads(layout.calibration.read_text()) if layout.calibration.is_file() else {}
    temperature = float(calibration.get("temperature", 1.0))
    threshold = float(calibration.get("threshold", 0.5))
    probabilities: dict[int, np.ndarray] = {}
    for path in sorted(stores, key=lambda p: p.stem.endswith("_oof")):  # out-of-fold last: they win
        with xr.open_zarr(path, consolidated=False) as predictions:
            logits = np.asarray(predictions["logit"].values, dtype=np.float32)
            for position, logit in zip(np.asarray(predictions["chip_index"].values), logits):
                probabilities[int(position)] = sigmoid(logit / temperature, np.float32)
    scores: dict[str, float] = {}
    ranks: dict[str, int] = {}
    review = layout.diagnostic("review.parquet")
    if review.is_file():
        table = pd.read_parquet(review, columns=["chip_id", "score", "rank"])
        scores = {str(k): float(v) for k, v in zip(table["chip_id"], table["score"])}
        ranks = {str(k): int(v) for k, v in zip(table["chip_id"], table["rank"])}
    return RunOverlay(probabilities, threshold, scores, ranks, layout.root)


class CompositeError(ValueError):
    """A composite names bands the image does not have, or is not 1 or 3 channels."""


def hillshade(dem: np.ndarray, pixel_size: float = 10.0, azimuth: float = 315.0, altitude: float = 45.0) -> np.ndarray:
    """Illumination in [0, 1] of a north-up DEM (rows run south) lit from `azimuth` (° clockwise from north).

    The cosine between the surface normal and the direction of the sun at `altitude` degrees; 0 in shadow.
    A flat surface gets sin(altitude).
    """
    dem = np.asarray(dem, dtype=np.float64)
    d_row, d_col = np.gradient(dem, pixel_size)
    d_east, d_north = d_col, -d_row
    normal = np.stack([-d_east, -d_north, np.ones_like(dem)])
    normal /= np.linalg.norm(normal, axis=0, keepdims=True)
    az, alt = math.radians(azimuth), math.radians(altitude)
    sun = np.array([math.sin(az) * math.cos(alt), math.cos(az) * math.cos(alt), math.sin(alt)])
    shade: np.ndarray = np.clip(np.tensordot(sun, normal, axes=1), 0.0, 1.0)
    return shade


def composite_channel(image: np.ndarray, band_names: Sequence[str], expression: str) -> np.ndarray:
    """One display channel: a band name, 'A/B' (ratio), 'A-B' (difference, the ratio of bands in dB) or
    'hillshade(A)'."""
    names = list(band_names)

    def band(name: str) -> np.ndarray:
        if name not in names:
            raise CompositeError(f"composite channel {expression!r} needs band {name!r}; the bands are {names}")
        return np.asarray(image[names.index(name)], dtype=np.float64)

    if expression in names:
        return band(expression)
    if expression.startswith("hillshade(") and expression.endswith(")"):
        return hillshade(band(expression[len("hillshade(") : -1]))
    for operator in ("/", "-"):
        if operator in expression:
            first, second = (part.strip() for part in expression.split(operator, 1))
            a, b = band(first), band(second)
            if operator == "-":
                return a - b
            out = np.zeros_like(a)
            np.divide(a, b, out=out, where=b != 0)
            return out
    return band(expression)


def composite(
    image: np.ndarray,
    band_names: Sequence[str],
    bands: Sequence[str],
    valid: np.ndarray | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> np.ndarray:
    """(H, W, 3) display image in [0, 1] of one chip; pixels outside `valid` are 0.

    `bands` holds three channel expressions (see `composite_channel`), each stretched between its
    `percentiles` over valid pixels, or one expression shown in grey (a hillshade unstretched, since it
    already is an illumination in [0, 1]).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != len(band_names):
        raise CompositeError(f"image has shape {image.shape}, expected ({len(band_names)}, height, width)")
    if len(bands) not in (1, 3):
        raise CompositeError(f"a composite has 1 or 3 channels, got {list(bands)}")
    mask = np.ones(image.shape[1:], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    channels = np.stack([composite_channel(image, band_names, expression) for expression in bands])
    if len(bands) == 1 and bands[0].startswith("hillshade("):
        grey = np.where(mask, channels[0], 0.0)
        return np.repeat(grey[..., None], 3, axis=-1)
    names = [f"channel {position}" for position in range(len(bands))]
    red, green, blue = (names[0], names[1], names[2]) if len(names) == 3 else (names[0],) * 3
    return rgb_composite(channels, names, (red, green, blue), percentiles, valid=mask)


def available_composites(
    band_names: Sequence[str], composites: Mapping[str, Sequence[str]] | None = None
) -> dict[str, tuple[str, ...]]:
    """The composites whose channels can all be computed from these bands."""
    probe = np.ones((len(band_names), 3, 3))
    usable = {}
    for name, bands in (composites or DEFAULT_COMPOSITES).items():
        if len(bands) not in (1, 3):
            continue
        try:
            for expression in bands:
                composite_channel(probe, band_names, expression)
        except CompositeError:
            continue
        usable[name] = tuple(bands)
    return usable


def label_rgb(label: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W, 3) label display: positive light blue, background dark, ignore light grey, nodata grey."""
    label = np.asarray(label)
    valid = np.asarray(valid, dtype=bool)
    out = np.empty((*label.shape, 3))
    out[:] = BACKGROUND_RGB
    out[(label > 0) & (label != IGNORE_INDEX)] = to_rgb(WATER_BLUE)
    out[label == IGNORE_INDEX] = IGNORE_RGB
    out[~valid] = to_rgb(INVALID_GREY)
    return out


def chip_figure(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    valid: np.ndarray,
    bands: Sequence[str],
    title: str = "",
    probability: np.ndarray | None = None,
    threshold: float = 0.5,
) -> Figure:
    """Composite | label | valid mask of one chip; with `probability`, the model's prediction before the mask.

    The prediction panel shows the probability (0 dark to 1 yellow) with the label's outline on top and
    the share of pixels at or above `threshold` in its title.
    """
    valid = np.asarray(valid, dtype=bool)
    label = np.asarray(label)
    panels = 3 if probability is None else 4
    fig = Figure(figsize=(3.7 * panels, 3.9), layout="constrained")
    axes = list(fig.subplots(1, panels))
    ax_image, ax_label, ax_valid = axes[0], axes[1], axes[-1]
    ax_image.imshow(composite(image, band_names, bands, valid), interpolation="nearest")
    ax_image.set_title(" / ".join(bands))
    scored = valid & (label != IGNORE_INDEX)
    share = float(((label > 0) & scored).sum() / max(int(scored.sum()), 1))
    ax_label.imshow(label_rgb(label, valid), interpolation="nearest")
    ax_label.set_title(f"label: {share:.1%} positive")
    if probability is not None:
        ax_pred = axes[2]
        prob = np.where(valid, np.asarray(probability, dtype=np.float64), np.nan)
        ax_pred.imshow(prob, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        positive = (label > 0) & (label != IGNORE_INDEX)
        if positive.any() and not positive.all():
            ax_pred.contour(positive.astype(float), levels=[0.5], colors="white", linewidths=0.8)
        predicted = float(((prob >= threshold) & scored).sum() / max(int(scored.sum()), 1))
        ax_pred.set_title(f"prediction: {predicted:.1%} ≥ {threshold:.2f}")
    ax_valid.imshow(valid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_valid.set_title(f"valid: {valid.mean():.1%} (black = nodata)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """PNG bytes of a figure (for image widgets)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class ChipExplorer(widgets.VBox):  # type: ignore[misc]
    """Pick a split, a chip (dropdown or slider) and a band composite; shows composite, label and valid mask.

    With a `RunOverlay` (a run's predictions and review scores) the chip's predicted probability is drawn
    beside its label and the caption gives its review score and rank. The rendered PNG is in
    `self.image.value`; `self.figure()` returns the current figure.
    """

    def __init__(
        self,
        store: str | Path,
        catalog: pd.DataFrame,
        band_names: Sequence[str],
        composites: Mapping[str, Sequence[str]] | None = None,
        overlay: RunOverlay | None = None,
    ) -> None:
        self.overlay = overlay
        self.readers = {name: ChipReader(store, name) for name in ("image", "label", "valid")}
        if len(catalog) != len(self.readers["image"]):
            raise AuditInputError(
                f"catalog lists {len(catalog)} chips but store {store} holds {len(self.readers['image'])}"
            )
        self.catalog = catalog.reset_index(drop=True)
        self.band_names = [str(name) for name in band_names]
        self.composites = available_composites(self.band_names, composites)
        splits = [name for name in SPLIT_COLOURS if name in set(self.catalog.get("split", []))]
        self.split = widgets.Dropdown(options=[ALL, *splits], value=ALL, description="split")
        self.chip = widgets.Dropdown(options=[], description="chip")
        self.position = widgets.IntSlider(min=0, max=0, description="#", continuous_update=False)
        self.choice = widgets.Dropdown(options=[*self.composites, CUSTOM], description="composite")
        first = [self.band_names[min(i, len(self.band_names) - 1)] for i in range(3)]
        self.custom = [
            widgets.Dropdown(options=self.band_names, value=name, description=colour, layout={"width": "160px"})
            for colour, name in zip("RGB", first)
        ]
        self.caption = widgets.HTML()
        self.image = widgets.Image(format="png")
        super().__init__(
            [
                widgets.HBox([self.split, self.chip, self.position]),
                widgets.HBox([self.choice, *self.custom]),
                self.caption,
                self.image,
            ]
        )
        self._positions = {str(chip_id): position for position, chip_id in enumerate(self.catalog["chip_id"])}
        self._quiet = False
        self._update_chips()
        self.split.observe(lambda _: self._update_chips(), names="value")
        self.chip.observe(self._on_chip, names="value")
        self.position.observe(self._on_position, names="value")
        for control in (self.choice, *self.custom):
            control.observe(lambda _: self.render(), names="value")

    def _ids(self) -> list[str]:
        chosen = self.catalog if self.split.value == ALL else self.catalog[self.catalog["split"] == self.split.value]
        return [str(value) for value in chosen["chip_id"]]

    def _update_chips(self) -> None:
        """Refill the chip list after a split change, keeping the chip when it is still listed."""
        ids = self._ids()
        current = self.chip.value
        self._quiet = True
        try:
            self.chip.options = ids
            self.chip.value = current if current in ids else (ids[0] if ids else None)
            self.position.max = max(len(ids) - 1, 0)
            self.position.value = ids.index(self.chip.value) if ids else 0
        finally:
            self._quiet = False
        self.render()

    def _on_chip(self, change: Any) -> None:
        if self._quiet:
            return
        ids = self._ids()
        if change["new"] in ids:
            self._quiet = True
            try:
                self.position.value = ids.index(change["new"])
            finally:
                self._quiet = False
        self.render()

    def _on_position(self, change: Any) -> None:
        if self._quiet:
            return
        ids = self._ids()
        if 0 <= change["new"] < len(ids):
            self.chip.value = ids[change["new"]]

    def bands(self) -> tuple[str, ...]:
        """Channel expressions of the selected composite."""
        if self.choice.value == CUSTOM:
            return tuple(str(control.value) for control in self.custom)
        return self.composites[self.choice.value]

    def figure(self) -> Figure | None:
        """Figure of the selected chip and composite (None when no chip is selected)."""
        if self.chip.value is None:
            return None
        position = self._positions[str(self.chip.value)]
        row = self.catalog.iloc[position]
        image = self.readers["image"].read(position)
        label = self.readers["label"].read(position)
        valid = self.readers["valid"].read(position).astype(bool)
        title = " · ".join(
            str(part) for part in (row["chip_id"], row.get("split", ""), row.get("region", ""), row.get("year", ""))
        )
        probability = self.overlay.probability(position) if self.overlay is not None else None
        threshold = self.overlay.threshold if self.overlay is not None else 0.5
        return chip_figure(image, self.band_names, label, valid, self.bands(), title, probability, threshold)

    def render(self) -> None:
        """Redraw the image for the current selection."""
        if self._quiet:
            return
        for control in self.custom:
            control.disabled = self.choice.value != CUSTOM
        fig = self.figure()
        if fig is None:
            self.caption.value = "<i>no chip in this split</i>"
            self.image.value = b""
            return
        chip = html.escape(str(self.chip.value))  # chip ids come from file names: never markup
        caption = f"<b>{chip}</b> ({self.position.value + 1} of {len(self.chip.options)})"
        if self.overlay is not None:
            position = self._positions[str(self.chip.value)]
            has_prediction = self.overlay.probability(position) is not None
            details = [
                html.escape(self.overlay.describe(str(self.chip.value))),
                "" if has_prediction else "not predicted",
            ]
            caption += "".join(f" · {part}" for part in details if part)
        self.caption.value = caption
        self.image.value = figure_png(fig)


def chip_explorer(
    store: str | Path,
    catalog: pd.DataFrame,
    band_names: Sequence[str],
    composites: Mapping[str, Sequence[str]] | None = None,
    run: str | Path | None = None,
) -> ChipExplorer:
    """An ipywidgets chip explorer over a store (`catalog` in store order, `band_names` all store bands).

    With `run` (a run directory that has predictions), the run's prediction and review score are shown too.
    """
    overlay = run_overlay(run) if run is not None else None
    return ChipExplorer(store, catalog, band_names, composites, overlay)

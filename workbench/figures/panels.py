"""The label-noise four-panel of one chip (S2 RGB | MNDWI | label | prediction), its title and file name."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure

from workbench.arrays import IGNORE_INDEX
from workbench.figures.base import IGNORE_GREY, INVALID_GREY, WATER_BLUE, FigureInputError, rgb_composite

_MASK_CMAP = ListedColormap(["#1b1b1b", WATER_BLUE])


def _overlay(ax: Axes, where: np.ndarray, colour: str) -> None:
    """Paint `where` pixels in a flat colour on top of what the axes show."""
    layer = np.zeros((*where.shape, 4))
    layer[where] = to_rgba(colour)
    ax.imshow(layer, interpolation="nearest")


def _percent(numerator: np.ndarray, scored: np.ndarray) -> float:
    total = int(np.count_nonzero(scored))
    return int(np.count_nonzero(numerator & scored)) / total if total else 0.0


def chip_title(chip_id: str, region: str, year: int, lat: float, lon: float, score: float | None = None) -> str:
    """Main title of a four-panel: chip id, region, year, coordinates and (optionally) the suspicion score."""
    where = f"{abs(lat):.4f}°{'N' if lat >= 0 else 'S'} {abs(lon):.4f}°{'E' if lon >= 0 else 'W'}"
    parts = [str(chip_id), f"{region} {year}".strip(), where]
    if score is not None and math.isfinite(score):
        parts.append(f"score {score:.3f}")
    return " · ".join(part for part in parts if part)


def four_panel(
    image: np.ndarray,
    band_names: Sequence[str],
    label: np.ndarray,
    prediction_prob: np.ndarray | None,
    valid: np.ndarray,
    title: str,
    water_threshold: float = 0.0,
    threshold: float = 0.5,
    green: str = "B03",
    swir: str = "B11",
    rgb: tuple[str, str, str] = ("B04", "B03", "B02"),
) -> Figure:
    """Sentinel-2 RGB | MNDWI (water light blue) | label | prediction at `threshold`, for auditing one chip.

    Fractions in the panel titles are over scored pixels (valid and labelled), as in the review table.
    Invalid pixels are grey; unlabelled (ignore) pixels light grey in the label panel.
    """
    from workbench.indices import mndwi

    image = np.asarray(image)
    label = np.asarray(label)
    valid = np.asarray(valid, dtype=bool)
    shape = image.shape[1:]
    planes = {"label": label, "valid": valid}
    if prediction_prob is not None:
        planes["prediction_prob"] = np.asarray(prediction_prob)
    for name, plane in planes.items():
        if plane.shape != shape:
            raise FigureInputError(f"{name} has shape {plane.shape}, expected {shape} like the image")
    index = np.asarray(mndwi(image, list(band_names), green=green, swir=swir), dtype=np.float64)
    scored = valid & (label != IGNORE_INDEX)
    water = scored & (index > water_threshold)
    positive = scored & (label > 0)

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax_rgb, ax_index, ax_label, ax_pred = fig.subplots(1, 4)
    ax_rgb.imshow(rgb_composite(image, band_names, rgb, valid=valid), interpolation="nearest")
    ax_rgb.set_title(f"S2 RGB ({'/'.join(rgb)})")

    ax_index.imshow(np.where(valid, index, 0.0), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    _overlay(ax_index, water, WATER_BLUE)
    ax_index.set_title(f"MNDWI > {water_threshold:g}: water {_percent(water, scored):.1%}")

    ax_label.imshow(positive.astype(np.uint8), cmap=_MASK_CMAP, vmin=0, vmax=1, interpolation="nearest")
    _overlay(ax_label, valid & (label == IGNORE_INDEX), IGNORE_GREY)
    ax_label.set_title(f"Label: {_percent(positive, scored):.1%}")

    if prediction_prob is None:
        ax_pred.imshow(np.zeros(shape), cmap=_MASK_CMAP, vmin=0, vmax=1)
        ax_pred.set_title("Prediction: none")
    else:
        predicted = valid & (np.nan_to_num(planes["prediction_prob"], nan=0.0) >= threshold)
        ax_pred.imshow(predicted.astype(np.uint8), cmap=_MASK_CMAP, vmin=0, vmax=1, interpolation="nearest")
        ax_pred.set_title(f"Prediction ≥ {threshold:g}: {_percent(predicted, scored):.1%}")

    for ax in (ax_rgb, ax_index, ax_label, ax_pred):
        _overlay(ax, ~valid, INVALID_GREY)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return fig


def _coordinate_token(value: float) -> str:
    text = f"{abs(value):.4f}".replace(".", "p")
    negative = value < 0 and round(abs(value), 4) != 0
    return ("m" if negative else "") + text


def four_panel_filename(year: int, lat: float, lon: float) -> str:
    """File name of a four-panel figure: label_noise_<year>_<lat>_<lon>.png, 4 decimals, '.' -> 'p', '-' -> 'm'."""
    return f"label_noise_{int(year)}_{_coordinate_token(lat)}_{_coordinate_token(lon)}.png"

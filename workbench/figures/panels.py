"""The label-noise four-panel of one chip (RGB | index or probability | label | prediction [| votes]).

Also its title and file name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure

from workbench.arrays import IGNORE_INDEX
from workbench.figures.base import IGNORE_GREY, INVALID_GREY, WATER_BLUE, FigureInputError, chip_planes, rgb_composite

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
    rgb: Sequence[str] = ("B04", "B03", "B02"),
    index: str = "mndwi",
    nir: str = "B08",
    votes: np.ndarray | None = None,
    n_annotators: int = 0,
) -> Figure:
    """RGB | index (or model probability) | label | prediction at `threshold` [| annotator votes], for one chip.

    `rgb` and the index (`index`: 'mndwi', 'ndwi', a band expression, or 'none') come from the recipe's
    parameters; band names resolve to their first time step (``B04`` -> ``B04_t0``). Without an index the
    second panel shows the model's probability. With a `votes` plane a fifth panel shows how many of the
    `n_annotators` annotators marked each pixel. Fractions in the panel titles are over scored pixels
    (valid and labelled), as in the review table. Invalid pixels are grey; unlabelled (ignore) pixels
    light grey in the label panel.
    """
    from workbench.data.agreement import index_label, index_plane
    from workbench.indices import BandNotFoundError, resolve_band

    image, planes = chip_planes(image, label, valid, prediction_prob=prediction_prob, votes=votes)
    label, valid = planes["label"], planes["valid"]
    shape = label.shape
    prediction_prob, votes = planes.get("prediction_prob"), planes.get("votes")
    names = [str(name) for name in band_names]
    try:
        rgb_names = tuple(resolve_band(names, name) for name in rgb)
        index_values = None if index == "none" else index_plane(image, names, index, green, swir, nir)
    except BandNotFoundError as error:
        raise FigureInputError(f"{error}; set data.rgb_bands / review.index to bands of this store") from None
    scored = valid & (label != IGNORE_INDEX)
    positive = scored & (label > 0)

    fig = Figure(figsize=(20 if votes is not None else 16, 4.8), layout="constrained")
    axes = list(fig.subplots(1, 5 if votes is not None else 4))
    ax_rgb, ax_index, ax_label, ax_pred = axes[:4]
    ax_rgb.imshow(rgb_composite(image, names, rgb_names, valid=valid), interpolation="nearest")  # type: ignore[arg-type]
    ax_rgb.set_title(f"RGB ({'/'.join(rgb_names)})")

    if index_values is not None:
        water = scored & (index_values > water_threshold)
        ax_index.imshow(np.where(valid, index_values, 0.0), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        _overlay(ax_index, water, WATER_BLUE)
        name = index_label(index, green, swir, nir).split(" (")[0]
        ax_index.set_title(f"{name} > {water_threshold:g}: {_percent(water, scored):.1%}")
    elif prediction_prob is not None:
        shown = np.where(valid, np.nan_to_num(planes["prediction_prob"], nan=0.0), 0.0)
        ax_index.imshow(shown, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax_index.set_title("Model probability")
    else:
        ax_index.imshow(np.zeros(shape), cmap=_MASK_CMAP, vmin=0, vmax=1)
        ax_index.set_title("No index, no model")

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

    if votes is not None:
        top = max(int(n_annotators), int(np.max(planes["votes"])) if planes["votes"].size else 1, 1)
        shown_votes = axes[4].imshow(planes["votes"], cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
        fig.colorbar(shown_votes, ax=axes[4], shrink=0.8)
        axes[4].set_title(f"Annotator votes (of {top})")

    for ax in axes:
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

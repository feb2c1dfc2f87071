"""Shared pieces of every figure: resolution, colours, the input error, atomic PNG output and the RGB composite.

Figures build a `matplotlib.figure.Figure` directly (no pyplot state, no GUI backend needed) where they
can, so they work on headless machines and inside notebooks alike; `save_figure` writes a PNG atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from workbench.io import write_bytes_atomic

DPI = 110
WATER_BLUE = "#8fd3ff"
INVALID_GREY = "#808080"
IGNORE_GREY = "#c8c8c8"
SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c", "buffer": "#9e9e9e"}


class FigureInputError(ValueError):
    """Arrays or files handed to a figure function do not have the expected shape or content."""


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Render `fig` as PNG and write it atomically to `path` (which must end in .png)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: figures are written as PNG; use a .png file name")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes_atomic(path, buffer.getvalue())


def _band_index(band_names: Sequence[str], name: str) -> int:
    names = list(band_names)
    if name not in names:
        raise FigureInputError(f"band {name!r} is not among the image bands {names}")
    return names.index(name)


def rgb_composite(
    image: np.ndarray,
    band_names: Sequence[str],
    rgb: tuple[str, str, str] = ("B04", "B03", "B02"),
    percentiles: tuple[float, float] = (2.0, 98.0),
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) float image in [0, 1]: each of the three bands stretched between its percentiles over valid pixels.

    Pixels outside `valid` (default: where all three bands are finite) are 0.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != len(band_names):
        raise FigureInputError(f"image has shape {image.shape}, expected ({len(band_names)}, height, width)")
    channels = np.stack([image[_band_index(band_names, name)].astype(np.float64) for name in rgb])
    usable = np.isfinite(channels).all(axis=0)
    if valid is not None:
        usable &= np.asarray(valid, dtype=bool)
    out = np.zeros((*channels.shape[1:], 3), dtype=np.float64)
    if not usable.any():
        return out
    for position, band in enumerate(channels):
        low, high = np.percentile(band[usable], percentiles)
        if high > low:
            out[..., position] = np.clip((band - low) / (high - low), 0.0, 1.0)
    out[~usable] = 0.0
    return out


def chip_planes(
    image: np.ndarray, label: np.ndarray, valid: np.ndarray, **optional: np.ndarray | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The image (bands, H, W) and its planes as arrays, each plane checked to be (H, W) like the image.

    `label` and `valid` are required (valid as bool); the `optional` planes given as None are left out.
    A plane of another shape is refused by name, so a figure never draws misaligned layers.
    """
    image = np.asarray(image)
    shape = image.shape[1:]
    planes = {"label": np.asarray(label), "valid": np.asarray(valid, dtype=bool)}
    planes.update({name: np.asarray(plane) for name, plane in optional.items() if plane is not None})
    for name, plane in planes.items():
        if plane.shape != shape:
            raise FigureInputError(f"{name} has shape {plane.shape}, expected {shape} like the image")
    return image, planes

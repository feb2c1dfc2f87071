"""Spectral indices computed from named bands, for numpy arrays and torch tensors alike.

Indices are normalised differences ``(a - b) / (a + b)`` of two bands. Following the CryoSentinel
label-noise audit, an index is 0 where ``a + b <= 0`` (nodata or empty pixels), so nodata never looks
like water. Bands are looked up by name along the band axis (``-3`` by default, which fits both
``(band, y, x)`` chips and ``(batch, band, y, x)`` batches).

Sentinel-2 conventions (L2A band names):

* MNDWI (Xu 2006) = (green B03 - SWIR1 B11) / (B03 + B11): water > 0, but snow and ice are high too.
* NDWI (McFeeters 1996) = (green B03 - NIR B08) / (B03 + B08).
* NDVI = (NIR B08 - red B04) / (B08 + B04): dense vegetation well above 0.5.
* NDSI = (green B03 - SWIR1 B11) / (B03 + B11): the same ratio as MNDWI, read as snow where bright.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


class BandNotFoundError(ValueError):
    """A requested band name is not among the image's bands."""


def normalized_difference(a: Array, b: Array) -> Array:
    """``(a - b) / (a + b)``, and 0 where ``a + b <= 0``; float32 unless the inputs are float64."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ta = torch.as_tensor(a)
        tb = torch.as_tensor(b)
        dtype = torch.float64 if torch.float64 in (ta.dtype, tb.dtype) else torch.float32
        ta, tb = ta.to(dtype), tb.to(dtype)
        denom = ta + tb
        positive = denom > 0
        safe = torch.where(positive, denom, torch.ones_like(denom))
        return torch.where(positive, (ta - tb) / safe, torch.zeros_like(denom))  # type: ignore[return-value]
    na = np.asarray(a)
    nb = np.asarray(b)
    dtype = np.float64 if np.float64 in (na.dtype, nb.dtype) else np.float32
    na, nb = na.astype(dtype, copy=False), nb.astype(dtype, copy=False)
    denom = na + nb
    out = np.zeros(np.broadcast_shapes(na.shape, nb.shape), dtype=dtype)
    np.divide(na - nb, denom, out=out, where=denom > 0)
    return out  # type: ignore[return-value]


def band_index(band_names: Sequence[str], name: str) -> int:
    """Position of `name` in `band_names`, with an error listing the available bands."""
    names = list(band_names)
    if name not in names:
        raise BandNotFoundError(f"band {name!r} is not among the image bands {names}")
    return names.index(name)


def select_band(image: Array, band_names: Sequence[str], name: str, axis: int = -3) -> Array:
    """One band of `image` by name, the band axis removed."""
    if image.ndim == 0 or image.shape[axis] != len(band_names):
        raise ValueError(
            f"image has shape {tuple(image.shape)} but {len(band_names)} band names were given for axis {axis}"
        )
    position = band_index(band_names, name)
    if isinstance(image, torch.Tensor):
        return image.select(axis, position)  # type: ignore[return-value]
    return np.take(image, position, axis=axis)  # type: ignore[return-value]


def band_ratio_index(image: Array, band_names: Sequence[str], first: str, second: str, axis: int = -3) -> Array:
    """Normalised difference of two named bands of `image`."""
    return normalized_difference(
        select_band(image, band_names, first, axis), select_band(image, band_names, second, axis)
    )


def mndwi(image: Array, band_names: Sequence[str], green: str = "B03", swir: str = "B11", axis: int = -3) -> Array:
    """Modified normalised difference water index (green - SWIR1) / (green + SWIR1)."""
    return band_ratio_index(image, band_names, green, swir, axis)


def ndwi(image: Array, band_names: Sequence[str], green: str = "B03", nir: str = "B08", axis: int = -3) -> Array:
    """McFeeters' normalised difference water index (green - NIR) / (green + NIR)."""
    return band_ratio_index(image, band_names, green, nir, axis)


def ndvi(image: Array, band_names: Sequence[str], nir: str = "B08", red: str = "B04", axis: int = -3) -> Array:
    """Normalised difference vegetation index (NIR - red) / (NIR + red)."""
    return band_ratio_index(image, band_names, nir, red, axis)


def ndsi(image: Array, band_names: Sequence[str], green: str = "B03", swir: str = "B11", axis: int = -3) -> Array:
    """Normalised difference snow index (green - SWIR1) / (green + SWIR1); numerically equal to MNDWI."""
    return band_ratio_index(image, band_names, green, swir, axis)


def water_mask(
    image: Array,
    band_names: Sequence[str],
    threshold: float = 0.0,
    green: str = "B03",
    swir: str = "B11",
    axis: int = -3,
) -> Array:
    """Boolean water mask ``MNDWI > threshold`` (CryoSentinel docs use 0, its code 0.3)."""
    return mndwi(image, band_names, green, swir, axis) > threshold  # type: ignore[return-value]

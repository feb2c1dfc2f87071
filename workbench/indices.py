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


def resolve_band(band_names: Sequence[str], name: str) -> str:
    """The band called `name`, or its first time step (`name_t0`, then any `name_t<k>`) in multi-temporal stacks.

    Recipes name bands once (``B04``) while stores of several time steps hold ``B04_t0`` .. ``B04_t3``.
    """
    names = [str(band) for band in band_names]
    if name in names:
        return name
    if f"{name}_t0" in names:
        return f"{name}_t0"
    steps = [band for band in names if band.startswith(f"{name}_t") and band[len(name) + 2 :].isdigit()]
    if steps:
        return steps[0]
    raise BandNotFoundError(f"band {name!r} (or {name}_t0) is not among the image bands {names}")


_EXPRESSION_NODES = (
    "Expression",
    "BinOp",
    "UnaryOp",
    "Name",
    "Load",
    "Constant",
    "Add",
    "Sub",
    "Mult",
    "Div",
    "USub",
    "UAdd",
)


def expression_bands(expression: str) -> list[str]:
    """Band names used by a band expression such as ``(B03 - B11) / (B03 + B11)``; rejects anything else.

    Allowed: band names, numbers, ``+ - * /``, unary minus and parentheses.
    """
    import ast

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"band expression {expression!r} is not valid: {error.msg}") from None
    names: list[str] = []
    for node in ast.walk(tree):
        kind = type(node).__name__
        if kind not in _EXPRESSION_NODES:
            raise ValueError(
                f"band expression {expression!r} uses {kind}; only band names, numbers, + - * / and parentheses"
            )
        if isinstance(node, ast.Constant) and not isinstance(node.value, int | float):
            raise ValueError(f"band expression {expression!r}: {node.value!r} is not a number")
        if isinstance(node, ast.Name) and node.id not in names:
            names.append(node.id)
    if not names:
        raise ValueError(f"band expression {expression!r} names no band")
    return names


def band_expression(image: np.ndarray, band_names: Sequence[str], expression: str) -> np.ndarray:
    """Evaluate a band expression (see `expression_bands`) on a (band, y, x) numpy image; division by 0 gives 0."""
    import ast

    image = np.asarray(image)
    tree = ast.parse(expression, mode="eval")
    expression_bands(expression)

    def value(node: ast.AST) -> np.ndarray | float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)  # type: ignore[arg-type]
        if isinstance(node, ast.Name):
            return image[band_index(band_names, resolve_band(band_names, node.id))].astype(np.float64)
        if isinstance(node, ast.UnaryOp):
            operand = value(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        assert isinstance(node, ast.BinOp)
        left, right = value(node.left), value(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        denominator = np.asarray(right, dtype=np.float64)
        out = np.zeros(np.broadcast_shapes(np.shape(left), denominator.shape), dtype=np.float64)
        np.divide(left, denominator, out=out, where=denominator != 0)
        return out

    result = np.asarray(value(tree), dtype=np.float64)
    return np.broadcast_to(result, image.shape[1:]).copy() if result.ndim < 2 else result

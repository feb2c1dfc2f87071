"""Nodata rules: which pixels of a multimodal chip hold no measurement, and how values are made finite.

The defaults reproduce the CryoSentinel recipe for Sentinel-2 L2A (uint16 reflectance x 10000),
Sentinel-1 backscatter (float dB) and a DEM (int16 metres):

* S2: a pixel is nodata when every band is 0, or when every band is saturated (16000) after clipping
  to [0, 16000]. The sanitised S2 is the clipped one.
* S1: a pixel is nodata when any band is NaN or +-Inf; sanitising replaces NaN by -25 dB, +Inf by 5 dB
  and -Inf by -30 dB.
* DEM: a pixel is nodata when the elevation is <= -32000 or >= 32000 (int16 fill values); sanitising
  clips to [-500, 9000] m.

A pixel is valid when no modality marks it nodata. Every array is (band, y, x); masks are (y, x) bool.
"""

from __future__ import annotations

import numpy as np

S2_CLIP = (0.0, 16000.0)
S2_ZERO = 0.0
S2_SATURATED = 16000.0
S1_NAN = -25.0
S1_POSINF = 5.0
S1_NEGINF = -30.0
DEM_NODATA_LOW = -32000.0
DEM_NODATA_HIGH = 32000.0
DEM_CLIP = (-500.0, 9000.0)


def _check_bands(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be (band, y, x), got shape {array.shape}")
    return array


def s2_invalid(
    s2: np.ndarray,
    zero: float = S2_ZERO,
    saturated: float | None = S2_SATURATED,
    clip: tuple[float, float] | None = S2_CLIP,
) -> np.ndarray:
    """Pixels where every S2 band equals `zero`, or every band equals `saturated` after clipping to `clip`.

    A non-finite value in any band also marks the pixel, so a NaN never reaches a valid pixel.
    """
    s2 = _check_bands(s2, "S2")
    clipped = np.clip(s2, *clip) if clip is not None else s2
    invalid = np.all(clipped == zero, axis=0) | ~np.all(np.isfinite(s2), axis=0)
    if saturated is not None:
        invalid |= np.all(clipped == saturated, axis=0)
    return np.asarray(invalid)


def sanitise_s2(s2: np.ndarray, clip: tuple[float, float] | None = S2_CLIP) -> np.ndarray:
    """S2 clipped to `clip` as float32, non-finite values set to 0."""
    s2 = _check_bands(s2, "S2").astype(np.float32)
    s2 = np.nan_to_num(s2, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(s2, *clip) if clip is not None else s2


def clean_s2(
    s2: np.ndarray,
    zero: float = S2_ZERO,
    saturated: float | None = S2_SATURATED,
    clip: tuple[float, float] | None = S2_CLIP,
) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, sanitised S2) under the S2 nodata rule."""
    return ~s2_invalid(s2, zero=zero, saturated=saturated, clip=clip), sanitise_s2(s2, clip=clip)


def s1_invalid(s1: np.ndarray) -> np.ndarray:
    """Pixels where any S1 band is NaN or infinite."""
    return np.asarray(~np.all(np.isfinite(_check_bands(s1, "S1")), axis=0))


def sanitise_s1(
    s1: np.ndarray, nan: float = S1_NAN, posinf: float = S1_POSINF, neginf: float = S1_NEGINF
) -> np.ndarray:
    """S1 as float32 with NaN, +Inf and -Inf replaced by fixed backscatter values (dB)."""
    s1 = _check_bands(s1, "S1").astype(np.float32)
    return np.nan_to_num(s1, nan=nan, posinf=posinf, neginf=neginf)


def clean_s1(
    s1: np.ndarray, nan: float = S1_NAN, posinf: float = S1_POSINF, neginf: float = S1_NEGINF
) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, sanitised S1) under the S1 nodata rule."""
    return ~s1_invalid(s1), sanitise_s1(s1, nan=nan, posinf=posinf, neginf=neginf)


def dem_invalid(dem: np.ndarray, low: float = DEM_NODATA_LOW, high: float = DEM_NODATA_HIGH) -> np.ndarray:
    """Pixels where the elevation is a fill value (<= `low` or >= `high`) or not finite."""
    dem = _check_bands(dem, "DEM")
    return np.asarray(np.any((dem <= low) | (dem >= high) | ~np.isfinite(dem), axis=0))


def sanitise_dem(dem: np.ndarray, clip: tuple[float, float] = DEM_CLIP) -> np.ndarray:
    """DEM as float32 clipped to a plausible elevation range; non-finite values become the lower bound."""
    dem = _check_bands(dem, "DEM").astype(np.float32)
    dem = np.nan_to_num(dem, nan=clip[0], posinf=clip[1], neginf=clip[0])
    return np.clip(dem, *clip)


def clean_dem(
    dem: np.ndarray,
    low: float = DEM_NODATA_LOW,
    high: float = DEM_NODATA_HIGH,
    clip: tuple[float, float] = DEM_CLIP,
) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, sanitised DEM) under the DEM nodata rule."""
    return ~dem_invalid(dem, low=low, high=high), sanitise_dem(dem, clip=clip)


def clean_finite(image: np.ndarray, fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, image) for sources without a modality rule: a pixel is nodata when any band is not finite."""
    image = _check_bands(image, "image").astype(np.float32)
    valid = np.all(np.isfinite(image), axis=0)
    return valid, np.nan_to_num(image, nan=fill, posinf=fill, neginf=fill)


def clean_cryosentinel(
    s2: np.ndarray,
    s1: np.ndarray,
    dem: np.ndarray,
    *,
    s2_zero: float = S2_ZERO,
    s2_saturated: float | None = S2_SATURATED,
    s2_clip: tuple[float, float] | None = S2_CLIP,
    s1_nan: float = S1_NAN,
    s1_posinf: float = S1_POSINF,
    s1_neginf: float = S1_NEGINF,
    dem_low: float = DEM_NODATA_LOW,
    dem_high: float = DEM_NODATA_HIGH,
    dem_clip: tuple[float, float] = DEM_CLIP,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(valid, S2, S1, DEM): valid = NOT(S2 nodata OR S1 nodata OR DEM nodata); arrays sanitised."""
    valid_s2, s2_out = clean_s2(s2, zero=s2_zero, saturated=s2_saturated, clip=s2_clip)
    valid_s1, s1_out = clean_s1(s1, nan=s1_nan, posinf=s1_posinf, neginf=s1_neginf)
    valid_dem, dem_out = clean_dem(dem, low=dem_low, high=dem_high, clip=dem_clip)
    shapes = {s2_out.shape[1:], s1_out.shape[1:], dem_out.shape[1:]}
    if len(shapes) != 1:
        raise ValueError(f"S2, S1 and DEM must share (y, x), got {s2_out.shape}, {s1_out.shape}, {dem_out.shape}")
    return valid_s2 & valid_s1 & valid_dem, s2_out, s1_out, dem_out

"""Nodata rules for S2, S1 and DEM (CryoSentinel recipe), checked pixel by pixel on hand-built arrays."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.data import nodata


def s2_stack(pixels: list[list[float]]) -> np.ndarray:
    """(12, 1, n) S2 array from per-pixel band vectors (a short vector is repeated over the 12 bands)."""
    columns = [np.resize(np.asarray(values, dtype=float), 12) for values in pixels]
    return np.stack(columns, axis=1)[:, None, :]


def test_s2_all_zero_or_saturated_pixels_are_invalid():
    s2 = s2_stack([[0], [16000], [20000], [0, 5], [16000, 15999], [1234]])
    valid, clean = nodata.clean_s2(s2)
    # all zero; all 16000; all 20000 -> 16000 after clipping; mixed zero; mixed saturation; ordinary
    assert valid[0].tolist() == [False, False, False, True, True, True]
    assert clean.dtype == np.float32
    assert clean[:, 0, 2].max() == 16000  # clipped
    assert clean[:, 0, 5].tolist() == [1234.0] * 12


def test_s2_negative_values_clip_to_zero_and_count_as_nodata():
    s2 = s2_stack([[-5]])
    valid, clean = nodata.clean_s2(s2)
    assert not valid[0, 0] and clean.min() == 0


def test_s2_thresholds_are_parameters():
    s2 = s2_stack([[10000], [0]])
    valid, _ = nodata.clean_s2(s2, saturated=10000, clip=(0, 10000))
    assert valid[0].tolist() == [False, False]
    valid, _ = nodata.clean_s2(s2, saturated=None)
    assert valid[0].tolist() == [True, False]


def test_s1_nonfinite_is_invalid_and_replaced():
    s1 = np.array([[[np.nan, np.inf, -np.inf, -12.0]], [[-20.0, -20.0, -20.0, -18.0]]], dtype=np.float32)
    valid, clean = nodata.clean_s1(s1)
    assert valid[0].tolist() == [False, False, False, True]
    assert clean[0, 0].tolist() == [-25.0, 5.0, -30.0, -12.0]
    assert clean[1, 0].tolist() == [-20.0, -20.0, -20.0, -18.0]
    _, custom = nodata.clean_s1(s1, nan=-40.0, posinf=1.0, neginf=-50.0)
    assert custom[0, 0, :3].tolist() == [-40.0, 1.0, -50.0]


def test_s1_any_band_nan_invalidates_pixel():
    s1 = np.array([[[-10.0]], [[np.nan]]], dtype=np.float32)
    assert not nodata.clean_s1(s1)[0][0, 0]


def test_dem_fill_values_and_clip():
    dem = np.array([[[-32768, -32000, -31999, 0, 9500, 31999, 32000, 32767]]], dtype=np.int16)
    valid, clean = nodata.clean_dem(dem)
    assert valid[0].tolist() == [False, False, True, True, True, True, False, False]
    assert clean[0, 0].tolist() == [-500, -500, -500, 0, 9000, 9000, 9000, 9000]
    valid, clean = nodata.clean_dem(dem, low=-1000, high=1000, clip=(-100, 100))
    assert valid[0].tolist() == [False] * 3 + [True] + [False] * 4
    assert clean[0, 0, 3] == 0 and clean.max() == 100


def test_cryosentinel_valid_is_not_any_modality_invalid():
    s2 = s2_stack([[100], [0], [100], [100]])
    s1 = np.full((2, 1, 4), -12.0, dtype=np.float32)
    s1[1, 0, 2] = np.nan
    dem = np.full((1, 1, 4), 4000, dtype=np.int16)
    dem[0, 0, 3] = -32768
    valid, s2c, s1c, demc = nodata.clean_cryosentinel(s2, s1, dem)
    assert valid[0].tolist() == [True, False, False, False]
    assert s1c[1, 0, 2] == -25.0 and demc[0, 0, 3] == -500
    assert s2c.shape == (12, 1, 4) and s1c.dtype == np.float32


def test_cryosentinel_rejects_misaligned_modalities():
    with pytest.raises(ValueError, match="share"):
        nodata.clean_cryosentinel(np.ones((12, 4, 4)), np.ones((2, 4, 5)), np.ones((1, 4, 4)))


def test_clean_finite_marks_any_nonfinite_band():
    image = np.ones((3, 2, 2), dtype=np.float32)
    image[2, 1, 1] = np.nan
    valid, clean = nodata.clean_finite(image)
    assert valid.tolist() == [[True, True], [True, False]]
    assert np.isfinite(clean).all()


def test_band_axis_is_required():
    with pytest.raises(ValueError, match="band, y, x"):
        nodata.clean_s1(np.zeros((4, 4)))

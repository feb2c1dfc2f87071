"""Normalisation statistics: streaming moments, percentiles, applying, saving and compatibility checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.data.normalize import (
    NormalizationMismatch,
    NormalizationStats,
    NormalizationStatsError,
    PercentileReservoir,
    Welford,
    compute_stats,
)
from workbench.data.store import BandSpec, Chip, StoreWriter, open_store


def _chips(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.normal([[[5.0]], [[-3.0]], [[100.0]]], [[[2.0]], [[0.5]], [[30.0]]], size=(3, 8, 9))
        valid = rng.random((8, 9)) > 0.3
        valid[0, 0] = True
        image[:, ~valid] = 1e6 * (i + 1)  # garbage outside the valid mask must be ignored
        out.append((image, valid))
    return out


def _pixels(chips: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.concatenate([image[:, valid].T for image, valid in chips])


def test_welford_matches_numpy_on_valid_pixels() -> None:
    chips = _chips(12)
    acc = Welford(3)
    for image, valid in chips:
        acc.update(image, valid)
    pixels = _pixels(chips)
    assert acc.count == len(pixels)
    np.testing.assert_allclose(acc.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.std, pixels.std(axis=0), rtol=1e-10)


def test_welford_merge_equals_single_pass() -> None:
    chips = _chips(10, seed=1)
    single = Welford(3)
    for image, valid in chips:
        single.update(image, valid)
    part_a, part_b, empty = Welford(3), Welford(3), Welford(3)
    for image, valid in chips[:3]:
        part_a.update(image, valid)
    for image, valid in chips[3:]:
        part_b.update(image, valid)
    merged = part_a.merge(part_b).merge(empty)
    assert merged.count == single.count
    np.testing.assert_allclose(merged.mean, single.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var, single.var, rtol=1e-10)
    fresh = Welford(3).merge(single)
    np.testing.assert_allclose(fresh.mean, single.mean)


def test_welford_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="bands"):
        Welford(2).update(np.zeros((3, 4, 4)), np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="valid mask"):
        Welford(3).update(np.zeros((3, 4, 4)), np.ones((4, 5), bool))


def test_reservoir_exact_below_capacity_and_close_above() -> None:
    chips = _chips(6, seed=2)
    pixels = _pixels(chips)
    exact = PercentileReservoir(3, capacity=10_000)
    for image, valid in chips:
        exact.update(image, valid)
    np.testing.assert_allclose(exact.percentiles([1, 50, 99]), np.percentile(pixels, [1, 50, 99], axis=0))

    rng = np.random.default_rng(3)
    big = rng.uniform(0, 1, size=(1, 200, 200))
    small = PercentileReservoir(1, capacity=4000, seed=5)
    small.update(big[:, :100], None)
    other = PercentileReservoir(1, capacity=4000, seed=6).update(big[:, 100:], None)
    small.merge(other)
    assert small.seen == 40_000 and len(small.sample) == 4000
    # uniform on [0,1]: the q-th percentile is q/100; a 4000-sample quantile has sd ~ sqrt(q(1-q)/n) < 0.008
    np.testing.assert_allclose(small.percentiles([10, 50, 90])[:, 0], [0.1, 0.5, 0.9], atol=0.03)


def test_apply_zscore_numpy_and_torch_agree_with_hand_values() -> None:
    stats = NormalizationStats(bands=["a", "b"], method="zscore", mean=[1.0, 10.0], std=[2.0, 5.0])
    image = np.array([[[3.0, -1.0]], [[10.0, 20.0]]], dtype=np.float32)
    expected = np.array([[[1.0, -1.0]], [[0.0, 2.0]]], dtype=np.float32)
    out = stats.apply(image)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected)
    tensor_out = stats.apply(torch.from_numpy(image)[None])
    assert isinstance(tensor_out, torch.Tensor) and tensor_out.shape == (1, 2, 1, 2)
    np.testing.assert_allclose(tensor_out[0].numpy(), expected)


def test_apply_percentile_clips_and_scales() -> None:
    stats = NormalizationStats(bands=["a"], method="percentile", low=[10.0], high=[30.0])
    image = np.array([[[0.0, 10.0, 20.0, 30.0, 99.0]]])
    np.testing.assert_allclose(stats.apply(image), [[[0.0, 0.0, 0.5, 1.0, 1.0]]])
    np.testing.assert_allclose(stats.apply(torch.tensor(image)).numpy(), [[[0.0, 0.0, 0.5, 1.0, 1.0]]])
    none = NormalizationStats(bands=["a"], method="none")
    assert none.apply(image) is image


def test_apply_rejects_wrong_band_count() -> None:
    stats = NormalizationStats(bands=["a", "b"], mean=[0, 0], std=[1, 1])
    with pytest.raises(NormalizationMismatch, match="expected 2 bands"):
        stats.apply(np.zeros((3, 4, 4)))


def test_save_load_roundtrip_and_errors(tmp_path: Path) -> None:
    stats = NormalizationStats(
        bands=["B02", "VV"],
        method="percentile",
        mean=[1, 2],
        std=[3, 4],
        low=[0, -20],
        high=[1, 5],
        percentiles=(1, 99),
    )
    path = stats.save(tmp_path / "normalization_stats.json")
    loaded = NormalizationStats.load(path)
    assert loaded == stats
    assert NormalizationStats.load(tmp_path) == stats  # a model directory works too
    data = json.loads(path.read_text())
    del data["high"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(NormalizationStatsError, match=r"bad.json.*'high'"):
        NormalizationStats.load(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        NormalizationStats.load(tmp_path / "missing.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"S2L2A": {"means": [1], "stds": [1]}}))
    with pytest.raises(NormalizationStatsError, match="not a normalisation statistics file"):
        NormalizationStats.load(other)


def test_check_compatible_names_differences() -> None:
    stats = NormalizationStats(bands=["B02", "B03", "VV"], mean=[0, 0, 0], std=[1, 1, 1])
    stats.check_compatible(["B02", "B03", "VV"], "zscore")
    with pytest.raises(NormalizationMismatch, match=r"\['B04'\] have no statistics.*\['VV'\]"):
        stats.check_compatible(["B02", "B03", "B04"])
    with pytest.raises(NormalizationMismatch, match="band order differs"):
        stats.check_compatible(["B03", "B02", "VV"])
    with pytest.raises(NormalizationMismatch, match="'percentile' is requested"):
        stats.check_compatible(["B02", "B03", "VV"], "percentile")
    subset = stats.select(["VV", "B02"])
    assert subset.bands == ["VV", "B02"]
    subset.check_compatible(["VV", "B02"], "zscore")


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
    chips = _chips(9, seed=4)
    bands = [BandSpec("B02", "S2L2A", True), BandSpec("VV", "S1GRD"), BandSpec("DEM", "DEM")]
    dest = tmp_path / "store"
    with StoreWriter(dest, bands, source="test", flush_every=4) as writer:
        for i, (image, valid) in enumerate(chips):
            label = np.zeros(valid.shape, np.uint8)
            writer.append(Chip(f"c{i}", np.where(valid, image, 0.0), label, valid, lat=1.0, lon=2.0))
    return dest, chips


def test_compute_stats_from_store(store: tuple[Path, list[tuple[np.ndarray, np.ndarray]]]) -> None:
    dest, chips = store
    ds = open_store(dest)
    train = [0, 2, 3, 5, 8]
    stats = compute_stats(
        ds, train, bands=["DEM", "B02"], method="percentile", percentiles=(2, 98), progress=False, read_chips=2
    )
    pixels = _pixels([chips[i] for i in train]).astype(np.float32).astype(np.float64)[:, [2, 0]]
    assert stats.bands == ["DEM", "B02"] and stats.count == len(pixels)
    np.testing.assert_allclose(np.asarray(stats.mean), pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(stats.std), pixels.std(axis=0), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(stats.low), np.percentile(pixels, 2, axis=0), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(stats.high), np.percentile(pixels, 98, axis=0), rtol=1e-9)
    with pytest.raises(NormalizationMismatch, match="not in the store"):
        compute_stats(ds, train, bands=["B99"], progress=False)
    with pytest.raises(ValueError, match="no chips to compute"):
        compute_stats(ds, [], progress=False)

"""Spatial splits: the CryoSentinel block rule, folds, region hold-out, catalog splits and leakage."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import pytest

from workbench.data.split import (
    SplitError,
    assign_splits,
    block_split,
    leakage_report,
    region_holdout,
    spatial_kfold,
)
from workbench.params import SplitConfig

SALT = "cryosentinel-blocks-v1"


def reference_split(lat: float, lon: float, s: float = 0.15, b: float = 0.02, salt: str = SALT) -> str:
    """The block rule written out for one point, straight from the method description."""
    lat_idx = math.floor(lat / s)
    lon_idx = math.floor(lon / s)
    fl = (lat / s) % 1
    fo = (lon / s) % 1
    d_lat = min(fl, 1 - fl) * s
    d_lon = min(fo, 1 - fo) * s
    if d_lat < b or d_lon < b:
        return "buffer"
    key = f"{salt}|{lat_idx}|{lon_idx}".encode()
    bucket = int(hashlib.sha1(key).hexdigest()[:8], 16) % 100
    if bucket < 80:
        return "train"
    if bucket < 90:
        return "val"
    return "test"


def _edge_points(s: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates exactly on block edges and on buffer limits, positive and negative."""
    k = np.arange(-40, 41)
    values = np.concatenate([k * s, k * s + b, k * s - b, k * s + s / 2, [0.0, -0.0, b, -b]])
    rng = np.random.default_rng(3)
    lat = rng.choice(values, 600)
    lon = rng.choice(values, 600)
    return lat, lon


@pytest.mark.parametrize("s,b", [(0.15, 0.02), (0.25, 0.02), (0.1, 0.0)])
def test_block_split_matches_scalar_rule(s: float, b: float) -> None:
    rng = np.random.default_rng(0)
    lat = np.concatenate([rng.uniform(-60, 75, 3000), _edge_points(s, b)[0]])
    lon = np.concatenate([rng.uniform(-180, 180, 3000), _edge_points(s, b)[1]])
    got = block_split(lat, lon, block_deg=s, buffer_deg=b)
    expected = [reference_split(float(a), float(o), s, b) for a, o in zip(lat, lon)]
    assert got.tolist() == expected
    assert set(got) <= {"train", "val", "test", "buffer"}


def test_edge_points_are_buffer_and_exact_limit_is_not() -> None:
    # exactly on the block edge: distance 0 < b -> buffer
    assert block_split([45.0], [75.0], block_deg=0.25, buffer_deg=0.02)[0] == "buffer"
    # centre of a block is never buffer
    assert block_split([45.125], [75.125], block_deg=0.25, buffer_deg=0.02)[0] != "buffer"


def test_buffer_drop_rate_matches_geometry() -> None:
    s, b = 0.15, 0.02
    n = 40_000
    rng = np.random.default_rng(1)
    lat = rng.uniform(30.0, 60.0, n)
    lon = rng.uniform(-20.0, 100.0, n)
    dropped = (block_split(lat, lon, block_deg=s, buffer_deg=b) == "buffer").mean()
    expected = 1 - (1 - 2 * b / s) ** 2
    assert expected == pytest.approx(0.4622, abs=1e-4)
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(dropped - expected) < 4 * sigma


def test_block_shares_follow_percentages() -> None:
    # one point at the centre of each of many blocks: the share of train blocks is ~80%
    s = 0.15
    rows, cols = np.meshgrid(np.arange(-50, 50), np.arange(-50, 50), indexing="ij")
    lat = (rows.ravel() + 0.5) * s
    lon = (cols.ravel() + 0.5) * s
    splits = block_split(lat, lon, block_deg=s, buffer_deg=0.02)
    n = splits.size
    for name, share in [("train", 0.8), ("val", 0.1), ("test", 0.1)]:
        sigma = math.sqrt(share * (1 - share) / n)
        assert abs((splits == name).mean() - share) < 4 * sigma


def test_same_block_same_split_across_years() -> None:
    rng = np.random.default_rng(2)
    centres = rng.integers(-200, 200, size=(50, 2))
    lat: list[float] = []
    lon: list[float] = []
    year: list[int] = []
    for y in (2017, 2021, 2022, 2023):
        jitter = rng.uniform(-0.04, 0.04, size=centres.shape)  # stays > 0.02 deg from the edges
        lat.extend((centres[:, 0] + 0.5) * 0.15 + jitter[:, 0])
        lon.extend((centres[:, 1] + 0.5) * 0.15 + jitter[:, 1])
        year.extend([y] * len(centres))
    catalog = pd.DataFrame({"lat": lat, "lon": lon, "year": year, "region": "r"})
    splits = assign_splits(catalog, SplitConfig()).to_numpy().reshape(4, -1)
    assert (splits == splits[0]).all()
    assert "buffer" not in splits


def test_invalid_input_errors() -> None:
    with pytest.raises(SplitError, match="finite lat/lon"):
        block_split([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(SplitError, match="sum to at most 100"):
        block_split([1.0], [1.0], train_percent=90, val_percent=20)
    with pytest.raises(SplitError, match="same length"):
        block_split([1.0, 2.0], [1.0])


def test_spatial_kfold_keeps_blocks_together_and_balances() -> None:
    rng = np.random.default_rng(4)
    lat = rng.uniform(40, 42, 2000)
    lon = rng.uniform(70, 73, 2000)
    folds = spatial_kfold(lat, lon, n_folds=5, block_deg=0.15)
    blocks = pd.DataFrame({"r": np.floor(lat / 0.15), "c": np.floor(lon / 0.15), "fold": folds})
    assert (blocks.groupby(["r", "c"])["fold"].nunique() == 1).all()
    per_fold = blocks.drop_duplicates(["r", "c"])["fold"].value_counts()
    assert sorted(per_fold.index) == [0, 1, 2, 3, 4]
    assert per_fold.max() - per_fold.min() <= 1
    assert (spatial_kfold(lat, lon, n_folds=5, block_deg=0.15) == folds).all()


def test_spatial_kfold_too_few_blocks() -> None:
    with pytest.raises(SplitError, match="lower block_deg or n_folds"):
        spatial_kfold([0.05, 0.06], [0.05, 0.07], n_folds=3)


def test_region_holdout_and_region_method() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    regions = rng.choice(["tien_shan", "ile_alatau", "zhetysu_alatau"], n)
    assert (region_holdout(regions, ["ile_alatau"]) == np.where(regions == "ile_alatau", "test", "train")).all()
    with pytest.raises(SplitError, match="not in the catalog"):
        region_holdout(regions, ["pamir"])
    catalog = pd.DataFrame({"lat": rng.uniform(42, 45, n), "lon": rng.uniform(75, 80, n), "region": regions})
    cfg = SplitConfig(method="region", holdout_regions=["ile_alatau"])
    splits = assign_splits(catalog, cfg).to_numpy()
    assert (splits[regions == "ile_alatau"] == "test").all()
    rest = splits[regions != "ile_alatau"]
    assert set(rest) == {"train", "val", "buffer"}
    # non-held-out chips are split in proportion 80:10 -> 89:11 of the non-buffer blocks
    kept = rest[rest != "buffer"]
    assert 0.75 < (kept == "train").mean() < 0.98


def test_catalog_method() -> None:
    catalog = pd.DataFrame({"lat": [0, 1, 2], "lon": [0, 1, 2], "split": ["train", "Validation", "test"]})
    assert assign_splits(catalog, SplitConfig(method="catalog")).tolist() == ["train", "val", "test"]
    with pytest.raises(SplitError, match="needs a 'split' column"):
        assign_splits(catalog.drop(columns="split"), SplitConfig(method="catalog"))
    with pytest.raises(SplitError, match="is empty"):
        assign_splits(catalog.assign(split=""), SplitConfig(method="catalog"))
    with pytest.raises(SplitError, match="unknown values"):
        assign_splits(catalog.assign(split=["train", "holdout", "test"]), SplitConfig(method="catalog"))


def test_empty_split_error_names_split_and_fix() -> None:
    # all chips inside one block: only one of train/val/test can be filled
    rng = np.random.default_rng(6)
    catalog = pd.DataFrame({"lat": 0.075 + rng.uniform(-0.01, 0.01, 20), "lon": 0.075 + rng.uniform(-0.01, 0.01, 20)})
    with pytest.raises(SplitError, match=r"the (train|val|test) split is empty.*block_deg"):
        assign_splits(catalog, SplitConfig())


def _haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1)[:, None], np.radians(lat2)[None, :]
    dl = np.radians(lon2)[None, :] - np.radians(lon1)[:, None]
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * 6371.0088 * np.arcsin(np.sqrt(h))


def test_leakage_report_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    n = 400
    catalog = pd.DataFrame(
        {
            "lat": rng.uniform(-70, 70, n),
            "lon": rng.uniform(-179, 179, n),
            "split": rng.choice(["train", "val", "test", "buffer"], n),
        }
    )
    report = leakage_report(catalog)
    assert sorted(zip(report.split_a, report.split_b)) == sorted([("train", "val"), ("train", "test"), ("val", "test")])
    for row in report.itertuples():
        a = catalog[catalog.split == row.split_a]
        b = catalog[catalog.split == row.split_b]
        brute = _haversine_km(a.lat.to_numpy(), a.lon.to_numpy(), b.lat.to_numpy(), b.lon.to_numpy()).min()
        assert row.min_distance_km == pytest.approx(brute, rel=1e-9, abs=1e-6)
        assert (row.n_a, row.n_b) == (len(a), len(b))


def test_leakage_report_known_distance() -> None:
    # one degree of latitude along a meridian is pi * R / 180 km
    catalog = pd.DataFrame({"lat": [10.0, 11.0], "lon": [20.0, 20.0], "split": ["train", "test"]})
    report = leakage_report(catalog)
    assert report.loc[0, "min_distance_km"] == pytest.approx(math.pi * 6371.0088 / 180, rel=1e-9)

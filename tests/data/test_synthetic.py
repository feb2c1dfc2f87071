"""The synthetic glacial-lake chips: determinism, catalog, physics, label noise, split coverage, reuse."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from workbench.data import synthetic
from workbench.data.store import open_store, read_catalog, read_store_meta
from workbench.params import SyntheticConfig

S2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
ROCK, VEGETATION, SNOW, WATER = 0, 1, 2, 3  # surface plane codes, as documented
SUNLIT = 0  # illumination plane code for clear sky, no shadow


@dataclass
class Demo:
    path: Path
    catalog: pd.DataFrame
    image: np.ndarray
    label: np.ndarray
    clean: np.ndarray
    valid: np.ndarray
    surface: np.ndarray
    illumination: np.ndarray
    seconds: float

    def band(self, name: str) -> np.ndarray:
        return self.image[:, [b.name for b in synthetic.synthetic_bands()].index(name)]


def _mndwi(image: np.ndarray) -> np.ndarray:
    """Independent MNDWI = (B03 - B11) / (B03 + B11) on (chip, band, y, x), 0 where the sum is not positive."""
    green = image[:, S2.index("B03")].astype(np.float64)
    swir = image[:, S2.index("B11")].astype(np.float64)
    total = green + swir
    return np.where(total > 0, (green - swir) / np.where(total > 0, total, 1), 0.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The default demo store (240 chips of 64 x 64), generated once."""
    path = tmp_path_factory.mktemp("synthetic") / "demo"
    start = time.perf_counter()
    synthetic.generate_glacial_lakes(path, SyntheticConfig(), progress=False)
    seconds = time.perf_counter() - start
    print(f"\ngenerated the default synthetic store (240 chips of 64x64) in {seconds:.2f} s")
    ds = open_store(path)
    return Demo(
        path=path,
        catalog=read_catalog(path),
        image=ds["image"].values,
        label=ds["label"].values.astype(bool),
        clean=ds["clean_label"].values.astype(bool),
        valid=ds["valid"].values,
        surface=ds["surface"].values,
        illumination=ds["illumination"].values,
        seconds=seconds,
    )


def test_bands_follow_the_cryosentinel_order() -> None:
    bands = synthetic.synthetic_bands()
    assert [b.name for b in bands] == [*S2, "VV", "VH", "DEM"]
    assert [b.modality for b in bands] == ["S2L2A"] * 12 + ["S1GRD"] * 2 + ["DEM"]
    assert [b.optical for b in bands] == [True] * 12 + [False] * 3


def test_generation_is_deterministic(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_chips=12, chip_size=32, seed=7)
    first = synthetic.generate_glacial_lakes(tmp_path / "a", cfg, progress=False)
    second = synthetic.generate_glacial_lakes(tmp_path / "b", cfg, progress=False)
    other = synthetic.generate_glacial_lakes(tmp_path / "c", cfg.model_copy(update={"seed": 8}), progress=False)
    a, b, c = open_store(first), open_store(second), open_store(other)
    for name in ("image", "label", "valid", "clean_label", "surface", "illumination"):
        assert a[name].values.tobytes() == b[name].values.tobytes(), name
    pd.testing.assert_frame_equal(read_catalog(first), read_catalog(second))
    assert not np.array_equal(a["image"].values, c["image"].values)


def test_catalog_columns_regions_and_years(demo: Demo) -> None:
    catalog, cfg = demo.catalog, SyntheticConfig()
    assert len(catalog) == cfg.n_chips == demo.image.shape[0]
    assert demo.image.shape[1:] == (15, 64, 64) and demo.image.dtype == np.float32
    for column in ("site_id", "noise", "noisy", "clean_positive_fraction", "cloud_fraction", "snow_fraction"):
        assert column in catalog.columns, column
    assert catalog["chip_id"].is_unique
    assert set(catalog["region"]) == set(cfg.regions)
    assert set(catalog["year"]) == set(cfg.years)
    assert (catalog["split"] == "").all() and (catalog["source"] == "synthetic").all()
    # sites recur over years at one place, never twice in the same year
    per_site = catalog.groupby("site_id")
    assert (per_site["year"].nunique() > 1).sum() >= 20
    assert (per_site["year"].nunique() == per_site.size()).all()
    assert (per_site["lat"].nunique() == 1).all() and (per_site["lon"].nunique() == 1).all()
    centres = {"tien_shan": (42.0, 78.5), "ile_alatau": (43.05, 77.0), "zhetysu_alatau": (45.0, 80.0)}
    for region, (lat, lon) in centres.items():
        rows = catalog[catalog["region"] == region]
        assert (rows["lat"] - lat).abs().max() < 1.0 and (rows["lon"] - lon).abs().max() < 1.0, region
    # about lake_fraction of the chips hold a lake; cloud_fraction of them a cloud
    has_lake = demo.clean.any(axis=(1, 2))
    assert abs(has_lake.mean() - cfg.lake_fraction) < 0.05
    np.testing.assert_allclose(catalog["clean_positive_fraction"] > 0, has_lake)
    assert abs((catalog["cloud_fraction"] > 0).mean() - cfg.cloud_fraction) < 0.06


def test_optical_physics_water_rock_vegetation_snow(demo: Demo) -> None:
    index = _mndwi(demo.image)
    sunlit = (demo.illumination == SUNLIT) & demo.valid
    water = demo.clean & sunlit
    assert water.sum() > 5000
    assert np.mean(index[water] > 0) >= 0.95
    for code in (ROCK, VEGETATION):
        land = (demo.surface == code) & sunlit
        assert np.mean(index[land] < 0) >= 0.9, code
    snow = (demo.surface == SNOW) & sunlit
    assert snow.sum() > 5000
    assert np.mean(index[snow] > 0) >= 0.9  # the MNDWI confuser exists
    nir, red = demo.band("B08").astype(np.float64), demo.band("B04").astype(np.float64)
    ndvi = (nir - red) / (nir + red + 1e-9)
    assert np.median(ndvi[(demo.surface == VEGETATION) & sunlit]) > 0.5
    assert np.median(nir[water]) < 400 < np.median(nir[snow])  # water is dark in NIR, snow is not
    # shadows fool the index: shadowed rock reads as water far more often than sunlit rock
    shadow = np.isin(demo.illumination, [2, 3]) & (demo.surface == ROCK) & demo.valid
    assert np.mean(index[shadow] > 0) > 0.3


def test_sar_is_dark_over_water_and_unaffected_by_clouds(demo: Demo) -> None:
    vv = demo.band("VV")
    rock = demo.surface == ROCK
    assert vv[demo.clean].mean() <= vv[rock].mean() - 8.0
    cloud = demo.illumination == 1
    assert abs(vv[rock & cloud].mean() - vv[rock & ~cloud].mean()) < 1.5
    assert vv[demo.clean & cloud].mean() <= vv[rock].mean() - 8.0
    assert demo.band("VH")[demo.clean].mean() < demo.band("VH")[rock].mean() - 8.0


def test_lakes_are_flat_and_sit_in_depressions(demo: Demo) -> None:
    dem = demo.band("DEM")
    assert dem[demo.valid].min() >= 2990 and dem[demo.valid].max() <= 4510
    below_median, checked = [], 0
    for k in np.flatnonzero(demo.clean.any(axis=(1, 2))):
        below_median.append(dem[k][demo.clean[k]].mean() - np.median(dem[k]))
        components, count = ndimage.label(demo.clean[k])
        for c in range(1, count + 1):
            lake = components == c
            heights = dem[k][lake & demo.valid[k]]
            shore = ndimage.binary_dilation(lake) & ~demo.clean[k] & demo.valid[k]
            if heights.size and shore.any():
                assert np.ptp(heights) == 0, demo.catalog["chip_id"][k]
                assert dem[k][shore].min() >= heights[0]
                checked += 1
    assert checked > 100
    assert np.mean(below_median) < 0 and np.mean(np.array(below_median) < 0) > 0.8


def test_label_noise_is_exact_and_behaves_as_described(demo: Demo) -> None:
    catalog = demo.catalog
    expected = round(SyntheticConfig().noise_fraction * len(catalog))
    noisy = catalog["noisy"].to_numpy()
    assert noisy.sum() == expected
    assert set(catalog.loc[noisy, "noise"]) == {"omitted", "undersized", "shifted"}
    assert (catalog.loc[~noisy, "noise"] == "").all()
    assert demo.clean[noisy].any(axis=(1, 2)).all()  # only lake chips are corrupted
    differs = (demo.label != demo.clean).any(axis=(1, 2))
    np.testing.assert_array_equal(differs, noisy)
    for k in np.flatnonzero(noisy):
        label, clean, kind = demo.label[k], demo.clean[k], catalog["noise"][k]
        if kind == "omitted":
            assert label.sum() < clean.sum()
            lakes, count = ndimage.label(clean)
            kept = [(label & (lakes == c)).sum() / (lakes == c).sum() for c in range(1, count + 1)]
            assert set(kept) <= {0.0, 1.0} and not (label & ~clean).any()  # whole lakes go, nothing else
            kept_sizes = [(lakes == c + 1).sum() for c in range(count) if kept[c] == 1.0]
            assert (clean & ~label).sum() >= max(kept_sizes, default=0)  # the largest lake is the one omitted
        elif kind == "undersized":
            assert label.sum() < clean.sum() and not (label & ~clean).any()
            lakes, count = ndimage.label(clean)
            ratios = [(label & (lakes == c)).sum() / (lakes == c).sum() for c in range(1, count + 1)]
            assert min(ratios) <= 0.4
        else:
            assert _iou(label, clean) < 0.7
    stored = catalog["positive_fraction"].to_numpy()
    np.testing.assert_allclose(stored, (demo.label & demo.valid).sum(axis=(1, 2)) / demo.valid.sum(axis=(1, 2)))


def test_nodata_stripes_follow_the_sentinel2_rule(demo: Demo) -> None:
    invalid_chips = ~demo.valid.all(axis=(1, 2))
    assert 0.02 <= invalid_chips.mean() <= 0.08
    s2 = demo.image[:, :12]
    all_zero = (s2 == 0).all(axis=1)
    np.testing.assert_array_equal(~demo.valid, all_zero)
    assert (demo.valid.mean(axis=(1, 2)) > 0.85).all()  # stripes are thin
    np.testing.assert_allclose(demo.catalog["valid_fraction"], demo.valid.mean(axis=(1, 2)))
    assert s2.max() <= 16000 and s2.min() >= 0
    np.testing.assert_array_equal(s2, np.round(s2))  # reflectance x 10000 as whole numbers


def _block_split(lat: float, lon: float, size: float = 0.15, buffer: float = 0.02) -> str:
    salt = "cryosentinel-blocks-v1"
    frac_lat, frac_lon = (lat / size) % 1, (lon / size) % 1
    if min(frac_lat, 1 - frac_lat) * size < buffer or min(frac_lon, 1 - frac_lon) * size < buffer:
        return "buffer"
    key = f"{salt}|{math.floor(lat / size)}|{math.floor(lon / size)}".encode()
    bucket = int(hashlib.sha1(key).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def test_block_split_gives_train_val_and_test_chips(demo: Demo) -> None:
    splits = pd.Series([_block_split(lat, lon) for lat, lon in zip(demo.catalog["lat"], demo.catalog["lon"])])
    counts = splits.value_counts()
    print("block split of the default store:", counts.to_dict())
    assert counts.get("train", 0) >= 1 and counts.get("val", 0) >= 1 and counts.get("test", 0) >= 1
    assert counts.get("buffer", 0) <= 0.1 * len(splits)
    # a site never straddles splits, and enough blocks are used that each split has several sites
    per_site = pd.DataFrame({"site": demo.catalog["site_id"], "split": splits}).groupby("site")["split"].nunique()
    assert (per_site == 1).all()
    blocks = {(math.floor(lat / 0.15), math.floor(lon / 0.15)) for lat, lon in zip(demo.catalog.lat, demo.catalog.lon)}
    assert len(blocks) >= 40


@pytest.mark.parametrize("n_chips", [12, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_configurations_still_cover_every_split(n_chips: int, seed: int) -> None:
    sites, chips = synthetic.plan_chips(SyntheticConfig(n_chips=n_chips, seed=seed))
    assert len(chips) == n_chips
    splits = {_block_split(sites[chip.site].lat, sites[chip.site].lon) for chip in chips}
    assert {"train", "val", "test"} <= splits


def test_pixelwise_model_beats_the_water_index(demo: Demo) -> None:
    """The physics is learnable: a linear model on the 15 bands separates lakes; MNDWI > 0 does not."""
    n = len(demo.catalog)
    train, test = np.arange(n) % 3 != 0, np.arange(n) % 3 == 0
    pixels = demo.image.transpose(0, 2, 3, 1)
    x_train, y_train = pixels[train][demo.valid[train]], demo.clean[train][demo.valid[train]]
    pick = np.random.default_rng(0).choice(len(x_train), 40_000, replace=False)
    scaler = StandardScaler().fit(x_train[pick])
    model = LogisticRegression(max_iter=300).fit(scaler.transform(x_train[pick]), y_train[pick])
    x_test = scaler.transform(pixels[test].reshape(-1, 15))
    predicted = model.predict(x_test).reshape(demo.clean[test].shape).astype(bool)
    valid, truth = demo.valid[test], demo.clean[test]
    model_iou = _iou(predicted & valid, truth & valid)
    index_iou = _iou((_mndwi(demo.image[test]) > 0) & valid, truth & valid)
    print(f"pixel-wise logistic regression IoU {model_iou:.3f}, MNDWI > 0 IoU {index_iou:.3f}")
    assert model_iou >= 0.8
    assert index_iou <= model_iou - 0.2


def test_generation_takes_seconds(demo: Demo) -> None:
    print(f"default synthetic store: {demo.seconds:.2f} s")
    assert read_store_meta(demo.path)["n_chips"] == 240


def test_ensure_reuses_a_matching_store_and_regenerates_otherwise(tmp_path: Path) -> None:
    dest = tmp_path / "store"
    cfg = SyntheticConfig(n_chips=8, chip_size=16)
    synthetic.ensure_synthetic_store(dest, cfg, progress=False)
    # a binary store records its configuration without the multiclass switch (stores written before it match)
    assert read_store_meta(dest)["attrs"]["synthetic"] == cfg.model_dump(mode="json", exclude={"multiclass"})
    stamp = (dest / "store.json").stat().st_mtime_ns
    marker = dest / "marker"
    marker.write_text("kept")
    synthetic.ensure_synthetic_store(dest, cfg, progress=False)
    assert marker.exists() and (dest / "store.json").stat().st_mtime_ns == stamp

    changed = cfg.model_copy(update={"seed": 1})
    synthetic.ensure_synthetic_store(dest, changed, progress=False)
    assert not marker.exists()
    assert read_store_meta(dest)["attrs"]["synthetic"]["seed"] == 1
    assert len(read_catalog(dest)) == 8
    assert not list(tmp_path.glob(".store.*"))  # no temporary directories left behind

    (dest / "store.json").write_text("{not json", encoding="utf-8")
    synthetic.ensure_synthetic_store(dest, changed, progress=False)  # a damaged store is rebuilt
    assert read_store_meta(dest)["attrs"]["synthetic"]["seed"] == 1


def test_existing_store_is_not_overwritten_by_default(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_chips=8, chip_size=16)
    dest = synthetic.generate_glacial_lakes(tmp_path / "store", cfg, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        synthetic.generate_glacial_lakes(dest, cfg, progress=False)
    synthetic.generate_glacial_lakes(dest, cfg, overwrite=True, progress=False)


def test_chip_size_scales_lakes(tmp_path: Path) -> None:
    small = synthetic.plan_chips(SyntheticConfig(n_chips=40, chip_size=32))[0]
    large = synthetic.plan_chips(SyntheticConfig(n_chips=40, chip_size=128))[0]
    small_areas = [a for site in small for a in site.lake_areas]
    large_areas = [a for site in large for a in site.lake_areas]
    assert max(small_areas) <= 600 * (32 / 64) ** 2 and min(small_areas) >= 40 * (32 / 64) ** 2
    assert max(large_areas) <= 600 * 4 and min(large_areas) >= 40 * 4


def test_bad_configuration_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"data\.synthetic\.regions"):
        synthetic.plan_chips(SyntheticConfig(regions=["tien_shan", "tien_shan"]))
    with pytest.raises(ValueError, match=r"data\.synthetic\.years"):
        synthetic.plan_chips(SyntheticConfig(years=[]))

"""The three-class variant of the synthetic demo (other / lake / snow_ice, cloud unlabelled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workbench.arrays import IGNORE_INDEX
from workbench.data import synthetic
from workbench.data.store import open_store, read_catalog, read_store_meta
from workbench.params import SyntheticConfig

SNOW, WATER = 2, 3  # surface plane codes
CLOUD = 1  # illumination plane code
OTHER, LAKE, SNOW_ICE = 0, 1, 2


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multiclass")
    cfg = SyntheticConfig(n_chips=48, chip_size=32, noise_fraction=0.1, cloud_fraction=0.3)
    binary = synthetic.generate_glacial_lakes(root / "binary", cfg, progress=False)
    multi_cfg = cfg.model_copy(update={"multiclass": True})
    multi = synthetic.generate_glacial_lakes(root / "multi", multi_cfg, progress=False)
    return binary, multi


def test_images_are_those_of_the_binary_store_and_labels_follow_the_surface(stores: tuple[Path, Path]) -> None:
    binary, multi = (open_store(path) for path in stores)
    for name in ("image", "valid", "surface", "illumination"):
        assert np.array_equal(binary[name].values, multi[name].values), name
    label = multi["label"].values
    lake = binary["label"].values.astype(bool)  # the (possibly corrupted) binary lake label
    surface, cloud = multi["surface"].values, multi["illumination"].values == CLOUD
    assert set(np.unique(label)) <= {OTHER, LAKE, SNOW_ICE, IGNORE_INDEX}
    # independent expectation pixel by pixel: cloud -> ignore, else lake label, else snow surface, else other
    expected = np.where(cloud, IGNORE_INDEX, np.where(lake, LAKE, np.where(surface == SNOW, SNOW_ICE, OTHER)))
    assert np.array_equal(label, expected)
    assert cloud.any() and (label == SNOW_ICE).any() and (label == LAKE).any()
    # the clean label marks the simulated water surface as lake
    clean = multi["clean_label"].values
    assert np.array_equal(clean == LAKE, (surface == WATER) & ~cloud)


def test_label_noise_changes_only_lake_pixels(stores: tuple[Path, Path]) -> None:
    multi = open_store(stores[1])
    catalog = read_catalog(stores[1])
    label, clean = multi["label"].values, multi["clean_label"].values
    differs = (label != clean).any(axis=(1, 2))
    assert np.array_equal(differs, catalog["noisy"].to_numpy(bool))
    changed = label != clean
    # a corruption moves pixels between lake and the class underneath, never touches cloud pixels
    assert np.all((label[changed] == LAKE) | (clean[changed] == LAKE))
    assert not np.any(changed & (label == IGNORE_INDEX))


def test_store_records_the_classes_and_binary_attrs_stay_as_before(stores: tuple[Path, Path]) -> None:
    binary_attrs = read_store_meta(stores[0])["attrs"]
    multi_attrs = read_store_meta(stores[1])["attrs"]
    assert binary_attrs["label_classes"] == {"background": 0, "water": 1}
    assert "multiclass" not in binary_attrs["synthetic"]  # stores written before the option are reused as is
    assert multi_attrs["label_classes"] == {"other": 0, "lake": 1, "snow_ice": 2}
    assert multi_attrs["synthetic"]["multiclass"] is True


def test_switching_the_option_regenerates_the_store(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_chips=8, chip_size=16)
    path = synthetic.ensure_synthetic_store(tmp_path / "s", cfg, progress=False)
    assert read_store_meta(path)["attrs"]["label_classes"] == {"background": 0, "water": 1}
    synthetic.ensure_synthetic_store(path, cfg.model_copy(update={"multiclass": True}), progress=False)
    assert read_store_meta(path)["attrs"]["label_classes"]["snow_ice"] == 2

"""Readers of external formats and the ingest into the chip store, on fakes in the real layouts and on the
real samples in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_fakes

from workbench.arrays import IGNORE_INDEX
from workbench.data.ingest import FORMATS, UnknownFormatError, ingest, parse_option, parse_options, reader_options
from workbench.data.sources import SourceError, as_class_map, chip_count, map_classes, tile_windows
from workbench.data.sources.cloud38 import read_cloud38
from workbench.data.sources.cryosentinel import read_cryosentinel
from workbench.data.sources.geotiff import read_geotiff
from workbench.data.sources.landslide4sense import read_landslide4sense
from workbench.data.sources.npz import UKIS_MULTICLASS_MAP, read_npz, read_ukis_csmask
from workbench.data.sources.sen1floods11 import read_sen1floods11
from workbench.data.sources.terramesh import read_terramesh
from workbench.data.sources.vector import rasterize_polygons, read_polygons, read_vector
from workbench.data.store import open_store, read_catalog, read_store_meta

fakes = load_fakes()


def wgs84(crs: str, x: float, y: float) -> tuple[float, float]:
    """(lon, lat) by pyproj, independent of the readers' rasterio.warp."""
    from pyproj import Transformer

    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)


# tiling -----------------------------------------------------------------------------------------------
def test_tile_windows_cover_raster_with_last_window_flush():
    assert tile_windows(500, 224, 224, 112) == [(0, 0), (112, 0), (224, 0), (276, 0)]
    windows = tile_windows(300, 200, 128, 64)
    assert sorted({r for r, _ in windows}) == [0, 64, 128, 172]
    assert sorted({c for _, c in windows}) == [0, 64, 72]
    coverage = np.zeros((300, 200), dtype=int)
    for row, col in windows:
        coverage[row : row + 128, col : col + 128] += 1
    assert coverage.min() >= 1
    assert chip_count(300, 200, 128, 64) == 12 and chip_count(128, 128, None, None) == 1
    assert tile_windows(256, 256, 128, None) == [(0, 0), (0, 128), (128, 0), (128, 128)]
    with pytest.raises(ValueError, match="smaller than the chip size"):
        tile_windows(100, 300, 128, 64)


def test_map_classes():
    raw = np.array([[0, 1, 2, 3, 4, -1]])
    assert map_classes(raw, {4: 1}, ignore_values=[-1]).tolist() == [[0, 0, 0, 0, 1, 255]]
    assert map_classes(raw, {0: 1, 4: 2, "other": 0}, ignore_values=[-1]).tolist() == [[1, 0, 0, 0, 2, 255]]
    assert map_classes(raw, as_class_map("{0: 2, 4: 1, 3: ignore, other: 0}")).tolist() == [[2, 0, 0, 255, 1, 0]]
    with pytest.raises(ValueError, match=r"a\.npz: raw label value\(s\) 1 \(1 px\), 2 \(1 px\), 3 \(1 px\).*other"):
        map_classes(raw, {0: 1, 4: 2}, ignore_values=[-1], where="a.npz")  # multiclass maps name every value
    assert map_classes(raw, None, ignore_values=[-1]).tolist() == [[0, 1, 2, 3, 4, 255]]
    with pytest.raises(ValueError, match="class_map"):
        map_classes(np.array([300]), None)


# Landslide4Sense ------------------------------------------------------------------------------------
def test_landslide4sense_pairs_values_and_unpaired(tmp_path):
    written = fakes.make_landslide4sense(tmp_path, n=3, extra_masks=2, size=32)
    source = read_landslide4sense(tmp_path)
    assert [b.name for b in source.bands][:3] == ["B01", "B02", "B03"] and source.bands[-1].name == "DEM"
    assert [b.optical for b in source.bands] == [True] * 12 + [False, False]
    assert sorted(Path(entry.split(":")[0]).name for entry in source.unpaired) == ["mask_4.h5", "mask_5.h5"]
    chips = {chip.chip_id: chip for chip in source.chips}
    assert sorted(chips) == ["TrainData_image_1", "TrainData_image_2", "TrainData_image_3"]
    image, mask = written[2]
    chip = chips["TrainData_image_2"]
    assert chip.image.shape == (14, 32, 32) and chip.split == "train"
    np.testing.assert_array_equal(chip.image[13], image[:, :, 13])  # DEM band last
    assert chip.image[0, 5, 7] == 100 + 2 + 7  # band B01 = 100 + offset + x
    np.testing.assert_array_equal(chip.label, mask)
    assert chip.valid.all()


def test_landslide4sense_flat_layout_and_tiling(tmp_path):
    fakes.make_landslide4sense(tmp_path, n=2, extra_masks=0, layout="flat", size=128)
    source = read_landslide4sense(tmp_path, chip_size=64, stride=64)
    chips = list(source.chips)
    assert len(chips) == 2 * 4 == source.total
    assert {c.chip_id for c in chips} >= {"image_1_r0_c0", "image_2_r64_c64"}
    tile = next(c for c in chips if c.chip_id == "image_1_r64_c64")
    assert tile.image[0, 0, 0] == 100 + 1 + 64  # x offset of the tile


def test_landslide4sense_wrong_band_count(tmp_path):
    import h5py

    fakes.make_landslide4sense(tmp_path, n=1, extra_masks=0, size=16)
    bad = tmp_path / "TrainData" / "img" / "image_1.h5"
    with h5py.File(bad, "w") as handle:
        handle.create_dataset("img", data=np.zeros((16, 16, 13), dtype=np.float32))
    with pytest.raises(SourceError, match=r"image_1\.h5.*14"):
        list(read_landslide4sense(tmp_path).chips)


def test_landslide4sense_corrupt_hdf5(tmp_path):
    fakes.make_landslide4sense(tmp_path, n=1, extra_masks=0, size=16)
    bad = tmp_path / "TrainData" / "img" / "image_1.h5"
    bad.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(SourceError, match=r"image_1\.h5.*HDF5"):
        list(read_landslide4sense(tmp_path).chips)


def test_empty_source_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_landslide4sense(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_cloud38(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest("landslide4sense", tmp_path / "missing", tmp_path / "store", progress=False)


# 38-Cloud --------------------------------------------------------------------------------------------
def test_cloud38_split_folders(tmp_path):
    written = fakes.make_cloud38(tmp_path, splits=("train", "test"), n=2, size=32)
    source = read_cloud38(tmp_path)
    assert [b.name for b in source.bands] == ["red", "green", "blue", "nir"] and source.unpaired == []
    chips = {chip.chip_id: chip for chip in source.chips}
    assert set(chips) == set(written)
    name = f"train_{fakes.cloud38_patch_name(2)}"
    chip, (image, gt) = chips[name], written[name]
    np.testing.assert_array_equal(chip.image, image.astype(np.float32))
    assert chip.image[3, 10, 5] == 400 + 2 + 5  # nir = 400 + offset + x
    np.testing.assert_array_equal(chip.label, (gt == 255).astype(np.uint8))
    assert not chip.valid[:4, :4].any() and chip.valid.sum() == 32 * 32 - 16
    assert chip.split == "train" and chip.year == 2016 and chip.region.startswith("LC08_L1TP_002053")
    test_chip = chips[f"test_{fakes.cloud38_patch_name(1)}"]
    assert test_chip.split == "test" and (test_chip.label == IGNORE_INDEX).all()


def test_cloud38_single_folder_and_missing_band(tmp_path):
    fakes.make_cloud38(tmp_path, n=2, size=16, single_folder=True)
    (tmp_path / f"nir_{fakes.cloud38_patch_name(2)}.TIF").unlink()
    source = read_cloud38(tmp_path)
    chips = list(source.chips)
    assert [c.chip_id for c in chips] == [fakes.cloud38_patch_name(1)]
    assert len(source.unpaired) == 1 and "nir_patch_2" in source.unpaired[0]


# Sen1Floods11 ----------------------------------------------------------------------------------------
def test_sen1floods11(tmp_path):
    written = fakes.make_sen1floods11(tmp_path, size=32)
    source = read_sen1floods11(tmp_path)
    assert len(source.bands) == 15 and [b.name for b in source.bands[-2:]] == ["VV", "VH"]
    chips = {chip.chip_id: chip for chip in source.chips}
    chip, data = chips["Ghana_5079"], written["Ghana_5079"]
    np.testing.assert_array_equal(chip.image[:13], data["s2"].astype(np.float32))
    assert chip.image[13, 5, 5] == -10.0 and chip.image[14, 5, 5] == -17.0
    assert not chip.valid[0, 0]  # S1 NaN
    assert not chip.valid[1].any() and (chip.label[1] == IGNORE_INDEX).all()  # label -1
    assert chip.label[5, 5] == 1 and chip.label[20, 20] == 0
    assert chip.valid.sum() == 32 * 32 - 32 - 1
    assert chip.region == "Ghana"
    # EPSG:4326 grid from (-65, -14) with 0.0001 degree pixels: the centre is 16 pixels in
    assert chip.lon == pytest.approx(-65.0 + 0.0016) and chip.lat == pytest.approx(-14.0 - 0.0016)


# TerraMesh -------------------------------------------------------------------------------------------
def test_terramesh_default_modalities_label_and_latlon(tmp_path):
    written = fakes.make_terramesh(tmp_path, size=32)
    source = read_terramesh(tmp_path)
    names = [b.name for b in source.bands]
    assert len(names) == 12 + 2 + 1 and names[:2] == ["B01", "B02"] and "B10" not in names
    assert names[12:] == ["VV", "VH", "DEM"]
    chips = {chip.chip_id: chip for chip in source.chips}
    chip, data = chips["282D_485L_3_3"], written["282D_485L_3_3"]
    np.testing.assert_array_equal(chip.image[:12], data["S2L2A"].astype(np.float32))
    np.testing.assert_allclose(chip.image[12:14], data["S1RTC"])
    assert not chip.valid[0, 0] and chip.valid.sum() == 32 * 32 - 1  # DEM fill value
    expected = (data["LULC"] == 1).astype(np.uint8)
    np.testing.assert_array_equal(chip.label, expected)
    x, y = data["transform"] @ (16, 16)
    lon, lat = wgs84(fakes.UTM_CRS, x, y)
    assert chip.lon == pytest.approx(lon, abs=1e-7) and chip.lat == pytest.approx(lat, abs=1e-7)


def test_terramesh_options(tmp_path):
    fakes.make_terramesh(tmp_path, names=("a",), size=16)
    source = read_terramesh(tmp_path, modalities="S2L1C,S2L2A", class_map="{2: 1}")
    names = [b.name for b in source.bands]
    assert len(names) == 25 and names[0] == "S2L1C_B01" and "B10" in names and "S2L2A_B8A" in names
    chip = next(source.chips)
    classes = np.full((16, 16), 2)
    classes[:8] = 1
    classes[:, -1] = 9
    np.testing.assert_array_equal(chip.label, (classes == 2).astype(np.uint8))
    with pytest.raises(SourceError, match="modalities"):
        read_terramesh(tmp_path, modalities=["S2L2A", "nope"])


def test_terramesh_shape_mismatch_names_both_files(tmp_path):
    fakes.make_terramesh(tmp_path, names=("a",), size=16)
    fakes.write_tif(tmp_path / "DEM" / "a.tif", np.zeros((1, 12, 16), dtype=np.int16))
    with pytest.raises(SourceError, match=r"S2L2A/a\.tif.*DEM/a\.tif"):
        list(read_terramesh(tmp_path).chips)


# CryoSentinel ----------------------------------------------------------------------------------------
def test_cryosentinel_rows_become_chips(tmp_path):
    rows = fakes.make_cryosentinel(tmp_path, rows_per_shard=3, size=32)
    source = read_cryosentinel(tmp_path)
    assert source.total == 6 and len(source.bands) == 15
    chips = {chip.chip_id: chip for chip in source.chips}
    row = rows[4]
    chip = chips[row["chip_id"]]
    s2 = np.frombuffer(row["s2_bytes"], dtype=np.uint16).reshape(12, 32, 32)
    np.testing.assert_array_equal(chip.image[:12], s2.astype(np.float32))
    assert chip.split == row["split"] and chip.region == row["region"] and chip.year == 2023
    assert chip.lat == row["lat"] and chip.extra["lake_id"] == row["lake_id"]
    assert chip.label.sum() == 8 * 8 and chip.valid.all()


def test_cryosentinel_default_shapes_and_nodata(tmp_path):
    import pandas as pd

    row = fakes.cryosentinel_row("c1", "ile", 2022, "test", 224, seed=3)
    s1 = np.frombuffer(row["s1_bytes"], dtype=np.float32).reshape(2, 224, 224).copy()
    s1[0, 10, 10] = np.nan
    dem = np.frombuffer(row["dem_bytes"], dtype=np.int16).reshape(1, 224, 224).copy()
    dem[0, 20, 20] = -32768
    s2 = np.frombuffer(row["s2_bytes"], dtype=np.uint16).reshape(12, 224, 224).copy()
    s2[:, 30, 30] = 0
    row.update(s1_bytes=s1.tobytes(), dem_bytes=dem.tobytes(), s2_bytes=s2.tobytes())
    frame = pd.DataFrame([row]).drop(columns=["s2_shape", "s1_shape", "dem_shape", "mask_shape"])
    (tmp_path / "ile" / "2022").mkdir(parents=True)
    frame.to_parquet(tmp_path / "ile" / "2022" / "shard_000.parquet")
    chip = next(read_cryosentinel(tmp_path).chips)
    assert chip.image.shape == (15, 224, 224)
    invalid = sorted(zip(*np.nonzero(~chip.valid)))
    assert invalid == [(10, 10), (20, 20), (30, 30)]
    assert chip.image[12, 10, 10] == -25.0 and chip.image[14, 20, 20] == -500.0


def test_cryosentinel_truncated_bytes(tmp_path):
    import pandas as pd

    row = fakes.cryosentinel_row("c1", "ile", 2022, "train", 16, seed=0)
    row["s1_bytes"] = row["s1_bytes"][:-4]
    (tmp_path / "ile" / "2022").mkdir(parents=True)
    pd.DataFrame([row]).to_parquet(tmp_path / "ile" / "2022" / "shard_001.parquet")
    with pytest.raises(SourceError, match=r"shard_001\.parquet.*c1.*s1_bytes"):
        list(read_cryosentinel(tmp_path).chips)


# npz -------------------------------------------------------------------------------------------------
def test_ukis_npz_preset_and_multiclass(tmp_path):
    data = fakes.make_npz(tmp_path, size=64)
    source = read_ukis_csmask(tmp_path)
    assert [b.name for b in source.bands] == ["Blue", "Green", "Red", "NIR", "SWIR16", "SWIR22"]
    chip = next(source.chips)
    np.testing.assert_array_equal(chip.image, data["image"])
    assert chip.label.mean() == pytest.approx(16 / 64)  # rows 8..23 are cloud
    chip = next(read_ukis_csmask(tmp_path, class_map={0: 1, 4: 2, "other": 0}).chips)
    assert (chip.label[:8] == 1).all() and (chip.label[8:24] == 2).all() and (chip.label[24:] == 0).all()
    chip = next(read_ukis_csmask(tmp_path, class_map=UKIS_MULTICLASS_MAP).chips)  # clear 0, cloud 1, shadow 2
    assert (chip.label[:8] == 2).all() and (chip.label[8:24] == 1).all() and (chip.label[24:] == 0).all()
    with pytest.raises(SourceError, match=r"landsat7\.npz.*raw label value\(s\) 3 \(2560 px\)"):
        next(read_ukis_csmask(tmp_path, class_map={0: 2, 4: 1}).chips)


def test_npz_chw_layout_tiling_and_band_check(tmp_path):
    data = fakes.make_npz(tmp_path, size=64, layout="CHW")
    source = read_npz(tmp_path, chip_size=32, stride=32, layout="CHW", band_names=list("abcdef"))
    chips = {chip.chip_id: chip for chip in source.chips}
    assert len(chips) == 4
    np.testing.assert_array_equal(chips["landsat7_r32_c0"].image, data["image"][:, 32:, :32])
    assert set(np.unique(chips["landsat7_r0_c0"].label)) == {0, 3, 4}  # raw classes kept without a map
    with pytest.raises(SourceError, match="band_names"):
        read_npz(tmp_path, layout="CHW", band_names=["a", "b"])
    with pytest.raises(SourceError, match=r"landsat7\.npz.*'mask'"):
        list(read_npz(tmp_path, label_key="mask").chips)


# GeoTIFF stack and vector labels ---------------------------------------------------------------------
def test_geotiff_tiles_georeferenced(tmp_path):
    data = fakes.make_geotiff(tmp_path, height=50, width=70, bands=3)
    source = read_geotiff(tmp_path / "image.tif", chip_size=32, stride=16, label="label.tif")
    chips = {chip.chip_id: chip for chip in source.chips}
    assert len(chips) == 3 * 4 == source.total  # rows 0,16,18; cols 0,16,32,38
    label = np.full((50, 70), 99)
    for chip in chips.values():
        _, row, col = chip.chip_id.rsplit("_", 2)
        r, c = int(row[1:]), int(col[1:])
        label[r : r + 32, c : c + 32] = chip.label
        window = data["image"][:, r : r + 32, c : c + 32]
        np.testing.assert_array_equal(chip.image[:, chip.valid], window[:, chip.valid])
    expected = data["label"].copy()
    assert (label == expected).all()
    first = chips["image_r0_c0"]
    assert not first.valid[0, 0] and first.valid.sum() == 32 * 32 - 1
    lon, lat = wgs84(data["crs"], *(data["transform"] @ (16, 16)))
    assert first.lon == pytest.approx(lon, abs=1e-7) and first.lat == pytest.approx(lat, abs=1e-7)
    corner = chips["image_r18_c38"]
    lon, lat = wgs84(data["crs"], *(data["transform"] @ (38 + 16, 18 + 16)))
    assert corner.lon == pytest.approx(lon, abs=1e-7) and corner.lat == pytest.approx(lat, abs=1e-7)


def test_geotiff_shape_mismatch_and_corrupt_file(tmp_path):
    data = fakes.make_geotiff(tmp_path, height=40, width=40)
    fakes.write_tif(tmp_path / "small_label.tif", np.zeros((30, 40), np.uint8), data["transform"], data["crs"])
    with pytest.raises(SourceError, match=r"image\.tif.*small_label\.tif"):
        read_geotiff(tmp_path / "image.tif", label="small_label.tif")
    (tmp_path / "broken.tif").write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(SourceError, match=r"broken\.tif"):
        read_geotiff(tmp_path / "broken.tif", label="label.tif")


def test_vector_votes_and_consensus(tmp_path):
    grid = fakes.make_geotiff(tmp_path / "img", height=40, width=40, bands=2)
    squares = [[(0, 0, 10)], [(5, 5, 10)], [(5, 5, 10), (30, 30, 4)]]
    files = fakes.make_vector_labels(tmp_path / "labels", grid, squares)  # written in EPSG:4326
    source = read_vector(tmp_path / "img" / "image.tif", labels=[str(p) for p in files])
    chip = next(source.chips)
    expected = np.zeros((40, 40), dtype=int)
    for annotator in squares:
        mask = np.zeros((40, 40), dtype=int)
        for row, col, side in annotator:
            mask[row : row + side, col : col + side] = 1
        expected += mask
    np.testing.assert_array_equal(chip.planes["votes"], expected)
    np.testing.assert_array_equal(chip.label, (expected >= 2).astype(np.uint8))
    union = next(
        read_vector(tmp_path / "img" / "image.tif", labels=str(tmp_path / "labels/*/*.geojson"), min_votes=1).chips
    )
    np.testing.assert_array_equal(union.label, (expected >= 1).astype(np.uint8))
    with pytest.raises(SourceError, match="min_votes"):
        read_vector(tmp_path / "img" / "image.tif", labels=[str(p) for p in files], min_votes=4)


# ingest ----------------------------------------------------------------------------------------------
def test_ingest_writes_store_and_reports(tmp_path):
    written = fakes.make_landslide4sense(tmp_path / "raw", n=4, extra_masks=1, size=32, nan_image=3)
    report = ingest("landslide4sense", tmp_path / "raw", tmp_path / "store", progress=False)
    assert report.n_chips == 3
    assert len(report.skipped) == 1 and "image_3.h5" in report.skipped[0][1]
    assert len(report.unpaired) == 1 and "mask_5.h5" in report.unpaired[0]
    catalog = read_catalog(tmp_path / "store")
    assert list(catalog["chip_id"]) == ["TrainData_image_1", "TrainData_image_2", "TrainData_image_4"]
    ds = open_store(tmp_path / "store")
    np.testing.assert_array_equal(ds.image.isel(chip=1).values, np.moveaxis(written[2][0], -1, 0))
    assert list(ds.band.values)[-2:] == ["slope", "DEM"]
    meta = read_store_meta(tmp_path / "store")
    assert meta["attrs"]["format"] == "landslide4sense" and len(meta["attrs"]["unpaired"]) == 1
    with pytest.raises(FileExistsError):
        ingest("landslide4sense", tmp_path / "raw", tmp_path / "store", progress=False)


def test_ingest_failure_leaves_no_store(tmp_path):
    fakes.make_landslide4sense(tmp_path / "raw", n=3, extra_masks=0, size=16)
    (tmp_path / "raw" / "TrainData" / "img" / "image_3.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(SourceError, match=r"image_3\.h5"):
        ingest("landslide4sense", tmp_path / "raw", tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_ingest_rejects_unknown_format_and_option(tmp_path):
    with pytest.raises(UnknownFormatError, match="landslide4sense") as info:
        ingest("hdf4", tmp_path, tmp_path / "store")
    assert all(name in str(info.value) for name in FORMATS)
    with pytest.raises(ValueError, match="class_map"):
        ingest("cloud38", tmp_path, tmp_path / "store", colour="red")
    assert "class_map" in reader_options("terramesh") and "modalities" in reader_options("terramesh")


def test_ingest_options_from_command_line_strings(tmp_path):
    fakes.make_npz(tmp_path / "raw", size=32)
    options = parse_options(["class_map={0: 1, 4: 2, other: 0}", "band_names=[a, b, c, d, e, f]", "layout=HWC"])
    assert options["class_map"] == {0: 1, 4: 2, "other": 0} and parse_option("chip=3") == ("chip", 3)
    report = ingest("npz", tmp_path / "raw", tmp_path / "store", chip_size=16, progress=False, **options)
    assert report.n_chips == 4
    catalog = read_catalog(tmp_path / "store")
    assert catalog["positive_fraction"].max() == 1.0  # the first 8 rows are shadow, class 1


# real samples ----------------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_real_38cloud_sample(shared_data, tmp_path):
    report = ingest("cloud38", shared_data / "38cloud-sample", tmp_path / "store", progress=False)
    assert report.n_chips == 1 and report.unpaired == []
    catalog = read_catalog(tmp_path / "store")
    assert catalog["positive_fraction"].iloc[0] == pytest.approx(0.307, abs=0.001)


@pytest.mark.shared_data
def test_real_terramesh_examples(shared_data, tmp_path):
    ingest("terramesh", shared_data / "terramesh-examples", tmp_path / "store", progress=False)
    catalog = read_catalog(tmp_path / "store").set_index("chip_id")
    assert catalog.loc["282D_485L_3_3", "positive_fraction"] == pytest.approx(0.518, abs=0.001)
    assert catalog.loc["433D_629L_3_1", "positive_fraction"] == pytest.approx(0.062, abs=0.001)
    assert (catalog.drop(index=["282D_485L_3_3", "433D_629L_3_1"])["positive_fraction"] == 0).all()
    # Major TOM cell names: <rows>D/U = 10 km rows south/north of the equator
    for name, lat in zip(catalog.index, catalog["lat"]):
        cell = str(name).split("_")[0]
        rows = int(cell[:-1]) * (-1 if cell[-1] == "D" else 1)
        assert lat == pytest.approx(rows * 10 / 111.2, abs=0.15)
    lons = dict(zip(catalog.index, catalog["lon"]))
    assert lons["282D_485L_3_3"] < 0 < lons["637U_59R_1_3"]


@pytest.mark.shared_data
def test_real_ukis_csmask(shared_data, tmp_path):
    ingest("ukis-csmask", shared_data / "ukis-csmask", tmp_path / "store", progress=False)
    catalog = read_catalog(tmp_path / "store").set_index("chip_id")
    assert catalog.loc["landsat7", "positive_fraction"] == pytest.approx(0.36, abs=0.005)
    assert catalog.loc["landsat5", "positive_fraction"] == pytest.approx(0.33, abs=0.005)


@pytest.mark.shared_data
def test_real_rts_multi_annotator_fractions(shared_data, tmp_path):
    root = shared_data / "rts-labeling-intercomparison"
    image = root / "01_Setup" / "Peel" / "data" / "S2_20210821T210019_20210821T210020_T08WMA.tif"
    experts = sorted((root / "02_UserResults").glob("*/Peel_digitized.shp"))
    assert len(experts) == 12
    report = ingest("vector", image, tmp_path / "store", labels=[str(p) for p in experts], progress=False)
    assert report.n_chips == 1
    ds = open_store(tmp_path / "store")
    votes = ds["votes"].values[0]
    assert votes.shape == (251, 251) and votes.max() <= 12
    assert (votes > 0).mean() == pytest.approx(0.116, abs=0.01)  # covered by any expert
    assert ds.label.values[0].mean() == pytest.approx(0.052, abs=0.01)  # by a majority
    import rasterio

    with rasterio.open(image) as src:
        fractions = [rasterize_polygons(read_polygons(p, src.crs), src.shape, src.transform).mean() for p in experts]
    assert min(fractions) == pytest.approx(0.035, abs=0.01) and max(fractions) == pytest.approx(0.097, abs=0.01)

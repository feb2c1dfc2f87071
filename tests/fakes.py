"""Small fake data sets written in the exact on-disk layouts of the real ones, for reader tests.

Every generator writes into `root` and returns the arrays it wrote (or what a test needs to know about
them), so tests can compare what a reader produced with what was put on disk. Values are chosen so that
band order and pixel position are recognisable: band b of a sample holds ``(b + 1) * 100 + offset``
plus a ramp along x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

L8_SCENE = "LC08_L1TP_002053_20160520_20170324_01_T1"
UTM_CRS = "EPSG:32722"
UTM_ORIGIN = (790236.04, 7198039.25)  # upper-left corner (x, y) of a TerraMesh example tile


def band_pattern(n_bands: int, height: int, width: int, offset: float = 0.0) -> np.ndarray:
    """(band, y, x) float32 with band b = (b + 1) * 100 + offset + x."""
    ramp = np.broadcast_to(np.arange(width, dtype=np.float32), (height, width))
    return np.stack([(b + 1) * 100.0 + offset + ramp for b in range(n_bands)]).astype(np.float32)


def square_label(height: int, width: int, top: int, left: int, side: int) -> np.ndarray:
    """(y, x) uint8 with a square of ones."""
    label = np.zeros((height, width), dtype=np.uint8)
    label[top : top + side, left : left + side] = 1
    return label


def write_tif(path: Path, data: np.ndarray, transform: Any = None, crs: Any = None, nodata: Any = None) -> Path:
    """Write (band, y, x) or (y, x) data as a GeoTIFF (no georeference when transform is None)."""
    import rasterio

    data = data[None] if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype.name,
    }
    if transform is not None:
        profile.update(transform=transform, crs=crs)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def utm_transform(x0: float = UTM_ORIGIN[0], y0: float = UTM_ORIGIN[1], pixel: float = 10.0) -> Any:
    """North-up affine transform with square pixels."""
    from rasterio.transform import from_origin

    return from_origin(x0, y0, pixel, pixel)


# Landslide4Sense ----------------------------------------------------------------------------------------
def make_landslide4sense(
    root: Path, n: int = 4, extra_masks: int = 1, layout: str = "split", size: int = 128, nan_image: int | None = None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """image_<n>.h5 ("img" (size, size, 14) float32) and mask_<n>.h5 ("mask" (size, size) uint8).

    layout "split": <root>/TrainData/{img,mask}/ (plus `extra_masks` masks without an image); "flat": all
    files in <root>. `nan_image` makes that image all NaN. Returns {n: (img HWC, mask)}.
    """
    import h5py

    img_dir = root / "TrainData" / "img" if layout == "split" else root
    mask_dir = root / "TrainData" / "mask" if layout == "split" else root
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for number in range(1, n + 1):
        image = np.moveaxis(band_pattern(14, size, size, offset=number), 0, -1).copy()
        if number == nan_image:
            image[:] = np.nan
        mask = square_label(size, size, number, 2 * number, size // 4)
        with h5py.File(img_dir / f"image_{number}.h5", "w") as handle:
            handle.create_dataset("img", data=image)
        with h5py.File(mask_dir / f"mask_{number}.h5", "w") as handle:
            handle.create_dataset("mask", data=mask)
        written[number] = (image, mask)
    for number in range(n + 1, n + 1 + extra_masks):
        with h5py.File(mask_dir / f"mask_{number}.h5", "w") as handle:
            handle.create_dataset("mask", data=np.zeros((size, size), dtype=np.uint8))
    return written


# 38-Cloud -------------------------------------------------------------------------------------------------
def cloud38_patch_name(number: int, row: int = 1, col: int = 1) -> str:
    """patch_<n>_<row>_by_<col>_<scene>, as 38-Cloud names its patches."""
    return f"patch_{number}_{row}_by_{col}_{L8_SCENE}"


def make_cloud38(
    root: Path, splits: tuple[str, ...] = ("train", "test"), n: int = 2, size: int = 32, single_folder: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """38-Cloud patches: per-band folders <root>/<split>_{red,green,blue,nir,gt} (no gt for test), or with
    `single_folder` the sample layout {band}_patch_<rest>.TIF in <root>.

    Bands uint16 red=100+x, green=200+x, blue=300+x, nir=400+x (+ patch number); gt 255 on a square, the
    top-left 4x4 pixels are 0 in every band (scene frame = nodata). Returns {chip stem: (image, gt)}.
    """
    written = {}
    for split in splits:
        for number in range(1, n + 1):
            rest = cloud38_patch_name(number)
            image = band_pattern(4, size, size, offset=number).astype(np.uint16)
            image[:, :4, :4] = 0
            gt = square_label(size, size, 8, 8, size // 2) * np.uint8(255)
            for band, data in zip(("red", "green", "blue", "nir", "gt"), (*image, gt)):
                if band == "gt" and split == "test" and not single_folder:
                    continue
                folder = root if single_folder else root / f"{split}_{band}"
                write_tif(folder / f"{band}_{rest}.TIF", data)
            written[rest if single_folder else f"{split}_{rest}"] = (image, gt)
        if single_folder:
            break
    return written


# Sen1Floods11 ---------------------------------------------------------------------------------------------
def make_sen1floods11(
    root: Path, keys: tuple[str, ...] = ("Bolivia_103757", "Ghana_5079"), size: int = 32
) -> dict[str, dict[str, Any]]:
    """<root>/{S2Hand,S1Hand,LabelHand}/<event>_<id>_<kind>.tif in EPSG:4326.

    S2 int16 13 bands, S1 float32 VV/VH with NaN at pixel (0, 0), label int16 with -1 in row 1 and a water
    square. Returns {key: {"s2", "s1", "label", "transform"}}.
    """
    from rasterio.transform import from_origin

    written = {}
    for index, key in enumerate(keys):
        transform = from_origin(-66.0 + index, -14.0, 0.0001, 0.0001)
        s2 = band_pattern(13, size, size, offset=index).astype(np.int16)
        s1 = np.stack([np.full((size, size), -10.0), np.full((size, size), -17.0)]).astype(np.float32)
        s1[:, 0, 0] = np.nan
        label = square_label(size, size, 4, 4, 8).astype(np.int16)
        label[1, :] = -1
        write_tif(root / "S2Hand" / f"{key}_S2Hand.tif", s2, transform, "EPSG:4326")
        write_tif(root / "S1Hand" / f"{key}_S1Hand.tif", s1, transform, "EPSG:4326")
        write_tif(root / "LabelHand" / f"{key}_LabelHand.tif", label, transform, "EPSG:4326")
        written[key] = {"s2": s2, "s1": s1, "label": label, "transform": transform}
    return written


# TerraMesh ------------------------------------------------------------------------------------------------
TERRAMESH_BANDS = {"S2L1C": (13, np.int16), "S2L2A": (12, np.int16), "S1RTC": (2, np.float64), "DEM": (1, np.int16)}


def make_terramesh(
    root: Path, names: tuple[str, ...] = ("282D_485L_3_3", "38D_378R_2_3"), size: int = 32, lulc: bool = True
) -> dict[str, dict[str, Any]]:
    """<root>/{S2L1C,S2L2A,S1RTC,DEM,LULC}/<name>.tif, UTM zone 22S, 10 m, like the TerraMesh examples.

    LULC uint8: class 1 (water) on the top half, 2 (trees) elsewhere, 9 in the last column. The DEM holds
    -32768 (fill) at pixel (0, 0). Returns {name: {modality: array, "transform": ...}}.
    """
    written: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names):
        transform = utm_transform(UTM_ORIGIN[0] + 5000 * index, UTM_ORIGIN[1])
        arrays: dict[str, Any] = {"transform": transform}
        for modality, (count, dtype) in TERRAMESH_BANDS.items():
            data = band_pattern(count, size, size, offset=index)
            if modality == "S1RTC":
                data = -data / 100.0
            data = data.astype(dtype)
            if modality == "DEM":
                data[0, 0, 0] = -32768
            write_tif(root / modality / f"{name}.tif", data, transform, UTM_CRS)
            arrays[modality] = data
        if lulc:
            classes = np.full((size, size), 2, dtype=np.uint8)
            classes[: size // 2] = 1
            classes[:, -1] = 9
            write_tif(root / "LULC" / f"{name}.tif", classes, transform, UTM_CRS)
            arrays["LULC"] = classes
        written[name] = arrays
    return written


# CryoSentinel ---------------------------------------------------------------------------------------------
def cryosentinel_row(chip_id: str, region: str, year: int, split: str, size: int, seed: int) -> dict[str, Any]:
    """One shard row with raw array bytes and list-valued shape columns."""
    rng = np.random.default_rng(seed)
    s2 = rng.integers(1, 5000, size=(12, size, size)).astype(np.uint16)
    s1 = rng.normal(-12, 3, size=(2, size, size)).astype(np.float32)
    dem = rng.integers(3000, 4000, size=(1, size, size)).astype(np.int16)
    mask = square_label(size, size, 2, 2, size // 4)
    return {
        "chip_id": chip_id,
        "region": region,
        "snapshot_year": year,
        "split": split,
        "lake_id": f"lake_{seed}",
        "lat": 43.0 + seed / 100,
        "lon": 77.0 + seed / 100,
        "water_frac": float(mask.mean()),
        "s2_bytes": s2.tobytes(),
        "s1_bytes": s1.tobytes(),
        "dem_bytes": dem.tobytes(),
        "mask_bytes": mask.tobytes(),
        "s2_shape": list(s2.shape),
        "s1_shape": list(s1.shape),
        "dem_shape": list(dem.shape),
        "mask_shape": list(mask.shape),
    }


def make_cryosentinel(
    root: Path,
    regions: tuple[str, ...] = ("zhetysu", "ile"),
    year: int = 2023,
    rows_per_shard: int = 2,
    size: int = 224,
    shape_columns: bool = True,
) -> list[dict[str, Any]]:
    """<root>/<region>/<year>/shard_000.parquet with `rows_per_shard` chips each; returns the rows."""
    import pandas as pd

    rows_written = []
    seed = 0
    for region in regions:
        rows = []
        for k in range(rows_per_shard):
            split = ("train", "val", "test")[k % 3]
            rows.append(cryosentinel_row(f"{region}_{year}_{k:04d}", region, year, split, size, seed))
            seed += 1
        frame = pd.DataFrame(rows)
        if not shape_columns:
            frame = frame.drop(columns=[c for c in frame.columns if c.endswith("_shape")])
        folder = root / region / str(year)
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(folder / "shard_000.parquet", index=False)
        rows_written.extend(rows)
    return rows_written


# npz ------------------------------------------------------------------------------------------------------
def make_npz(root: Path, name: str = "landsat7", size: int = 64, layout: str = "HWC") -> dict[str, np.ndarray]:
    """<root>/<name>.npz like ukis-csmask: img (size, size, 6) float32, msk (size, size, 1) uint8 with
    0 = shadow (rows 0..7), 4 = cloud (rows 8..23), 3 = clear elsewhere."""
    image = band_pattern(6, size, size) / 1000.0
    mask = np.full((size, size), 3, dtype=np.uint8)
    mask[:8] = 0
    mask[8:24] = 4
    img = np.moveaxis(image, 0, -1) if layout == "HWC" else image
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / f"{name}.npz", img=img.astype(np.float32), msk=mask[..., None])
    return {"image": image.astype(np.float32), "mask": mask}


# GeoTIFF stack --------------------------------------------------------------------------------------------
def make_geotiff(root: Path, height: int = 50, width: int = 70, bands: int = 3) -> dict[str, Any]:
    """<root>/image.tif (bands x height x width float32, nodata -9999 at pixel (0, 0)) and <root>/label.tif
    (uint8, a square of ones, 255 = label nodata at (0, 1)), UTM zone 22S, 10 m."""
    transform = utm_transform()
    image = band_pattern(bands, height, width)
    image[:, 0, 0] = -9999
    label = square_label(height, width, 10, 20, 15)
    label[0, 1] = 255
    write_tif(root / "image.tif", image, transform, UTM_CRS, nodata=-9999)
    write_tif(root / "label.tif", label, transform, UTM_CRS, nodata=255)
    return {"image": image, "label": label, "transform": transform, "crs": UTM_CRS}


def make_vector_labels(root: Path, geotiff: dict[str, Any], squares: list[list[tuple[int, int, int]]]) -> list[Path]:
    """One GeoJSON per annotator in EPSG:4326, each a list of (row, col, side) pixel squares on the grid
    of `geotiff` (from make_geotiff). Returns the files."""
    import geopandas as gpd
    from shapely.geometry import box

    transform = geotiff["transform"]
    paths = []
    for index, annotator in enumerate(squares):
        polygons = []
        for row, col, side in annotator:
            x0, y0 = transform @ (col, row)
            x1, y1 = transform @ (col + side, row + side)
            polygons.append(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        frame = gpd.GeoDataFrame({"id": list(range(len(polygons)))}, geometry=polygons, crs=geotiff["crs"])
        path = root / f"annotator_{index + 1:02d}" / "labels.geojson"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_crs("EPSG:4326").to_file(path, driver="GeoJSON")
        paths.append(path)
    return paths


# ImpactMesh-Flood -----------------------------------------------------------------------------------------
IMPACTMESH_MODALITIES = {"S2L2A": 12, "S1RTC": 2, "DEM": 1}
IMPACTMESH_S2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


def impactmesh_band_names(timesteps: int = 4) -> list[str]:
    """Band names of the stack: the 15 bands of each time step with the suffix _t<k>."""
    return [f"{band}_t{k}" for k in range(timesteps) for band in [*IMPACTMESH_S2, "VV", "VH", "DEM"]]


def make_impactmesh(root: Path, size: int = 64, timesteps: int = 4, seed: int = 0) -> dict[str, Any]:
    """<root>/<modality>_t<k>.tif for each time step k (S2L2A 12 bands, S1RTC VV/VH in dB, DEM) and
    <root>/label.tif (water 1 on a disc, dark in S2 and S1), UTM zone 22S, 10 m. `files` lists the images in
    the band order of `impactmesh_band_names` (pass them as the geotiff reader's `images` option); the file
    stems are the modality labels (S2L2A_t0, ...)."""
    rng = np.random.default_rng(seed)
    transform = utm_transform()
    yy, xx = np.mgrid[0:size, 0:size]
    water = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 4) ** 2).astype(np.uint8)
    files = []
    for k in range(timesteps):
        for modality, count in IMPACTMESH_MODALITIES.items():
            if modality == "S2L2A":
                data = rng.normal(2000, 300, (count, size, size)) * np.where(water, 0.2, 1.0)
            elif modality == "S1RTC":
                data = rng.normal(-10, 1.5, (count, size, size)) - 10 * water
            else:
                data = 1000 + 0.5 * xx[None] + rng.normal(0, 1, (1, size, size))
            files.append(write_tif(root / f"{modality}_t{k}.tif", data.astype(np.float32), transform, UTM_CRS))
    write_tif(root / "label.tif", water, transform, UTM_CRS)
    return {"files": files, "label": water, "bands": impactmesh_band_names(timesteps)}

"""Benchmark: reading training batches from per-chip HDF5 files versus from the chip store.

Landslide4Sense ships one HDF5 file per patch (plus one per mask), so a data loader opens two files per
chip; the store keeps all chips in one chunked Zarr array. The benchmark writes a Landslide4Sense-layout
folder of random patches, ingests it, and times the same random batches (sorted chip indices, one read
per array and batch) through h5py, through the store's chunk reader (what the data loader uses) and
through xarray (`open_store`, convenient for exploration).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.ingest import ingest
from workbench.data.sources.landslide4sense import BANDS as L4S_BANDS
from workbench.data.store import ChipReader, open_store, read_catalog

PATCH = 128


def write_landslide4sense_folder(root: Path, n_chips: int, seed: int = 0) -> None:
    """<root>/img/image_<n>.h5 ((128, 128, 14) float32) and <root>/mask/mask_<n>.h5 ((128, 128) uint8)."""
    import h5py

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(parents=True, exist_ok=True)
    for number in range(1, n_chips + 1):
        image = rng.normal(1.0, 0.3, size=(PATCH, PATCH, len(L4S_BANDS))).astype(np.float32)
        mask = (rng.random((PATCH, PATCH)) < 0.05).astype(np.uint8)
        with h5py.File(root / "img" / f"image_{number}.h5", "w") as handle:
            handle.create_dataset("img", data=image)
        with h5py.File(root / "mask" / f"mask_{number}.h5", "w") as handle:
            handle.create_dataset("mask", data=mask)


def _seconds_per_batch(read: Callable[[np.ndarray], Any], batches: list[np.ndarray]) -> float:
    read(batches[0])  # warm-up: imports, file-system cache, dask graph code paths
    start = time.perf_counter()
    for batch in batches:
        read(batch)
    return (time.perf_counter() - start) / len(batches)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_store_vs_hdf5(
    tmp_dir: Path, n_chips: int = 256, batch_size: int = 16, n_batches: int = 30, seed: int = 0
) -> dict[str, Any]:
    """Seconds per batch reading (image, label, valid) from per-chip HDF5 files and from the store.

    Returns the timings of each path, the ratios HDF5 / store (xarray, zarr, and the faster of the two),
    the same zarr read of an uncompressed copy (what the store's compression costs) and the on-disk sizes.
    All paths read the same chips; the HDF5 reads are transposed to (band, y, x) as a loader would.
    """
    import h5py

    tmp_dir = Path(tmp_dir)
    raw, store = tmp_dir / "landslide4sense", tmp_dir / "store"
    write_landslide4sense_folder(raw, n_chips, seed)
    ingest("landslide4sense", raw, store, overwrite=True, progress=False)
    catalog = read_catalog(store)
    image_files = [Path(path) for path in catalog["file"]]
    mask_files = [path.parent.parent / "mask" / path.name.replace("image_", "mask_") for path in image_files]
    rng = np.random.default_rng(seed)
    size = min(batch_size, n_chips)
    batches = [np.sort(rng.choice(n_chips, size=size, replace=False)) for _ in range(n_batches)]

    def read_hdf5(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, masks = [], []
        for index in batch:
            with h5py.File(image_files[index], "r") as handle:
                images.append(np.moveaxis(handle["img"][()], -1, 0))
            with h5py.File(mask_files[index], "r") as handle:
                masks.append(handle["mask"][()])
        return np.stack(images), np.stack(masks)

    dataset = open_store(store)

    def read_xarray(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        selected = dataset[["image", "label", "valid"]].isel(chip=batch)
        return selected["image"].values, selected["label"].values, selected["valid"].values

    readers = [ChipReader(store, name) for name in ("image", "label", "valid")]

    def read_store(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        # what ChipDataset does for every chip of a batch: one file read per array, no decoding
        return tuple(np.stack([reader.read(int(index)) for index in batch]) for reader in readers)

    first_h5, first_store = read_hdf5(batches[0]), read_store(batches[0])
    if not np.array_equal(first_h5[0], first_store[0]) or not np.array_equal(first_h5[1], first_store[1]):
        raise RuntimeError("the store and the HDF5 files disagree on the benchmark chips")
    hdf5 = _seconds_per_batch(read_hdf5, batches)
    store_path = _seconds_per_batch(read_store, batches)
    xarray_path = _seconds_per_batch(read_xarray, batches)
    return {
        "n_chips": n_chips,
        "batch_size": size,
        "n_batches": n_batches,
        "chip_shape": [len(L4S_BANDS), PATCH, PATCH],
        "hdf5_s_per_batch": hdf5,
        "store_s_per_batch": store_path,
        "store_xarray_s_per_batch": xarray_path,
        "ratio": hdf5 / store_path,
        "ratio_xarray": hdf5 / xarray_path,
        "goal_ratio_min": 10.0,
        "hdf5_bytes": _folder_bytes(raw),
        "store_bytes": _folder_bytes(store),
    }

"""Direct chip reads (sharded and per-chip-file stores) checked against zarr-python, and batched dataset fetches."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch.utils.data import DataLoader, default_collate

from workbench.data.augment import Augmenter
from workbench.data.dataset import ChipDataset
from workbench.data.normalize import NormalizationStats
from workbench.data.store import BandSpec, Chip, ChipReader, StoreError, StoreWriter, aligned_empty, read_store_meta
from workbench.params import AugmentConfig

BANDS = [BandSpec("B02", "S2L2A", True), BandSpec("B03", "S2L2A", True), BandSpec("VV", "S1GRD", False)]
N_CHIPS = 11
SHARD = 4


def make_chips(n: int = N_CHIPS, size: int = 8) -> list[Chip]:
    rng = np.random.default_rng(7)
    chips = []
    for i in range(n):
        image = rng.normal(size=(len(BANDS), size, size)).astype(np.float32)
        label = (image[0] > 0.3).astype(np.uint8) if i != 2 else np.zeros((size, size), np.uint8)
        valid = np.ones((size, size), bool)
        valid[: i % 3, :] = False  # some chips have nodata rows
        chips.append(Chip(f"c{i}", image, label, valid, lat=0.0, lon=0.0))
    return chips


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("reader") / "store"
    with StoreWriter(dest, BANDS, source="unit", shard_chips=SHARD, flush_every=3) as writer:  # flushes cut shards
        for chip in make_chips():
            writer.append(chip)
    return dest


@pytest.fixture(scope="module")
def per_chip_store(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Path:
    """The same chips in the version-1 layout: one chunk file per chip and array, no shards."""
    dest = tmp_path_factory.mktemp("reader") / "v1"
    shutil.copytree(store, dest)
    shutil.rmtree(dest / "chips.zarr")
    source = xr.open_zarr(store / "chips.zarr", consolidated=False).load()
    encoding = {name: {"chunks": (1, *source[name].shape[1:]), "compressors": None} for name in source.data_vars}
    source.to_zarr(dest / "chips.zarr", mode="w", consolidated=False, encoding=encoding)
    return dest


def expected_array(store: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(store / "chips.zarr" / name), mode="r")[:])


# layouts -------------------------------------------------------------------------------------------------
def test_writer_groups_chips_into_shards(store: Path) -> None:
    reader = ChipReader(store, "image")
    assert reader.sharded and reader.direct and reader.shard_chips == SHARD
    assert read_store_meta(store)["shard_chips"] == SHARD
    assert len(reader.files()) == -(-N_CHIPS // SHARD)  # ceil(11 / 4) = 3 files instead of 11
    chunk = len(BANDS) * 8 * 8 * 4
    full_shard = os.path.getsize(reader.files()[0])
    assert full_shard == SHARD * chunk + SHARD * 16 + 4  # chunks, then (offset, size) per chunk and a CRC32C


def test_sharded_store_holds_the_written_chips(store: Path) -> None:
    # flushes of 3 chips cut across shards of 4, so zarr rewrote partial shards; nothing may be lost
    chips = make_chips()
    image, label, valid = (ChipReader(store, name).read_batch(range(N_CHIPS)) for name in ("image", "label", "valid"))
    for i, chip in enumerate(chips):
        np.testing.assert_array_equal(image[i], np.where(chip.valid[None], chip.image, 0))
        np.testing.assert_array_equal(label[i], chip.label)
        np.testing.assert_array_equal(valid[i], chip.valid)


def test_writer_streams_one_shard_at_a_time(tmp_path: Path) -> None:
    # memory stays bounded: chips are written to disk shard by shard, never all held until the end
    with StoreWriter(tmp_path / "s", BANDS, shard_chips=SHARD) as writer:
        for number, chip in enumerate(make_chips(10), start=1):
            writer.append(chip)
            assert len(writer._buffer) == number % SHARD
            assert writer._written == number - number % SHARD
        assert writer._tmp is not None
        on_disk = zarr.open_array(str(writer._tmp / "chips.zarr" / "image"), mode="r")
        assert on_disk.shape[0] == 8  # two full shards already in the temporary store
    assert ChipReader(tmp_path / "s", "image").shape[0] == 10


def test_default_shard_size_follows_chip_bytes(tmp_path: Path) -> None:
    from workbench.data.store import MAX_SHARD_CHIPS, SHARD_TARGET_BYTES

    with StoreWriter(tmp_path / "s", BANDS) as writer:
        for chip in make_chips(3):
            writer.append(chip)
    expected = min(MAX_SHARD_CHIPS, SHARD_TARGET_BYTES // (len(BANDS) * 8 * 8 * 4))
    assert ChipReader(tmp_path / "s", "image").shard_chips == expected == MAX_SHARD_CHIPS


@pytest.mark.parametrize("layout", ["sharded", "per_chip"])
def test_chip_reader_matches_zarr_python(layout: str, store: Path, per_chip_store: Path) -> None:
    path = store if layout == "sharded" else per_chip_store
    for name in ("image", "label", "valid"):
        expected = expected_array(path, name)
        reader = ChipReader(path, name)
        assert reader.direct and reader.sharded == (layout == "sharded")
        for chip in range(N_CHIPS):
            np.testing.assert_array_equal(reader.read(chip), expected[chip])
        np.testing.assert_array_equal(reader.read_batch([10, 0, 5, 4]), expected[[10, 0, 5, 4]])
        out = np.zeros((2, *expected.shape[1:]), dtype=expected.dtype)
        assert reader.read_batch(np.array([1, 3]), out=out) is out
        np.testing.assert_array_equal(out, expected[[1, 3]])


def test_all_background_label_chip_reads_as_zeros(store: Path) -> None:
    # zarr does not store a chunk equal to the fill value; its index entry is empty and reads as the fill
    assert (ChipReader(store, "label").read(2) == 0).all()
    assert (expected_array(store, "label")[2] == 0).all()


def test_reader_falls_back_to_zarr_for_compressed_arrays(tmp_path: Path, store: Path) -> None:
    source = xr.open_zarr(store / "chips.zarr", consolidated=False).load()
    dest = tmp_path / "compressed"
    shutil.copytree(store, dest)
    shutil.rmtree(dest / "chips.zarr")
    source.to_zarr(dest / "chips.zarr", mode="w", consolidated=False, encoding={"image": {"chunks": (2, 3, 8, 8)}})
    reader = ChipReader(dest, "image")
    assert not reader.direct
    np.testing.assert_array_equal(reader.read_batch([7, 1]), expected_array(store, "image")[[7, 1]])


# bad input ---------------------------------------------------------------------------------------------
def test_reader_rejects_bad_output_and_positions(store: Path) -> None:
    reader = ChipReader(store, "image")
    with pytest.raises(ValueError, match="C-contiguous float32 array of shape"):
        reader.read(0, out=np.empty((3, 8, 8), np.float64))
    with pytest.raises(IndexError, match="outside"):
        reader.read(N_CHIPS)
    with pytest.raises(ValueError, match="room for"):
        reader.read_batch([0, 1], out=np.empty((3, 3, 8, 8), np.float32))


def test_corrupt_shard_index_is_refused_and_missing_shard_reads_fill(tmp_path: Path, store: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    reader = ChipReader(copy, "image")
    first = Path(reader.chunk_file(0))
    data = bytearray(first.read_bytes())
    data[-10] ^= 0xFF  # flip a byte of the chunk index
    first.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"CRC32C.*rewrite the store") as error:
        reader.read(1)
    assert str(first) in str(error.value)
    second = Path(reader.chunk_file(SHARD))
    second.write_bytes(second.read_bytes()[: 2 * 16 + 4])  # too short for its index
    with pytest.raises(StoreError, match="too few for its chunk index"):
        ChipReader(copy, "image").read(SHARD)
    os.remove(reader.chunk_file(2 * SHARD))
    assert np.isnan(ChipReader(copy, "image").read(2 * SHARD)).all()  # a missing shard holds the fill value (NaN)


def test_truncated_shard_is_refused(tmp_path: Path, store: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shard = Path(ChipReader(copy, "image").chunk_file(0))
    data = shard.read_bytes()
    index = data[-(SHARD * 16 + 4) :]
    shard.write_bytes(data[:100] + index)  # the index still points at the chunks that were cut away
    with pytest.raises(StoreError, match="past the end of the file"):
        ChipReader(copy, "image").read(0)


def test_per_chip_layout_wrong_size_is_refused(tmp_path: Path, per_chip_store: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(per_chip_store, copy)
    reader = ChipReader(copy, "image")
    Path(reader.chunk_file(1)).write_bytes(b"\0" * 10)
    with pytest.raises(StoreError, match="holds 10 bytes, expected 768"):
        reader.read(1)
    os.remove(reader.chunk_file(3))
    assert np.isnan(reader.read(3)).all()


# processes ---------------------------------------------------------------------------------------------
def test_reader_keeps_few_shards_open_and_survives_pickling(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workbench.data.store as store_module

    monkeypatch.setattr(store_module, "MAX_OPEN_SHARDS", 2)
    reader = ChipReader(store, "image")
    expected = expected_array(store, "image")
    np.testing.assert_array_equal(reader.read_batch(range(N_CHIPS)), expected)
    assert len(reader._shards) == 2  # least recently used shard closed
    clone = pickle.loads(pickle.dumps(reader))
    assert len(clone._shards) == 0
    np.testing.assert_array_equal(clone.read(9), expected[9])
    reader.close()
    assert len(reader._shards) == 0
    np.testing.assert_array_equal(reader.read(0), expected[0])  # reopened on demand


# batched dataset fetches ---------------------------------------------------------------------------------
def augmented_dataset(store: Path, bands: list[str] | None = None) -> ChipDataset:
    stats = NormalizationStats(["B02", "B03", "VV"], "zscore", mean=[0.1, -0.2, 0.3], std=[1.5, 0.5, 2.0])
    if bands is not None:
        stats = stats.select(bands)
    cfg = AugmentConfig(hflip=0.5, vflip=0.5, rot90=0.5, spectral_jitter=0.5, brightness=0.5)
    augment = Augmenter.from_bands(cfg, [band for band in BANDS if bands is None or band.name in bands])
    return ChipDataset(store, [9, 0, 4, 2, 7, 1], bands=bands, normalizer=stats, augment=augment, seed=5)


@pytest.mark.parametrize("bands", [None, ["VV", "B02"]])
def test_getitems_equals_getitem_per_position(store: Path, bands: list[str] | None) -> None:
    dataset = augmented_dataset(store, bands)
    positions = [5, 0, 3, 2]
    batched = dataset.__getitems__(positions)
    single = [dataset[p] for p in positions]
    assert [s["index"] for s in batched] == [s["index"] for s in single] == [1, 9, 2, 4]
    for one, other in zip(batched, single, strict=True):
        assert one.keys() == other.keys()
        for key in ("image", "label", "valid", "target"):
            torch.testing.assert_close(one[key], other[key], rtol=0, atol=0)
    # nodata rows are zeroed after normalisation and carry the ignore label
    chip_one = next(s for s in batched if s["index"] == 1)
    assert (~chip_one["valid"]).sum() == 8


def test_dataloader_workers_fetch_batches_equal_to_single_reads(store: Path) -> None:
    dataset = augmented_dataset(store)
    dataset._readers()  # shards opened in the parent before the workers fork
    dataset.read_raw_batch([0, 1])
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=2)
    batches = list(loader)
    expected = [default_collate([dataset[p] for p in range(i, min(i + 4, len(dataset)))]) for i in (0, 4)]
    assert len(batches) == 2
    for got, want in zip(batches, expected, strict=True):
        torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
        torch.testing.assert_close(got["label"], want["label"], rtol=0, atol=0)
        assert got["index"].tolist() == want["index"].tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.bool_, np.dtype(">f4")])
def test_aligned_empty_is_cache_line_aligned_contiguous_and_writable(dtype: Any) -> None:
    for shape in [(3, 5, 7), (16, 14, 128, 128), (1,)]:
        array = aligned_empty(shape, np.dtype(dtype))
        assert array.shape == shape and array.dtype == np.dtype(dtype)
        assert array.ctypes.data % 64 == 0 and array.flags.c_contiguous and array.flags.writeable
        array[...] = 1
        assert array.all()


def test_reads_return_aligned_arrays(store: Path) -> None:
    reader = ChipReader(store, "image")
    assert reader.read(3).ctypes.data % 64 == 0
    assert reader.read_batch([2, 9, 1]).ctypes.data % 64 == 0


@pytest.mark.parametrize("layout", ["sharded", "per_chip"])
def test_reads_without_preadv_match(
    layout: str, store: Path, per_chip_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # platforms without os.preadv (Windows) seek and read through a file object instead
    path = store if layout == "sharded" else per_chip_store
    monkeypatch.delattr(os, "preadv", raising=False)
    for name in ("image", "valid"):
        reader = ChipReader(path, name)
        np.testing.assert_array_equal(reader.read_batch([6, 0, 10]), expected_array(path, name)[[6, 0, 10]])

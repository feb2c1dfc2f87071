"""The chip store: `catalog.parquet` (one row per chip) plus a chunked Zarr array store.

Every external format is ingested into this one layout, so the rest of the workbench reads
chips in one way. Layout of a store directory::

    catalog.parquet   chip_id, lat, lon, region, year, split, positive_fraction, valid_fraction, source, ...
    chips.zarr/       image(chip, band, y, x) float32, label(chip, y, x) uint8, valid(chip, y, x) bool,
                      optional extra planes (chip, y, x); band names, modality and optical flag as coordinates
    store.json        format version, band table, chip size, free-form attributes

Every array is chunked per chip (one uncompressed chunk per chip) and the chunks are grouped into
Zarr v3 shards of about 64 MiB (`sharding_indexed`), so a store of thousands of chips is a few
hundred files rather than one file per chip and array, and `ChipReader` reads a chip with one
positioned read from an already open shard.

Stores are written chip by chip into a temporary directory and renamed when complete, so an
interrupted ingest never leaves a half-written store and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from workbench.arrays import IGNORE_INDEX
from workbench.io import atomic_directory, ensure_free_space, write_json_atomic, write_parquet_atomic

STORE_VERSION = 2  # 1: one chunk file per chip; 2: per-chip chunks inside shards (both are read)
SHARD_TARGET_BYTES = 64 * 2**20  # image bytes per shard; bounds the writer's buffer too
MAX_SHARD_CHIPS = 1024
CATALOG_COLUMNS = ["chip_id", "lat", "lon", "region", "year", "split", "positive_fraction", "source"]


class StoreError(ValueError):
    """A chip or a store does not match what the store format expects."""


@dataclass(frozen=True)
class BandSpec:
    """One input band: its name, the modality it belongs to, and whether colour changes apply to it."""

    name: str
    modality: str
    optical: bool = False


@dataclass
class Chip:
    """One chip as readers hand it to the store writer."""

    chip_id: str
    image: np.ndarray  # (band, y, x), finite after sanitising
    label: np.ndarray  # (y, x) class ids; IGNORE_INDEX marks pixels without a label
    valid: np.ndarray  # (y, x) bool, False where any input band was nodata
    lat: float = float("nan")
    lon: float = float("nan")
    region: str = ""
    year: int = 0
    split: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # extra catalog columns
    planes: dict[str, np.ndarray] = field(default_factory=dict)  # extra (y, x) planes, e.g. annotator votes


def positive_fraction(label: np.ndarray, valid: np.ndarray) -> float:
    """Fraction of valid, labelled pixels whose class is not background (0)."""
    usable = valid & (label != IGNORE_INDEX)
    n = int(usable.sum())
    return float(((label > 0) & usable).sum() / n) if n else 0.0


class StoreWriter:
    """Stream chips into a new store; use as a context manager.

    >>> with StoreWriter(dest, bands, source="demo") as writer:   # doctest: +SKIP
    ...     writer.append(chip)
    """

    def __init__(
        self,
        dest: str | Path,
        bands: Sequence[BandSpec],
        source: str = "",
        attrs: dict[str, Any] | None = None,
        overwrite: bool = False,
        flush_every: int | None = None,
        shard_chips: int | None = None,
    ) -> None:
        if not bands:
            raise StoreError("a store needs at least one band")
        names = [band.name for band in bands]
        if len(set(names)) != len(names):
            raise StoreError(f"band names must be unique, got {names}")
        self.dest = Path(dest)
        self.bands = list(bands)
        self.source = source
        self.attrs = dict(attrs or {})
        self.overwrite = overwrite
        self.flush_every = flush_every  # None: one shard at a time
        self.shard_chips = shard_chips  # None: chosen from the chip size (SHARD_TARGET_BYTES)
        self._rows: list[dict[str, Any]] = []
        self._buffer: list[Chip] = []
        self._shape: tuple[int, int] | None = None
        self._planes: tuple[str, ...] | None = None
        self._ids: set[str] = set()
        self._written = 0
        self._ctx: Any = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()  # the content fingerprint, fed with every chip as it is written
        self._hash.update(json.dumps([[b.name, b.modality, b.optical] for b in self.bands]).encode())

    # context management ---------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self._ctx = atomic_directory(self.dest, overwrite=self.overwrite)
        self._tmp = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._ctx is not None
        if exc_type is None:
            try:
                self._finish()
            except BaseException as error:
                self._ctx.__exit__(type(error), error, error.__traceback__)
                raise
        self._ctx.__exit__(exc_type, exc, tb)

    # writing ---------------------------------------------------------------
    def append(self, chip: Chip) -> None:
        """Validate one chip and queue it for writing."""
        self._check(chip)
        self._ids.add(chip.chip_id)
        valid = np.asarray(chip.valid, dtype=bool)
        label = np.asarray(chip.label)
        row: dict[str, Any] = {
            "chip_id": chip.chip_id,
            "lat": float(chip.lat),
            "lon": float(chip.lon),
            "region": chip.region,
            "year": int(chip.year),
            "split": chip.split,
            "positive_fraction": positive_fraction(label, valid),
            "valid_fraction": float(valid.mean()),
            "source": chip.source or self.source,
        }
        row.update(chip.extra)
        self._rows.append(row)
        self._buffer.append(chip)
        if len(self._buffer) >= (self.flush_every or self._chips_per_shard()):
            self._flush()

    def _chips_per_shard(self) -> int:
        if self.shard_chips is None:
            assert self._shape is not None
            chip_bytes = len(self.bands) * self._shape[0] * self._shape[1] * 4
            self.shard_chips = max(1, min(MAX_SHARD_CHIPS, SHARD_TARGET_BYTES // chip_bytes))
        return self.shard_chips

    def _where(self, chip: Chip) -> str:
        origin = chip.extra.get("file") or chip.source or self.source
        return f"chip {chip.chip_id!r}" + (f" (from {origin})" if origin else "")

    def _check(self, chip: Chip) -> None:
        where = self._where(chip)
        if chip.chip_id in self._ids:
            raise StoreError(f"{where}: duplicate chip id")
        image = np.asarray(chip.image)
        if image.ndim != 3 or image.shape[0] != len(self.bands):
            raise StoreError(
                f"{where}: image has shape {image.shape}, expected ({len(self.bands)}, y, x) for bands "
                f"{[b.name for b in self.bands]}"
            )
        shape = (int(image.shape[1]), int(image.shape[2]))
        if self._shape is None:
            self._shape = shape
        if shape != self._shape:
            raise StoreError(f"{where}: chip size {shape} differs from the store's {self._shape}; tile to one size")
        for name, plane in [("label", chip.label), ("valid", chip.valid), *chip.planes.items()]:
            if np.asarray(plane).shape != shape:
                raise StoreError(f"{where}: {name} has shape {np.asarray(plane).shape}, expected {shape}")
        planes = tuple(sorted(chip.planes))
        if self._planes is None:
            self._planes = planes
        if planes != self._planes:
            raise StoreError(f"{where}: extra planes {planes} differ from earlier chips' {self._planes}")
        valid = np.asarray(chip.valid, dtype=bool)
        if not valid.any():
            raise StoreError(f"{where}: no valid pixel (all nodata); drop the chip before ingest")
        if not np.isfinite(image[:, valid]).all():
            raise StoreError(f"{where}: non-finite values inside the valid mask; sanitise nodata before ingest")

    def _flush(self) -> None:
        if not self._buffer:
            return
        assert self._tmp is not None
        chips = self._buffer
        self._buffer = []
        image = np.stack([np.where(c.valid[None], c.image, 0).astype(np.float32) for c in chips])
        label = np.stack([np.asarray(c.label, dtype=np.uint8) for c in chips])
        valid = np.stack([np.asarray(c.valid, dtype=bool) for c in chips])
        data_vars: dict[str, Any] = {
            "image": (("chip", "band", "y", "x"), image),
            "label": (("chip", "y", "x"), label),
            "valid": (("chip", "y", "x"), valid),
        }
        for name in self._planes or ():
            data_vars[name] = (("chip", "y", "x"), np.stack([np.asarray(c.planes[name]) for c in chips]))
        nbytes = sum(np.asarray(values).nbytes for _, values in data_vars.values())  # uncompressed chunks
        ensure_free_space(self.dest.parent, nbytes, f"{len(chips)} chips of the store {self.dest.name} (uncompressed)")
        for name, (_, values) in data_vars.items():
            self._hash.update(name.encode())
            self._hash.update(np.ascontiguousarray(values).tobytes())
        self._hash.update("\0".join(c.chip_id for c in chips).encode())
        ds = xr.Dataset(data_vars, coords={"chip_id": ("chip", np.array([c.chip_id for c in chips], dtype=object))})
        target = self._tmp / "chips.zarr"
        if self._written == 0:
            ds = ds.assign_coords(
                band=("band", np.array([b.name for b in self.bands], dtype=object)),
                modality=("band", np.array([b.modality for b in self.bands], dtype=object)),
                optical=("band", [b.optical for b in self.bands]),
            )
            # Uncompressed per-chip chunks grouped in shards: ChipReader reads a chip with one positioned read.
            shard = self._chips_per_shard()
            encoding = {
                name: {"chunks": (1, *ds[name].shape[1:]), "shards": (shard, *ds[name].shape[1:]), "compressors": None}
                for name in data_vars
            }
            encoding["chip_id"] = {"chunks": (4096,)}
            ds.to_zarr(target, mode="w", consolidated=False, encoding=encoding)
        else:
            ds.to_zarr(target, append_dim="chip", consolidated=False)
        self._written += len(chips)

    def _finish(self) -> None:
        self._flush()
        if self._written == 0:
            raise StoreError(f"no chips were written to {self.dest}; check the source folder and its layout")
        assert self._tmp is not None
        catalog = pd.DataFrame(self._rows)
        catalog.to_parquet(self._tmp / "catalog.parquet", index=False)
        assert self._shape is not None
        meta = {
            "version": STORE_VERSION,
            "source": self.source,
            "chip_size": list(self._shape),
            "bands": [{"name": b.name, "modality": b.modality, "optical": b.optical} for b in self.bands],
            "planes": list(self._planes or ()),
            "n_chips": self._written,
            "shard_chips": self._chips_per_shard(),
            "attrs": self.attrs,
            "fingerprint": f"sha256:{self._hash.hexdigest()}",
        }
        write_json_atomic(self._tmp / "store.json", meta)


def _require_store(path: Path) -> None:
    missing = [name for name in ("catalog.parquet", "chips.zarr", "store.json") if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a chip store (missing {', '.join(missing)}); create one with `workbench ingest`"
        )


def read_catalog(path: str | Path) -> pd.DataFrame:
    """The store's catalog, one row per chip in store order."""
    path = Path(path)
    _require_store(path)
    return pd.read_parquet(path / "catalog.parquet")


def read_store_meta(path: str | Path) -> dict[str, Any]:
    """The store's `store.json` (bands, chip size, attributes)."""
    path = Path(path)
    _require_store(path)
    meta: dict[str, Any] = json.loads((path / "store.json").read_text(encoding="utf-8"))
    return meta


def store_fingerprint(path: str | Path) -> str:
    """The store's content fingerprint: recorded in store.json by StoreWriter.

    Stores written before fingerprints were recorded get one from their files' names, sizes and
    modification times (prefixed `files:`), which changes whenever the store is rewritten.
    """
    path = Path(path)
    meta = read_store_meta(path)
    if meta.get("fingerprint"):
        return str(meta["fingerprint"])
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"files:{digest.hexdigest()}"


def stored_band_names(path: str | Path) -> list[str]:
    """The band coordinate of the store's Zarr arrays (what the image planes really are)."""
    import zarr

    array = zarr.open_array(str(Path(path) / "chips.zarr" / "band"), mode="r")
    return [str(value) for value in np.asarray(array[:])]


def check_band_order(path: str | Path) -> list[str]:
    """Raise StoreError unless the band table of store.json matches the Zarr band coordinate; return the bands."""
    path = Path(path)
    listed = [band["name"] for band in read_store_meta(path)["bands"]]
    stored = stored_band_names(path)
    if listed != stored:
        raise StoreError(
            f"{path}: store.json lists the bands {listed} but the arrays hold {stored} (in this order); the "
            "metadata was edited or mixed up with another store's, so bands would be fed wrongly. Re-ingest the "
            "store or restore its store.json"
        )
    return listed


def band_specs(meta: dict[str, Any]) -> list[BandSpec]:
    """Band table of a store's metadata as BandSpec objects."""
    return [BandSpec(**band) for band in meta["bands"]]


def open_store(path: str | Path, catalog: pd.DataFrame | None = None, dask: bool = True) -> xr.Dataset:
    """Open a chip store lazily as an xarray Dataset.

    `image(chip, band, y, x)`, `label(chip, y, x)`, `valid(chip, y, x)`; catalog columns become chip
    coordinates. Pass `catalog` to attach an updated catalog (for example with a new split column).
    Either way selecting a batch reads only its chips. With `dask=True` the arrays are dask arrays
    chunked per chip, so reductions over the whole store stream chip by chip. With `dask=False` they
    are lazily indexed through `ChipReader` instead: selecting chips (`isel(chip=...)`) is many times
    faster, but a reduction over everything loads everything.
    """
    path = Path(path)
    _require_store(path)
    ds = xr.open_zarr(path / "chips.zarr", consolidated=False)
    if not dask:
        ds = ds.assign({name: _chip_variable(path, str(name), ds[name]) for name in ds.data_vars})
    table = read_catalog(path) if catalog is None else catalog
    if len(table) != ds.sizes["chip"]:
        raise StoreError(f"{path}: catalog has {len(table)} rows but the arrays hold {ds.sizes['chip']} chips")
    stored_ids = np.array([str(value) for value in ds["chip_id"].values])
    if not (np.array([str(v) for v in table["chip_id"]]) == stored_ids).all():
        raise StoreError(f"{path}: catalog chip ids are not in array order; rebuild the catalog")
    coords = {col: ("chip", table[col].to_numpy()) for col in table.columns if col != "chip_id"}
    ds = ds.assign_coords(coords)
    ds.attrs.update(read_store_meta(path).get("attrs", {}))
    return ds


def write_catalog(path: str | Path, catalog: pd.DataFrame) -> None:
    """Replace a store's catalog atomically (for example after assigning splits); rows must keep their order."""

    path = Path(path)
    current = read_catalog(path)
    if list(current["chip_id"]) != list(catalog["chip_id"]):
        raise StoreError(f"{path}: the new catalog must list the same chips in the same order")
    write_parquet_atomic(path / "catalog.parquet", catalog)


_EMPTY_CHUNK = 2**64 - 1  # shard index entry of a chunk that was never written
_DIRECT_DTYPES = {"float32", "float64", "uint8", "uint16", "int16", "int32", "bool"}
MAX_OPEN_SHARDS = 32  # per reader and process; least recently used shards are closed beyond this


@dataclass
class _Shard:
    """An open shard file and its chunk index ((offset, size) per chunk); both None when the file is missing."""

    fd: int | None
    index: list[tuple[int, int]] | None


class _ChipArray(BackendArray):
    """An xarray backend array over one store array: indexing reads only the chips it selects."""

    def __init__(self, reader: ChipReader) -> None:
        self.reader = reader
        self.shape = reader.shape
        self.dtype = reader.dtype if reader.dtype.itemsize == 1 else reader.dtype.newbyteorder("=")

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._read)

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        chips = np.arange(self.shape[0])[key[0]]
        if np.ndim(chips) == 0:  # one chip: the chip dimension is dropped
            return np.asarray(self.reader.read(int(chips))[key[1:]], dtype=self.dtype)
        batch = self.reader.read_batch(chips)
        return np.asarray(batch[(slice(None), *key[1:])], dtype=self.dtype)


def _chip_variable(path: Path, name: str, template: xr.DataArray) -> xr.Variable:
    """A lazily indexed variable reading `name` through ChipReader, with the template's dims and attributes."""
    array = indexing.LazilyIndexedArray(_ChipArray(ChipReader(path, name)))
    return xr.Variable(template.dims, array, attrs=template.attrs)


class ChipReader:
    """Read whole chips of one store array (image, label, valid, ...) by chip position.

    Stores written by StoreWriter keep each chip of each array in one uncompressed chunk, either
    inside a Zarr v3 shard (current stores) or as its own file (stores of format version 1), so a
    chip is one copy from the page cache straight into a fresh (or caller-given) array: no
    decoding, no intermediate bytes object. Shard files stay open and their chunk indexes (checked
    against their CRC32C) are cached, per process, so a chip costs one `preadv`, which also lets
    the kernel read a chip that is not cached in one request. Other Zarr layouts (compressed,
    rechunked) go through zarr-python. Either way only the requested chips are touched. Stores are
    immutable once written; a store rewritten in place needs new readers.
    """

    def __init__(self, store: str | Path, name: str) -> None:
        self.path = Path(store) / "chips.zarr" / name
        meta_file = self.path / "zarr.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} is missing; {store} is not a complete chip store")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        self.shape = tuple(meta["shape"])
        self.chip_shape = tuple(int(n) for n in self.shape[1:])
        grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = meta.get("codecs", [])
        key = meta.get("chunk_key_encoding", {})
        plain_keys = key.get("name") == "default" and key.get("configuration", {}).get("separator", "/") == "/"
        direct_type = meta["data_type"] in _DIRECT_DTYPES
        self.shard_chips = 0  # chips per shard; 0 when chips are not sharded
        self.index_at_end = True
        if _is_per_chip_sharding(codecs, self.chip_shape) and grid[1:] == self.chip_shape:
            sharding = codecs[0]["configuration"]
            self.shard_chips = int(grid[0])
            self.index_at_end = sharding.get("index_location", "end") == "end"
            inner = sharding["codecs"]
        else:
            inner = codecs
        self.sharded = self.shard_chips > 0
        per_chip = grid == (1, *self.chip_shape) or self.sharded
        self.direct = per_chip and plain_keys and direct_type and len(inner) == 1 and inner[0]["name"] == "bytes"
        little = not inner or inner[0].get("configuration", {}).get("endian", "little") == "little"
        base = np.dtype(bool) if meta["data_type"] == "bool" else np.dtype(meta["data_type"])
        self.dtype = base if base.itemsize == 1 else base.newbyteorder("<" if little else ">")
        self.fill = meta.get("fill_value")
        self.nbytes = int(np.prod(self.chip_shape)) * self.dtype.itemsize
        tail = "/".join("0" for _ in self.shape[1:])
        self._pattern = f"{self.path}/c/{{}}/{tail}" if tail else f"{self.path}/c/{{}}"
        self._array: Any = None
        self._shards: OrderedDict[int, _Shard] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # open files and zarr handles stay with the process that opened them
        state["_shards"] = OrderedDict()
        state["_array"] = None
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit modules may already be gone
            self.close()

    def close(self) -> None:
        """Close the shard files this process opened (they are opened again on the next read)."""
        shards = getattr(self, "_shards", None)
        if shards and getattr(self, "_pid", None) == os.getpid():
            for shard in shards.values():
                _release(shard)
        if shards is not None:
            shards.clear()

    def chunk_file(self, chip: int) -> str:
        """Path of the file holding `chip`: its shard, or its own chunk file in unsharded stores."""
        return self._pattern.format(chip // self.shard_chips if self.sharded else chip)

    def files(self) -> list[str]:
        """Paths of the array's chunk or shard files that exist."""
        count = -(-len(self) // self.shard_chips) if self.sharded else len(self)
        return [file for file in (self._pattern.format(i) for i in range(count)) if os.path.exists(file)]

    def read(self, chip: int, out: np.ndarray | None = None) -> np.ndarray:
        """The array of one chip (shape without the chip dimension), read into `out` when given."""
        self._check_position(chip)
        if out is not None and (out.shape != self.chip_shape or out.dtype != self.dtype or not out.flags.c_contiguous):
            raise ValueError(
                f"out must be a C-contiguous {self.dtype} array of shape {self.chip_shape} for {self.path}, "
                f"got {out.dtype} {out.shape}"
            )
        if not self.direct:
            return self._read_zarr(chip, out)
        if out is None:
            out = aligned_empty(self.chip_shape, self.dtype)
        if self.sharded:
            if not self._copy_from_shard(chip, out.reshape(-1).view(np.uint8)):
                self._fill(out)
        else:
            self._read_chunk(self.chunk_file(chip), out)
        return out

    def read_batch(self, chips: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Chips stacked as (n, ...), each read straight into its slot of one batch array (no stacking copy)."""
        chips = [int(chip) for chip in chips]
        if out is None:
            out = aligned_empty((len(chips), *self.chip_shape), self.dtype)
        if out.shape[:1] != (len(chips),):
            raise ValueError(f"out has room for {out.shape[:1]} chips, got {len(chips)} chips for {self.path}")
        if self.direct and self.sharded and out.flags.c_contiguous and out.dtype == self.dtype:
            rows = out.reshape(len(chips), -1).view(np.uint8)  # a view: each row is one chip's slot
            for slot, chip in enumerate(chips):  # the hot loop of batched loading: one copy per chip
                self._check_position(chip)
                if not self._copy_from_shard(chip, rows[slot]):
                    self._fill(out[slot])
            return out
        for slot, chip in enumerate(chips):
            self.read(chip, out[slot])
        return out

    def _check_position(self, chip: int) -> None:
        if not 0 <= chip < self.shape[0]:
            raise IndexError(f"chip {chip} is outside {self.path} (0..{self.shape[0] - 1})")

    # layouts -----------------------------------------------------------------
    def _read_zarr(self, chip: int, out: np.ndarray | None) -> np.ndarray:
        if self._array is None:
            import zarr

            self._array = zarr.open_array(str(self.path), mode="r")
        data = np.asarray(self._array[chip])
        if out is None:
            return data
        out[...] = data
        return out

    def _fill(self, out: np.ndarray) -> None:
        out[...] = self.fill if self.fill not in (None, "NaN") else np.nan

    def _read_chunk(self, file: str, out: np.ndarray) -> None:
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:  # a chunk never written holds the fill value
            self._fill(out)
            return
        try:
            size = os.fstat(fd).st_size
            if size != self.nbytes:
                raise StoreError(f"{file} holds {size} bytes, expected {self.nbytes}; rewrite the store")
            done = _pread_into(fd, out, 0)
            if done < self.nbytes:
                raise StoreError(f"{file} ended after {done} of {self.nbytes} bytes; rewrite the store")
        finally:
            os.close(fd)

    def _copy_from_shard(self, chip: int, dest: np.ndarray) -> bool:
        """Copy the chip's bytes from its shard into the uint8 array `dest`; False where it holds the fill value."""
        number, slot = divmod(chip, self.shard_chips)
        shard = self._open_shard(number)
        if shard.index is None or shard.fd is None:  # a shard never written holds the fill value
            return False
        offset, nbytes = shard.index[slot]
        if offset == _EMPTY_CHUNK and nbytes == _EMPTY_CHUNK:  # an empty chunk holds the fill value
            return False
        if nbytes != self.nbytes:
            raise StoreError(
                f"{self.chunk_file(chip)}: chip {chip} takes {nbytes} bytes, expected {self.nbytes}; rewrite the store"
            )
        done = _pread_into(shard.fd, dest, offset)  # one positioned read, one copy from the page cache
        if done < nbytes:
            raise StoreError(f"{self.chunk_file(chip)}: chip {chip} ended after {done} bytes; rewrite the store")
        return True

    def _open_shard(self, number: int) -> _Shard:
        if self._pid != os.getpid():  # a forked DataLoader worker: close its copies of the parent's files
            for inherited in self._shards.values():
                _release(inherited)
            self._shards = OrderedDict()
            self._pid = os.getpid()
        shard = self._shards.get(number)
        if shard is not None:
            self._shards.move_to_end(number)
            return shard
        shard = self._load_shard(self._pattern.format(number))
        self._shards[number] = shard
        while len(self._shards) > MAX_OPEN_SHARDS:
            _, oldest = self._shards.popitem(last=False)
            _release(oldest)
        return shard

    def _load_shard(self, file: str) -> _Shard:
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            return _Shard(None, None)
        try:
            size = os.fstat(fd).st_size
            index_bytes = self.shard_chips * 16 + 4
            if size < index_bytes:
                raise StoreError(f"{file} holds {size} bytes, too few for its chunk index; rewrite the store")
            raw = np.empty(index_bytes, dtype=np.uint8)
            _pread_into(fd, raw, size - index_bytes if self.index_at_end else 0)
            index = _decode_shard_index(raw.tobytes(), self.shard_chips, file)
            written = index[:, 0] != _EMPTY_CHUNK
            if written.any() and int((index[written, 0] + index[written, 1]).max()) > size:
                raise StoreError(f"{file}: its chunk index points past the end of the file; rewrite the store")
            return _Shard(fd, [(int(offset), int(length)) for offset, length in index.tolist()])
        except BaseException:
            os.close(fd)
            raise


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype[Any], alignment: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose first byte sits on a cache-line boundary.

    Copies from the page cache into a buffer that is not cache-line aligned run markedly slower (a
    third or more for batch-sized copies), and np.empty only guarantees 16 bytes.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + alignment, dtype=np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def _release(shard: _Shard) -> None:
    """Close a shard's file."""
    if shard.fd is not None:
        os.close(shard.fd)
        shard.fd = None


def _is_per_chip_sharding(codecs: list[dict[str, Any]], chip_shape: tuple[int, ...]) -> bool:
    """Whether the array's codecs are one `sharding_indexed` of per-chip chunks with a CRC32C-checked index."""
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    config = codecs[0].get("configuration", {})
    index_codecs = [codec.get("name") for codec in config.get("index_codecs", [])]
    little_index = config.get("index_codecs", [{}])[0].get("configuration", {}).get("endian", "little") == "little"
    return (
        tuple(config.get("chunk_shape", ())) == (1, *chip_shape)
        and index_codecs == ["bytes", "crc32c"]
        and little_index
        and config.get("index_location", "end") in ("start", "end")
    )


def _decode_shard_index(raw: bytes, chunks: int, file: str) -> np.ndarray:
    """The (chunks, 2) uint64 offsets and sizes of a shard index, after checking its CRC32C."""
    import google_crc32c

    body, checksum = raw[:-4], int.from_bytes(raw[-4:], "little")
    if google_crc32c.value(body) != checksum:
        raise StoreError(f"{file}: the shard's chunk index fails its CRC32C check (corrupt file); rewrite the store")
    return np.frombuffer(body, dtype="<u8").reshape(chunks, 2)


def _pread_into(fd: int, out: np.ndarray, offset: int) -> int:
    """Fill the C-contiguous `out` with the bytes at `offset` of an open file (one copy, no bytes object).

    Returns the number of bytes read: less than `out.nbytes` only when the file ended first.
    """
    view = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    total = len(view)
    if not hasattr(os, "preadv"):  # Windows: seek and read through a file object on the same descriptor
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            handle.seek(offset)
            done = 0
            while done < total and (count := handle.readinto(view[done:])):
                done += count
            return done
    done = os.preadv(fd, [view], offset)
    while 0 < done < total:  # short reads happen on signals and some file systems
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done

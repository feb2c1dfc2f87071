"""CryoSentinel glacial-lake shards: ``<data_dir>/<region>/<year>/shard_*.parquet``, one row per chip.

Columns: ``chip_id, region, snapshot_year, split, lake_id, lat, lon, water_frac`` and the raw C-order
array bytes ``s2_bytes`` (uint16, (12, 224, 224), S2L2A B01..B12 without B10), ``s1_bytes`` (float32,
(2, 224, 224), VV/VH dB), ``dem_bytes`` (int16, (1, 224, 224), m) and ``mask_bytes`` (uint8, (224, 224),
0/1). Optional shape columns ``s2_shape``, ``s1_shape``, ``dem_shape``, ``mask_shape`` hold each array's
shape as a list of ints (for example [12, 224, 224]); without them the shapes above are assumed.

Rows are read a record batch at a time, so memory stays bounded. The CryoSentinel nodata rules
(:func:`workbench.data.nodata.clean_cryosentinel`) give the valid mask; the split column is kept.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.nodata import clean_cryosentinel
from workbench.data.sources import (
    S2_L2A_BANDS,
    Scene,
    Source,
    SourceError,
    as_mapping,
    find_files,
    map_classes,
    require_dir,
    scene_chips,
)
from workbench.data.store import BandSpec, Chip

BANDS = (
    [BandSpec(name, "S2L2A", optical=True) for name in S2_L2A_BANDS]
    + [BandSpec("VV", "S1GRD"), BandSpec("VH", "S1GRD")]
    + [BandSpec("DEM", "DEM")]
)
ARRAYS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "s2": (np.uint16, (12, 224, 224)),
    "s1": (np.float32, (2, 224, 224)),
    "dem": (np.int16, (1, 224, 224)),
    "mask": (np.uint8, (224, 224)),
}
REQUIRED_COLUMNS = ["chip_id", "lat", "lon", *(f"{name}_bytes" for name in ARRAYS)]
EXTRA_COLUMNS = ["lake_id", "water_frac"]


def decode_array(row: dict[str, Any], name: str, path: Path) -> np.ndarray:
    """One array of a row from its raw bytes and (optional) shape column, checked for size."""
    dtype, default_shape = ARRAYS[name]
    shape = tuple(int(n) for n in (row.get(f"{name}_shape") or default_shape))
    data = row[f"{name}_bytes"]
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if data is None or len(data) != expected:
        size = "missing" if data is None else f"{len(data)} bytes"
        raise SourceError(
            f"{path}: chip {row.get('chip_id')!r} column {name}_bytes is {size}, expected {expected} bytes "
            f"({np.dtype(dtype).name} of shape {shape})"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def row_scene(row: dict[str, Any], path: Path, nodata: dict[str, Any]) -> Scene:
    """One parquet row as a cleaned scene."""
    s2, s1, dem, mask = (decode_array(row, name, path) for name in ARRAYS)
    try:
        valid, s2c, s1c, demc = clean_cryosentinel(s2, s1, dem, **nodata)
    except ValueError as error:
        raise SourceError(f"{path}: chip {row['chip_id']!r}: {error}") from None
    if mask.shape != valid.shape:
        raise SourceError(f"{path}: chip {row['chip_id']!r} mask shape {mask.shape} differs from S2 {valid.shape}")
    return Scene(
        name=str(row["chip_id"]),
        image=np.concatenate([s2c, s1c, demc]).astype(np.float32),
        label=map_classes(mask, None),
        valid=valid,
        file=str(path),
        lat=float(row["lat"]),
        lon=float(row["lon"]),
        region=str(row.get("region") or ""),
        year=int(row.get("snapshot_year") or 0),
        split=str(row.get("split") or ""),
        extra={key: row[key] for key in EXTRA_COLUMNS if key in row},
    )


def shard_rows(path: Path, batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """Rows of one shard as dicts, read a record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise SourceError(f"{path}: cannot read as Parquet ({error})") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in shard.schema_arrow.names]
    if missing:
        raise SourceError(f"{path}: missing columns {missing}; expected {REQUIRED_COLUMNS}")
    for batch in shard.iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


def count_rows(paths: list[Path]) -> int | None:
    """Total rows of the shards from their footers, or None when one cannot be read."""
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    except Exception:
        return None


def nodata_rules(value: Any) -> dict[str, Any]:
    """Keyword arguments for clean_cryosentinel from the `nodata` option; unknown names are an error."""
    rules = as_mapping(value, "nodata")
    allowed = [name for name in inspect.signature(clean_cryosentinel).parameters if name not in ("s2", "s1", "dem")]
    unknown = sorted(set(rules) - set(allowed))
    if unknown:
        raise SourceError(f"unknown nodata rule(s) {unknown}; choose from {allowed}")
    return rules


def read_cryosentinel(src: Path, chip_size: int | None = None, stride: int | None = None, nodata: Any = None) -> Source:
    """CryoSentinel shards under `src` as chips (S2L2A 12 + S1 2 + DEM 1 bands, label 1 = lake).

    `nodata` overrides keyword arguments of :func:`workbench.data.nodata.clean_cryosentinel`,
    e.g. {"dem_clip": [-500, 7000]}.
    """
    root = require_dir(Path(src), "CryoSentinel <region>/<year>/shard_*.parquet files")
    shards = find_files(root, r"shard_.*\.parquet", "CryoSentinel shard_*.parquet files")
    rules = nodata_rules(nodata)
    for key in ("s2_clip", "dem_clip"):
        if key in rules and rules[key] is not None:
            rules[key] = tuple(float(v) for v in rules[key])

    def chips() -> Iterator[Chip]:
        for path in shards:
            for row in shard_rows(path):
                yield from scene_chips(row_scene(row, path, rules), chip_size, stride, "cryosentinel")

    rows = count_rows(shards) if chip_size is None else None
    return Source(bands=list(BANDS), chips=chips(), total=rows, attrs={"shards": len(shards)})

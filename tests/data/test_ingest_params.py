"""`data.source: ingest`: raw data named in the parameters, ingested into the store once and then reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_fakes

from workbench.data.ingest import ensure_ingested
from workbench.data.prepare import ensure_store
from workbench.data.store import read_catalog, read_store_meta
from workbench.params import IngestConfig, ParamsError, load_params
from workbench.stages.external import external_store

fakes = load_fakes()


def test_ingest_source_needs_its_raw_data_named():
    with pytest.raises(ParamsError, match=r"data.source=ingest needs data.ingest"):
        load_params(None, ["experiment=x", "data.source=ingest"])


def test_store_is_ingested_from_the_project_root_once_and_reused(tmp_path: Path):
    written = fakes.make_npz(tmp_path / "raw", size=128)
    params = load_params(
        None,
        [
            "experiment=x",
            "data.source=ingest",
            "data.store=stores/l7",
            "data.ingest={format: ukis-csmask, src: raw/landsat7.npz, chip_size: 32, split: rows, "
            "split_options: {buffer_px: 0, train_percent: 50, val_percent: 25}}",
        ],
    )
    store = ensure_store(params.data, root=tmp_path)
    assert store == tmp_path / "stores" / "l7"
    catalog = read_catalog(store)
    assert len(catalog) == 16 and set(catalog["split"]) >= {"train", "val", "test"}
    cloud = (written["mask"] == 4).astype(np.uint8)  # ukis-csmask: cloud (4) is the positive class
    assert catalog["positive_fraction"].mean() == pytest.approx(cloud.mean())
    before = (store / "catalog.parquet").stat().st_mtime_ns
    assert ensure_store(params.data, root=tmp_path) == store  # reused, not re-ingested
    assert (store / "catalog.parquet").stat().st_mtime_ns == before
    assert read_store_meta(store)["attrs"]["chip_size"] == 32


def test_a_store_ingested_from_other_data_is_refused_with_the_fix(tmp_path: Path):
    fakes.make_npz(tmp_path / "raw", size=128)
    cfg = IngestConfig(format="ukis-csmask", src=Path("raw/landsat7.npz"), chip_size=32)
    ensure_ingested(cfg, tmp_path / "store", root=tmp_path, progress=False)
    other = cfg.model_copy(update={"chip_size": 64})
    with pytest.raises(ValueError, match=r"store .*store was ingested from other data.*chip_size.*new folder"):
        ensure_ingested(other, tmp_path / "store", root=tmp_path, progress=False)
    missing = cfg.model_copy(update={"src": Path("nowhere/landsat5.npz")})
    with pytest.raises(FileNotFoundError, match=r"data.ingest.src .*nowhere/landsat5.npz does not exist"):
        ensure_ingested(missing, tmp_path / "new", root=tmp_path, progress=False)
    assert not (tmp_path / "new").exists()


def test_external_entries_ingest_their_raw_data_first(tmp_path: Path):
    fakes.make_npz(tmp_path / "raw", name="landsat5", size=64)
    params = load_params(
        None,
        [
            "experiment=x",
            "evaluate.external=[stores/plain, {store: stores/l5, ingest: {format: ukis-csmask, "
            "src: raw/landsat5.npz, chip_size: 32}}]",
        ],
    )
    plain, ingested = params.evaluate.external
    assert external_store(plain, root=tmp_path) == tmp_path / "stores" / "plain"
    assert external_store(ingested, root=tmp_path) == tmp_path / "stores" / "l5"
    assert len(read_catalog(tmp_path / "stores" / "l5")) == 4

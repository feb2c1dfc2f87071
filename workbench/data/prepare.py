"""Data preparation stage: make sure the chip store exists, assign splits, compute normalisation.

Outputs go to `<run_dir>/data/`: `catalog.parquet` (the store's catalog with the split used by
this run) and `normalization_stats.json` (train-split statistics), which later stages read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.data.ledger import apply_ledger
from workbench.data.normalize import NormalizationStats, compute_stats
from workbench.data.split import assign_splits
from workbench.data.store import check_band_order, open_store, read_catalog, read_store_meta, store_fingerprint
from workbench.data.synthetic import ensure_synthetic_store
from workbench.io import read_json, write_json_atomic, write_parquet_atomic
from workbench.params import DataParams
from workbench.run import DATA_AUDIT, RunLayout


@dataclass
class PreparedData:
    """Where a run's data stage left its outputs."""

    store: Path
    catalog_path: Path
    stats_path: Path
    catalog: pd.DataFrame
    bands: list[str]
    corrections: dict[int, Path] = field(default_factory=dict)  # store position -> corrected label (ledger "fix")
    ledger: dict[str, Any] | None = None  # provenance of the applied review ledger (path, lines, sha256)


def resolve_path(path: Path, root: Path | None = None) -> Path:
    """Relative parameter paths are taken from the project root (or `root`)."""
    if path.is_absolute():
        return path
    base = root if root is not None else Path.cwd()
    return (base / path).resolve()


def ensure_store(cfg: DataParams, root: Path | None = None) -> Path:
    """The chip store of `cfg`: generated for the synthetic source, ingested from data.ingest, else checked."""
    store = resolve_path(cfg.store, root)
    if cfg.source == "synthetic":
        return Path(ensure_synthetic_store(store, cfg.synthetic))
    if cfg.source == "ingest" and cfg.ingest is not None:
        from workbench.data.ingest import ensure_ingested

        return ensure_ingested(cfg.ingest, store, root)
    read_store_meta(store)  # raises a clear error when the store is missing
    return store


def selected_bands(store: Path, cfg: DataParams) -> list[str]:
    """Bands fed to the model: `data.bands` or every band of the store."""
    names = [band["name"] for band in read_store_meta(store)["bands"]]
    if cfg.bands is None:
        return names
    missing = [band for band in cfg.bands if band not in names]
    if missing:
        raise ValueError(f"data.bands lists {missing}, which store {store} does not have; it has {names}")
    return list(cfg.bands)


def prepare_data(cfg: DataParams, run_dir: Path, seed: int = 0, root: Path | None = None) -> PreparedData:
    """Run the data stage and write its outputs under `run_dir/data`."""

    store = ensure_store(cfg, root)
    bands = selected_bands(store, cfg)
    catalog = read_catalog(store)
    chip_size = int(read_store_meta(store)["chip_size"][0])
    catalog["split"] = assign_splits(catalog, cfg.split, seed=seed, chip_size=chip_size).to_numpy()
    for split in ("train", "val", "test"):
        if not (catalog["split"] == split).any():
            raise ValueError(
                f"split {split!r} is empty for store {store} (counts: {catalog['split'].value_counts().to_dict()}); "
                "adjust data.split.block_deg / percentages, or add chips"
            )
    layout = RunLayout(run_dir)
    layout.data.mkdir(parents=True, exist_ok=True)
    record_store(store, run_dir)
    catalog_path = layout.catalog
    write_parquet_atomic(catalog_path, catalog)
    stats_path = layout.normalization_stats
    if cfg.normalize.stats_file is not None:
        stats = NormalizationStats.load(resolve_path(cfg.normalize.stats_file, root))
        stats.check_compatible(bands, cfg.normalize.method)
    else:
        train_positions = catalog.index[catalog["split"] == "train"].to_numpy()
        stats = compute_stats(
            open_store(store, catalog=catalog, dask=False),  # chip groups are read straight from the shards
            train_positions,
            bands=bands,
            method=cfg.normalize.method,
            percentiles=cfg.normalize.percentiles,
        )
    stats.save(stats_path)
    return PreparedData(store, catalog_path, stats_path, catalog, bands)


def load_prepared(
    run_dir: Path,
    cfg: DataParams,
    root: Path | None = None,
    decisions: bool | None = None,
    ledger: Path | None = None,
) -> PreparedData:
    """Read what the data stage wrote (the handover to training, calibration and review).

    The store's review ledger (`workbench.data.ledger`) is applied when `decisions` is True, or when it is
    None and the ledger exists: chips judged "drop" move to split "dropped" (their original split stays in
    the column `review_split`), chips judged "fix" are read with their corrected label
    (`PreparedData.corrections`), and `data/ledger.json` records which ledger was applied.
    """

    layout = RunLayout(run_dir)
    catalog_path, stats_path = layout.catalog, layout.normalization_stats
    for path in (catalog_path, stats_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run the data audit stage ({DATA_AUDIT.notebook}) first")
    store = resolve_path(cfg.store, root)
    check_store_unchanged(store, run_dir)
    catalog = pd.read_parquet(catalog_path)
    catalog["review_split"] = catalog["split"]
    catalog, state = apply_ledger(store, catalog, decisions, None if ledger is None else resolve_path(ledger, root))
    prepared = PreparedData(store, catalog_path, stats_path, catalog, selected_bands(store, cfg))
    if state is not None:
        prepared.corrections = state.corrections
        prepared.ledger = {
            **state.provenance,
            "dropped": len(state.dropped),
            "fixed": len(state.corrections),
            "conflicts": state.conflicts,
        }
        write_json_atomic(layout.ledger_record, prepared.ledger)
    return prepared


class StoreChangedError(RuntimeError):
    """The chip store differs from the one the run started with."""


def record_store(store: Path, run_dir: Path) -> Path:
    """Write data/store.json: the store's path and content fingerprint when the run starts (after band checks)."""

    check_band_order(store)
    record = {"path": str(store), "fingerprint": store_fingerprint(store)}
    return write_json_atomic(RunLayout(run_dir).store_record, record)


def check_store_unchanged(store: Path, run_dir: Path) -> None:
    """Raise StoreChangedError when the store's fingerprint differs from the one recorded at the run's start.

    A shared store regenerated or re-ingested by another run between two stages would otherwise be
    trained or evaluated on silently, with splits and statistics computed on other data.
    """

    record_path = RunLayout(run_dir).store_record
    if not record_path.is_file():  # runs created before stores were recorded
        return
    record = read_json(record_path)
    now = store_fingerprint(store)
    if now != record.get("fingerprint"):
        raise StoreChangedError(
            f"the chip store {store} changed since this run started (fingerprint {record.get('fingerprint')} "
            f"recorded in {record_path}, now {now}); another run or an ingest rewrote it. Start a new run, or "
            "give each experiment its own data.store"
        )

"""Benchmarks (smoke runs: keys and consistency, never timings) and the chip reader they exercise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from workbench.bench import run_benchmark
from workbench.bench.data import (
    bench_loader_vs_model,
    bench_store_vs_hdf5,
    evict_from_page_cache,
    interleaved_seconds,
    random_store,
)
from workbench.data.dataset import ChipDataset
from workbench.data.store import BandSpec, ChipReader

BANDS = [BandSpec(name, "S2L2A", True) for name in ("B02", "B03", "B04")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_store(tmp_path_factory.mktemp("bench") / "store", n_chips=5, size=8, bands=BANDS, seed=3)


# per-sample reads ------------------------------------------------------------------------------------
def test_read_raw_selects_bands_and_returns_independent_writable_arrays(store):
    image = zarr.open_array(str(store / "chips.zarr" / "image"), mode="r")[:]
    dataset = ChipDataset(store, [3, 1], bands=["B04", "B02"])
    raw, label, valid = dataset.read_raw(0)
    np.testing.assert_array_equal(raw, image[3][[2, 0]])
    assert raw.dtype == np.float32 and label.dtype == np.uint8 and valid.dtype == bool
    full = ChipDataset(store, [3])
    first, _, _ = full.read_raw(0)
    first[...] = -1  # the caller owns the array: a second read is unaffected
    second, _, _ = full.read_raw(0)
    np.testing.assert_array_equal(second, image[3])
    assert second.flags.writeable


# timing helpers ----------------------------------------------------------------------------------------
def test_interleaved_seconds_alternates_order_and_runs_hook_before_each_call():
    calls: list[str] = []
    hooks: list[int] = []
    paths = {"a": lambda batch: calls.append("a"), "b": lambda batch: calls.append("b")}
    times = interleaved_seconds(paths, [np.arange(2)] * 3, before_each=lambda: hooks.append(len(calls)))
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert hooks == [0, 1, 2, 3, 4, 5]
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}
    assert all(value >= 0 for values in times.values() for value in values)


def test_evict_from_page_cache_keeps_contents_and_names_missing_file(store, tmp_path):
    reader = ChipReader(store, "image")
    before = reader.read(0)
    evict_from_page_cache([reader.chunk_file(0)])
    np.testing.assert_array_equal(reader.read(0), before)
    with pytest.raises(FileNotFoundError):
        evict_from_page_cache([tmp_path / "missing.bin"])


# benchmark smoke runs -----------------------------------------------------------------------------------
def test_bench_store_vs_hdf5_small(tmp_path):
    result = bench_store_vs_hdf5(tmp_path, n_chips=6, batch_size=3, n_batches=2, xarray=False)
    for path in ("hdf5", "store", "store_per_chip", "hdf5_dataset", "store_dataset"):
        assert result[f"{path}_s_per_batch"] > 0
    for path in ("hdf5", "store", "store_per_chip"):
        assert result[f"{path}_cold_s_per_batch"] > 0
    assert result["ratio"] == pytest.approx(result["hdf5_s_per_batch"] / result["store_s_per_batch"])
    assert len(result["ratio_rounds"]) == 3 and all(ratio > 0 for ratio in result["ratio_rounds"])
    assert result["ratio_cold"] == pytest.approx(result["hdf5_cold_s_per_batch"] / result["store_cold_s_per_batch"])
    assert result["n_chips"] == 6 and result["chip_shape"] == [14, 128, 128]
    # the store holds the same pixels plus the label and valid planes: within a few percent of the HDF5 bytes
    assert 0.9 < result["store_bytes"] / result["hdf5_bytes"] < 1.2
    assert "note" in result and "store_xarray_s_per_batch" not in result


@pytest.mark.slow  # builds and steps the demo U-Net
def test_bench_loader_vs_model_small(tmp_path):
    result = bench_loader_vs_model(tmp_path, sizes=(16,), batch_size=2, num_workers=0, n_batches=2, steps=1, warmup=0)
    entry = result["by_size"]["16"]
    assert entry["loader_s_per_batch"] > 0 and entry["train_step_s"] > 0
    assert entry["ratio"] == pytest.approx(entry["train_step_s"] / entry["loader_s_per_batch"])
    assert result["ratio_min"] == entry["ratio"] and result["bands"] == 15


@pytest.mark.slow  # starts a Lightning Trainer
def test_run_benchmark_train_writes_json(tmp_path):
    path = run_benchmark("train", tmp_path, quick=True)
    assert path.parent == tmp_path / "bench" and path.suffix == ".json"
    result = json.loads(path.read_text())["train"]
    for name in ("bare", "workbench"):
        assert result[f"{name}_step_seconds"] > 0 and result[f"{name}_peak_rss_mb"] > 0
        assert len(result[f"{name}_step_seconds_all"]) == result["steps"] * result["repeats"]
    assert result["ratio_workbench_over_bare"] == pytest.approx(
        result["workbench_step_seconds"] / result["bare_step_seconds"]
    )


def test_run_benchmark_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_benchmark("disk", tmp_path)

"""Benchmarks: the pairing method (with a simulated clock) and quick runs of every bench (structure, never timings)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import zarr

from workbench.bench import run_benchmark, summary_html, summary_rows
from workbench.bench.data import (
    MemmapChips,
    SingleHDF5,
    bench_store_reads,
    evict_from_page_cache,
    random_store,
    write_single_hdf5,
)
from workbench.bench.pairing import RefusalRule, log_iqr, paired_ratio
from workbench.data.dataset import ChipDataset
from workbench.data.store import BandSpec, ChipReader

BANDS = [BandSpec(name, "S2L2A", True) for name in ("B02", "B03", "B04")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_store(tmp_path_factory.mktemp("bench") / "store", n_chips=5, size=8, bands=BANDS, seed=3)


# --------------------------------------------------------------------------- pairing with a simulated clock


class Machine:
    """A simulated machine: a run advances a fake clock by its cost x the machine's slowdown, plus a random delay.

    Neighbours start and stop between pairs (every second run): the slowdown jumps anywhere in 1x..5x.
    """

    def __init__(self, seed: int) -> None:
        self.clock = 0.0
        self.slowdown = 1.0
        self.runs = 0
        self.rng = random.Random(seed)

    def now(self) -> float:
        return self.clock

    def run(self, cost: float) -> None:
        if self.runs % 2 == 0:
            self.slowdown = math.exp(self.rng.uniform(0.0, math.log(5.0)))
        self.runs += 1
        self.clock += cost * self.slowdown + self.rng.uniform(0.0, 0.02 * cost)


def test_pairing_recovers_a_true_ratio_of_1_5_under_random_slowdowns():
    machine = Machine(seed=1)
    calls: list[str] = []

    def run_a() -> None:
        calls.append("a")
        machine.run(1.5)

    def run_b() -> None:
        calls.append("b")
        machine.run(1.0)

    result = paired_ratio(run_a, run_b, pairs=12, warmup=0, timer=machine.now, monitor_load=False)
    # the runs' own times scatter over a factor of several, and a ratio of medians would be off ...
    assert max(result["b_seconds"]) / min(result["b_seconds"]) > 2.5
    # ... yet every pair's ratio is 1.5 within the injected delays, and the median is reported
    assert result["refused"] is None
    assert result["ratio"] == pytest.approx(1.5, rel=0.03)
    assert result["ratio_min"] >= 1.5 / 1.03 and result["ratio_max"] <= 1.5 * 1.03
    assert len(result["pair_ratios"]) == 12
    assert calls[:6] == ["a", "b", "b", "a", "a", "b"]  # alternating order within pairs


def test_pairing_refuses_pure_noise_with_its_reason():
    machine = Machine(seed=2)

    def noisy() -> None:  # A and B are the same work; every run alone is slowed by an independent 1x..25x
        machine.runs = 0
        machine.run(1.0 * math.exp(machine.rng.uniform(0.0, math.log(5.0))))

    result = paired_ratio(noisy, noisy, pairs=12, warmup=0, timer=machine.now, monitor_load=False)
    assert result["ratio"] is None
    assert "interquartile range of log-ratios" in result["refused"]
    assert result["log_iqr"] > RefusalRule().max_log_iqr
    assert result["ratio_median"] is not None  # the raw figures stay in the record


def test_pairing_refuses_too_few_pairs_and_uses_reported_seconds():
    result = paired_ratio(lambda: 3.0, lambda: 2.0, pairs=3, warmup=1, monitor_load=False)
    assert result["pair_ratios"] == [1.5, 1.5, 1.5]
    assert result["ratio"] is None and "only 3 pairs" in result["refused"]
    assert paired_ratio(lambda: 3.0, lambda: 2.0, pairs=5, monitor_load=False)["ratio"] == 1.5


def test_pairing_runs_between_hook_before_every_timed_run_and_records_load():
    hooks: list[int] = []
    calls: list[str] = []
    result = paired_ratio(
        lambda: calls.append("a") or 1.0,  # type: ignore[func-returns-value]
        lambda: calls.append("b") or 1.0,  # type: ignore[func-returns-value]
        pairs=2,
        warmup=0,
        between=lambda: hooks.append(len(calls)),
    )
    assert hooks == [0, 1, 2, 3]
    assert result["load"]["cpu_count"] >= 1 and len(result["pair_cpu_percent"]) == 2


def test_log_iqr_and_rule():
    assert log_iqr([2.0, 2.0, 2.0]) == 0.0
    assert log_iqr([1.0, math.e, math.e**2, math.e**3, math.e**4]) == pytest.approx(2.0)
    rule = RefusalRule(min_pairs=2, max_log_iqr=0.1)
    assert rule.reason([1.0, 1.05, 1.02]) is None
    assert "too scattered" in str(rule.reason([1.0, 2.0, 4.0]))


# --------------------------------------------------------------------------- data competitors


def test_read_raw_selects_bands_and_returns_independent_writable_arrays(store):
    image = zarr.open_array(str(store / "chips.zarr" / "image"), mode="r")[:]
    dataset = ChipDataset(store, [3, 1], bands=["B04", "B02"])
    raw, label, valid = dataset.read_raw(0)
    np.testing.assert_array_equal(raw, image[3][[2, 0]])
    assert raw.dtype == np.float32 and label.dtype == np.uint8 and valid.dtype == bool


def test_single_hdf5_and_memmap_return_the_store_chips(store, tmp_path):
    dataset = ChipDataset(store, np.arange(5))
    everything = dataset.read_raw_batch(np.arange(5))
    single = SingleHDF5(write_single_hdf5(tmp_path / "chips.h5", *everything))
    memmap = MemmapChips.write(tmp_path / "mm", *everything)
    positions = np.array([1, 3, 4])
    expected = dataset.read_raw_batch(positions)
    for reader in (single, memmap):
        got = reader.read_batch(positions)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        reader.close()
        np.testing.assert_array_equal(reader.read_batch(positions)[0], expected[0])  # reopens after close
    import h5py

    with h5py.File(single.path) as handle:
        assert handle["image"].chunks == (1, *everything[0].shape[1:])  # one chunk per chip


def test_evict_from_page_cache_keeps_contents_and_names_missing_file(store, tmp_path):
    reader = ChipReader(store, "image")
    before = reader.read(0)
    evict_from_page_cache([reader.chunk_file(0)])
    np.testing.assert_array_equal(reader.read(0), before)
    with pytest.raises(FileNotFoundError):
        evict_from_page_cache([tmp_path / "missing.bin"])


def test_bench_store_reads_pairs_every_competitor_warm_and_cold(tmp_path):
    result = bench_store_reads(tmp_path, n_chips=6, batch_size=3, block=1, pairs=2, cold_pairs=1)
    for state, pairs in (("warm", 2), ("cold", 1)):
        assert set(result[state]) == {"per_chip_files", "hdf5_single", "memmap"}
        for name, entry in result[state].items():
            assert entry["names"] == [name, "store"] and len(entry["pair_ratios"]) == pairs
            assert entry["ratio"] is None and "pairs" in entry["refused"]  # too few pairs to judge
            assert result["verdicts"][f"{state}/{name}"].startswith(f"{name}: no verdict")
    sizes = result["bytes"]
    # every layout holds the same pixels: within a few percent of each other
    assert 0.9 < sizes["hdf5_single"] / sizes["memmap"] < 1.1
    assert 0.9 < sizes["store"] / sizes["per_chip_files"] < 1.2


# --------------------------------------------------------------------------- summary page


def test_summary_rows_and_html_show_ratios_and_refusals():
    ok = paired_ratio(lambda: 2.0, lambda: 1.0, pairs=5, monitor_load=False)
    refused = paired_ratio(lambda: 2.0, lambda: 1.0, pairs=2, monitor_load=False)
    results = {
        "started": "now",
        "quick": True,
        "train": {"demo": ok, "terramind_tiny": refused},
        "review": {"chips_per_s": 100.0, "block_chips_per_s": {"min": 90.0}, "peak_increase_mb": 3.0},
    }
    rows = summary_rows(results)
    by_name = {row.get("comparison", row.get("figure")): row for row in rows}
    assert by_name["train/demo"]["ratio"] == 2.0 and by_name["train/demo"]["refused"] is None
    assert by_name["train/terramind_tiny"]["ratio"] is None
    assert by_name["review chips per second"]["value"] == 100.0
    page = summary_html(results, "bench")
    assert "refused: only 2 pairs" in page and "<svg" in page and "review chips per second" in page


# --------------------------------------------------------------------------- quick runs of every bench


def _check_paired(entry: dict) -> None:
    assert entry["pair_ratios"]
    assert entry["ratio"] is None if entry["refused"] else entry["ratio"] == entry["ratio_median"]
    assert all(value > 0 for name in entry["names"] for value in entry[f"{name}_seconds"])


def test_run_benchmark_review_writes_json_and_html(tmp_path):
    path = run_benchmark("review", tmp_path, quick=True)
    assert path.parent == tmp_path / "bench" and path.suffix == ".json"
    assert path.with_suffix(".html").is_file()
    results = json.loads(path.read_text())
    review = results["review"]
    assert review["n_chips"] == 200 and review["scored_rows"] == 200 and review["chip_shape"] == [15, 128, 128]
    assert review["chips_per_s"] > 0 and review["peak_rss_mb"] > 0
    assert review["block_chips_per_s"]["min"] <= review["block_chips_per_s"]["max"]
    assert results["load"]["cpu_count"] >= 1 and "refusal_rule" in results


@pytest.mark.slow  # starts Lightning Trainers and DataLoader workers
def test_run_benchmark_train_quick_pairs_whole_epochs(tmp_path):
    path = run_benchmark("train", tmp_path, quick=True)
    demo = json.loads(path.read_text())["train"]["demo"]
    _check_paired(demo)
    assert demo["names"] == ["workbench", "bare"] and demo["pairs"] == 2
    assert demo["ema"] is True and demo["num_workers"] == 1
    assert demo["startup_seconds_median"]["workbench"] > 0


@pytest.mark.slow  # builds the demo U-Net and runs a limited child process
def test_run_benchmark_infer_quick_limits_the_child(tmp_path):
    path = run_benchmark("infer", tmp_path, quick=True)
    infer = json.loads(path.read_text())["infer"]
    _check_paired(infer["sliding_window"])
    raster = infer["large_raster"]
    assert raster["child_exit_code"] == 0, raster.get("stderr_tail")
    assert raster["address_space_limit_mb"] == pytest.approx(raster["start_address_space_mb"] + raster["budget_mb"])
    assert raster["raster_shape"][0] == 15 and raster["seconds"] > 0 and raster["megapixels_per_s"] > 0
    assert "random weights" in raster["model"]
    _check_paired(raster["predict_vs_bare"])


@pytest.mark.slow  # DataLoader workers and the demo U-Net
def test_run_benchmark_data_quick(tmp_path):
    path = run_benchmark("data", tmp_path, quick=True)
    data = json.loads(path.read_text())["data"]
    for entry in data["store_reads"]["warm"].values():
        _check_paired(entry)
    _check_paired(data["loader_vs_model"]["by_size"]["32"])


def test_run_benchmark_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_benchmark("disk", tmp_path)

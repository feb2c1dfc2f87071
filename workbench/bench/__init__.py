"""Benchmarks: speed and memory goals measured side by side in one run, written under reports/bench/."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench.io import write_json_atomic


def _data(quick: bool) -> dict[str, Any]:
    from workbench.bench.data import bench_loader_vs_model, bench_store_vs_hdf5

    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            reads = bench_store_vs_hdf5(Path(tmp), n_chips=12, batch_size=4, n_batches=3, xarray=False)
            loader = bench_loader_vs_model(Path(tmp), sizes=(32,), batch_size=4, n_batches=2, steps=1, warmup=0)
        else:
            reads = bench_store_vs_hdf5(Path(tmp))
            loader = bench_loader_vs_model(Path(tmp))
    return {"store_vs_hdf5": reads, "loader_vs_model": loader}


def _train(quick: bool) -> dict[str, Any]:
    from workbench.bench.train import bench_train

    if quick:
        return bench_train(bands=4, size=32, batch_size=2, steps=2, warmup=1, repeats=1, threads=1)
    return bench_train()


def _infer(quick: bool) -> dict[str, Any]:
    from workbench.bench.infer import bench_infer

    with tempfile.TemporaryDirectory() as tmp:
        return bench_infer(Path(tmp), quick=quick)


def _review(quick: bool) -> dict[str, Any]:
    from workbench.bench.review import bench_review

    return bench_review(quick)


BENCHMARKS = {"data": _data, "train": _train, "infer": _infer, "review": _review}


def run_benchmark(what: str, reports: Path, quick: bool = False) -> Path:
    """Run one benchmark (or `all`) and write its results as JSON under `<reports>/bench/`."""
    names = list(BENCHMARKS) if what == "all" else [what]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown}; choose from {[*BENCHMARKS, 'all']}")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results = {"started": stamp, "quick": quick}
    for name in names:
        results[name] = BENCHMARKS[name](quick)
    return write_json_atomic(Path(reports) / "bench" / f"{what}-{stamp}.json", results)

"""Benchmarks: speed and memory goals measured side by side, written under reports/bench/.

Every comparison uses the paired, interleaved method of `workbench.bench.pairing` (short A/B pairs in
alternating order, per-pair ratios with their range, the machine's load, and a refusal with its reason
when the pairs disagree). `run_benchmark` writes the full results as JSON and a one-page HTML summary
with the figures (`<what>-<stamp>.json` / `.html`).
"""

from __future__ import annotations

import html
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench.bench.pairing import DEFAULT_RULE, machine_load
from workbench.io import write_json_atomic, write_text_atomic


def _data(quick: bool, reports: Path) -> dict[str, Any]:
    from workbench.bench.data import bench_loader_vs_model, bench_store_reads

    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            reads = bench_store_reads(Path(tmp), n_chips=8, batch_size=4, block=1, pairs=2, cold_pairs=1)
            loader = bench_loader_vs_model(Path(tmp), sizes=(32,), batch_size=2, num_workers=1, batches=1, pairs=1)
        else:
            reads = bench_store_reads(Path(tmp))
            loader = bench_loader_vs_model(Path(tmp))
    return {"store_reads": reads, "loader_vs_model": loader}


def _train(quick: bool, reports: Path) -> dict[str, Any]:
    from workbench.bench.train import bench_train

    return bench_train(quick=quick)


def _infer(quick: bool, reports: Path) -> dict[str, Any]:
    from workbench.bench.infer import bench_infer, find_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        return bench_infer(Path(tmp), quick=quick, model_dir=find_demo_model(reports))


def _review(quick: bool, reports: Path) -> dict[str, Any]:
    from workbench.bench.review import bench_review

    return bench_review(n_chips=200, block=50) if quick else bench_review()


BENCHMARKS: dict[str, Callable[[bool, Path], dict[str, Any]]] = {
    "data": _data,
    "train": _train,
    "infer": _infer,
    "review": _review,
}


def run_benchmark(what: str, reports: Path, quick: bool = False) -> Path:
    """Run one benchmark (or `all`); write its results as JSON and an HTML summary under `<reports>/bench/`.

    Returns the JSON path; the HTML page sits beside it with the same stem.
    """
    names = list(BENCHMARKS) if what == "all" else [what]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown}; choose from {[*BENCHMARKS, 'all']}")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {"started": stamp, "quick": quick, "refusal_rule": DEFAULT_RULE.describe()}
    seconds: dict[str, float] = {}
    with machine_load(interval=1.0) as load:
        for name in names:
            began = time.perf_counter()
            results[name] = BENCHMARKS[name](quick, Path(reports))
            seconds[name] = time.perf_counter() - began
    results["seconds"] = seconds
    results["load"] = load.summary()
    results["summary"] = summary_rows(results)
    out = Path(reports) / "bench"
    path = write_json_atomic(out / f"{what}-{stamp}.json", results)
    write_text_atomic(out / f"{what}-{stamp}.html", summary_html(results, f"workbench bench {what}"))
    return path


# --------------------------------------------------------------------------- summary


def _paired_results(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, result) of every paired comparison in a results tree."""
    if isinstance(node, dict):
        if "pair_ratios" in node and "names" in node:
            yield path, node
            return
        for key, value in node.items():
            if key != "summary":
                yield from _paired_results(value, f"{path}/{key}" if path else str(key))


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per paired comparison (ratio or refusal with its reason, per-pair range, load) and per figure."""
    rows: list[dict[str, Any]] = []
    for path, result in _paired_results({k: v for k, v in results.items() if k in BENCHMARKS}):
        load = result.get("load", {}).get("loadavg_1m", {})
        rows.append(
            {
                "comparison": path,
                "ratio_of": f"{result['names'][0]} / {result['names'][1]}",
                "ratio": result["ratio"],
                "refused": result["refused"],
                "ratio_min": result["ratio_min"],
                "ratio_median": result["ratio_median"],
                "ratio_max": result["ratio_max"],
                "pairs": len(result["pair_ratios"]),
                "pair_ratios": result["pair_ratios"],
                "cpu_ratio_median": result.get("cpu_ratio_median"),
                "loadavg_median": load.get("median"),
            }
        )
    review = results.get("review")
    if isinstance(review, dict):
        rows.append(
            {"figure": "review chips per second", "value": review["chips_per_s"], "range": review["block_chips_per_s"]}
        )
        rows.append({"figure": "review peak RSS increase (MiB)", "value": review["peak_increase_mb"]})
    raster = results.get("infer", {}).get("large_raster") if isinstance(results.get("infer"), dict) else None
    if isinstance(raster, dict):
        for key, label in (
            ("raster_to_budget", "raster size / memory budget"),
            ("peak_increase_mb", "large raster peak RSS increase (MiB)"),
            ("megapixels_per_s", "large raster megapixels per second"),
            ("bare_megapixels_per_s", "bare forward megapixels per second"),
        ):
            if raster.get(key) is not None:
                rows.append({"figure": label, "value": raster[key]})
        if raster.get("error"):
            rows.append({"figure": "large raster", "value": None, "refused": raster["error"]})
    sweep = results.get("infer", {}).get("threshold_sweep") if isinstance(results.get("infer"), dict) else None
    if isinstance(sweep, dict) and sweep.get("pixels_per_s"):
        rows.append({"figure": "threshold sweep pixels per second", "value": sweep["pixels_per_s"]})
    return rows


def _strip(ratios: list[float], width: int = 220, height: int = 18) -> str:
    """An inline SVG strip of per-pair ratios on a log axis from 1/16 to 16, with a line at 1."""

    def x(value: float) -> float:
        clipped = min(max(value, 1 / 16), 16.0)
        return (math.log(clipped) + math.log(16.0)) / (2 * math.log(16.0)) * (width - 8) + 4

    dots = "".join(
        f'<circle cx="{x(r):.1f}" cy="{height / 2}" r="3" fill="#1f77b4" fill-opacity="0.6"/>'
        for r in ratios
        if math.isfinite(r) and r > 0
    )
    one = x(1.0)
    return (
        f'<svg width="{width}" height="{height}" role="img"><line x1="{one:.1f}" x2="{one:.1f}" y1="0" '
        f'y2="{height}" stroke="#999"/>{dots}</svg>'
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return html.escape(str(value))


def summary_html(results: dict[str, Any], title: str) -> str:
    """A small HTML page: paired comparisons (ratio or refusal, range, strip of per-pair ratios), figures, load."""
    rows = results.get("summary") or summary_rows(results)
    paired = [row for row in rows if "comparison" in row]
    figures = [row for row in rows if "figure" in row]
    lines = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}.refused{color:#b00}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>started {html.escape(str(results.get('started')))} UTC; quick: {results.get('quick')}; "
        f"machine load (1-min load average): {_fmt(results.get('load', {}).get('loadavg_1m'))}; "
        f"cores: {_fmt(results.get('load', {}).get('cpu_count'))}</p>",
        f"<p>Refusal rule: {html.escape(str(results.get('refusal_rule', DEFAULT_RULE.describe())))}.</p>",
        "<h2>Paired comparisons</h2><table><tr><th>comparison</th><th>ratio of</th><th>ratio (median of pairs)</th>"
        "<th>min</th><th>max</th><th>pairs (log axis 1/16..16, line at 1)</th><th>CPU-time ratio</th>"
        "<th>load avg</th></tr>",
    ]
    for row in paired:
        ratio = (
            f"<span class='refused'>refused: {html.escape(row['refused'])}</span>"
            if row["refused"]
            else _fmt(row["ratio"])
        )
        lines.append(
            f"<tr><td>{html.escape(row['comparison'])}</td><td>{html.escape(row['ratio_of'])}</td><td>{ratio}</td>"
            f"<td>{_fmt(row['ratio_min'])}</td><td>{_fmt(row['ratio_max'])}</td><td>{_strip(row['pair_ratios'])}"
            f" {row['pairs']}</td><td>{_fmt(row['cpu_ratio_median'])}</td><td>{_fmt(row['loadavg_median'])}</td></tr>"
        )
    lines.append("</table><h2>Figures</h2><table><tr><th>figure</th><th>value</th><th>range</th></tr>")
    for row in figures:
        value = (
            f"<span class='refused'>{html.escape(row['refused'])}</span>" if row.get("refused") else _fmt(row["value"])
        )
        lines.append(f"<tr><td>{html.escape(row['figure'])}</td><td>{value}</td><td>{_fmt(row.get('range'))}</td></tr>")
    lines.append("</table></body></html>")
    return "\n".join(lines) + "\n"

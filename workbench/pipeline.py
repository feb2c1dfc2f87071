"""Run the paired notebooks headless with papermill and keep a browsable index of runs.

A run lives in `<reports>/<experiment>/<run-id>/` (its files are named in `workbench.run`): the
executed notebooks (`.ipynb` and `.html`), the frozen `params.yaml` every notebook reads,
`run.json` (status, timings, git commit, package versions), `metrics.json` (the merged flat
metrics of every stage), `figures/`, `diagnostics/`, `model/` and logs. `<reports>/index.html`
lists every run with its key metrics.
"""

from __future__ import annotations

import html
import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench.io import read_json, write_json_atomic, write_text_atomic
from workbench.params import load_params
from workbench.run import (
    NOTEBOOKS,
    STAGES,
    RunLayout,
    git_commit,
    index_file,
    new_run_id,
    notebooks_dir,
    package_versions,
    project_root,
    run_records,
)

KEY_METRICS = [
    "test.iou",
    "val.iou",
    "calibration.temperature",
    "calibration.threshold",
    "review.top_k_precision",
    "review.top_k_recall",
    "wall_seconds",
]


class PipelineError(RuntimeError):
    """A notebook of the run failed; the message names the notebook and the cell."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    status: str


def to_notebook(py_path: Path) -> Any:
    """Read a jupytext percent script as a notebook with a python3 kernelspec (papermill needs one)."""
    import jupytext

    notebook = jupytext.read(py_path)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata.setdefault("language_info", {"name": "python"})
    return notebook


def export_html(notebook_path: Path) -> Path:
    """Render an executed notebook to a standalone HTML file beside it."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(notebook_path, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(notebook)
    return write_text_atomic(notebook_path.with_suffix(".html"), body)


def execute_notebook(name: str, run_dir: Path, parameters: dict[str, Any], cwd: Path, progress: bool) -> Path:
    """Execute one notebook into the run directory; raise PipelineError naming the failing cell."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebooks_dir() / f"{name}.py"
    if not source.is_file():
        raise FileNotFoundError(f"notebook {source} is missing")
    layout = RunLayout(run_dir)
    staged = layout.staged_notebook(name)
    staged.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(to_notebook(source), staged)
    output = layout.notebook(name)
    try:
        papermill.execute_notebook(
            str(staged),
            str(output),
            parameters=parameters,
            cwd=str(cwd),
            kernel_name="python3",
            progress_bar=progress,
            log_output=False,
            request_save_on_cell_execute=True,
        )
    except PapermillExecutionError as exc:
        export_html(output)
        raise PipelineError(
            f"notebook {name} failed in cell {exc.exec_count} (index {exc.cell_index}): {exc.ename}: {exc.evalue}; "
            f"the partial notebook is {output}"
        ) from None
    finally:
        staged.unlink(missing_ok=True)
    export_html(output)
    return output


def merge_metrics(run_dir: Path) -> dict[str, Any]:
    """Merge the stage metric files (in stage order) into one flat dict."""
    merged: dict[str, Any] = {}
    layout = RunLayout(run_dir)
    for stage in STAGES:
        path = layout.stage_metrics(stage)
        if path.is_file():
            merged.update(read_json(path))
    return merged


def run_pipeline(
    params_file: str | Path,
    overrides: list[str] | None = None,
    reports: str | Path = "reports",
    run_id: str | None = None,
    notebooks: list[str] | None = None,
    progress: bool = True,
) -> RunResult:
    """Execute the notebooks of one run in order; a failure keeps the partial report and marks it failed."""
    overrides = list(overrides or [])
    params = load_params(params_file, overrides)
    cwd = Path.cwd()
    reports = Path(reports).resolve()
    layout = RunLayout.at(reports, params.experiment, run_id or new_run_id())
    run_dir = layout.root
    run_dir.mkdir(parents=True, exist_ok=False)
    layout.freeze_params(params)
    info: dict[str, Any] = {
        "experiment": params.experiment,
        "run_id": run_dir.name,
        "params_file": str(params_file),
        "overrides": overrides,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": "running",
        "git_commit": git_commit(project_root()),
        "versions": package_versions(),
        "command": sys.argv,
        "notebooks": {},
    }
    write_json_atomic(layout.info, info)
    parameters = {"params_file": str(Path(params_file).resolve()), "overrides": overrides, "run_dir": str(run_dir)}
    started = time.perf_counter()
    error: PipelineError | None = None
    for name in notebooks or NOTEBOOKS:
        t0 = time.perf_counter()
        try:
            execute_notebook(name, run_dir, parameters, cwd, progress)
            info["notebooks"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2)}
        except PipelineError as exc:
            info["notebooks"][name] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 2)}
            info["error"] = str(exc)
            error = exc
            break
    if error is None and params.evaluate.external and (layout.model / "model.pt").is_file():
        info["external"] = score_external_stores(params, run_dir, reports)
    metrics = merge_metrics(run_dir)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    write_json_atomic(layout.metrics, metrics)
    info["status"] = "failed" if error else "complete"
    info["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_json_atomic(layout.info, info)
    write_index(reports)
    if error is not None:
        raise error
    return RunResult(run_dir, metrics, info["status"])


def score_external_stores(params: Any, run_dir: Path, reports: Path) -> list[dict[str, Any]]:
    """Score the run's (calibrated) model on each `evaluate.external` store; one linked run per store."""
    from workbench.stages.external import evaluate_external

    done = []
    for store in params.evaluate.external:
        external_dir, metrics = evaluate_external(run_dir, store, reports=reports, tta=params.evaluate.tta)
        done.append({"store": str(store), "run_dir": str(external_dir), "iou": metrics.get("test.calibrated.iou")})
    return done


def run_seeds(
    params_file: str | Path,
    seeds: list[int],
    overrides: list[str] | None = None,
    reports: str | Path = "reports",
    progress: bool = True,
) -> tuple[list[RunResult], Path]:
    """Run the pipeline once per seed and write a mean ± std table of the key metrics."""
    from workbench.evaluate.summary import seed_summary

    results = [
        run_pipeline(params_file, [*(overrides or []), f"seed={seed}"], reports, new_run_id(seed), progress=progress)
        for seed in seeds
    ]
    params = load_params(params_file, overrides)
    table = seed_summary([{k: v for k, v in r.metrics.items() if isinstance(v, int | float)} for r in results])
    out = Path(reports).resolve() / params.experiment / f"seeds-{new_run_id()}.csv"
    write_text_atomic(out, table.to_csv())
    return results, out


def _row(run_json: Path) -> dict[str, Any]:
    info = json.loads(run_json.read_text(encoding="utf-8"))
    metrics_file = RunLayout(run_json.parent).metrics
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    return {"dir": run_json.parent, "info": info, "metrics": metrics}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else html.escape(str(value))


def write_index(reports: Path) -> Path:
    """Rewrite `<reports>/index.html`: one row per run (newest first) with links to its notebooks."""
    reports = Path(reports)
    rows = sorted((_row(p) for p in run_records(reports)), key=lambda r: r["info"].get("started", ""), reverse=True)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["date", "experiment", "run", "status", "parameters"])
    head += "".join(f"<th>{html.escape(k)}</th>" for k in KEY_METRICS) + "<th>notebooks</th>"
    body = []
    for row in rows:
        info, rel = row["info"], row["dir"].relative_to(reports)
        layout = RunLayout(row["dir"])
        status = info.get("status", "?")
        links = " ".join(
            f'<a href="{html.escape(str(layout.notebook_html(name).relative_to(reports)))}">{name[:2]}</a>'
            for name in NOTEBOOKS
            if layout.notebook_html(name).is_file()
        )
        cells = [
            info.get("started", ""),
            info.get("experiment", ""),
            f'<a href="{html.escape(str(rel))}/">{html.escape(info.get("run_id", ""))}</a>',
            f'<span class="{html.escape(status)}">{html.escape(status)}</span>',
            html.escape(" ".join([str(info.get("params_file", "")), *info.get("overrides", [])])),
        ]
        cells = [c if c.startswith("<") else html.escape(c) for c in cells[:2]] + cells[2:]
        cells += [_fmt(row["metrics"].get(k)) for k in KEY_METRICS] + [links]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Workbench runs</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; }} th {{ background: #eee; }}
.failed {{ color: #b00; font-weight: bold; }} .complete {{ color: #070; }} .running {{ color: #a60; }}
</style></head><body>
<h1>Workbench runs</h1>
<p>{len(rows)} run(s). Metrics: test/val IoU at the default threshold, temperature and threshold from
calibration, top-k precision/recall of the label-noise review, wall time in seconds.</p>
<table><tr>{head}</tr>
{"".join(body)}
</table></body></html>
"""
    return write_text_atomic(index_file(reports), page)

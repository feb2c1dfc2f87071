"""Run the paired notebooks headless with papermill and keep a browsable index of runs.

A run lives in `<reports>/<experiment>/<run-id>/` (its files are named in `workbench.run`): the
executed notebooks (`.ipynb` and `.html`), the frozen `params.yaml` every notebook reads,
`run.json` (status, timings, git commit, package versions), `metrics.json` (the merged flat
metrics of every stage), `figures/`, `diagnostics/`, `model/` and logs. `<reports>/index.html`
lists every run with its key metrics.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench.evaluate.summary import seed_summary
from workbench.io import read_json, write_json_atomic, write_text_atomic
from workbench.params import load_params
from workbench.report_pages import export_offline_html, write_reports_index
from workbench.run import (
    NOTEBOOKS,
    STAGES,
    RunLayout,
    file_sha256,
    git_commit,
    git_dirty,
    new_run_id,
    notebooks_dir,
    package_versions,
    project_root,
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
    """Render an executed notebook to a standalone HTML file beside it (viewable offline)."""
    return export_offline_html(notebook_path)


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
        "git_dirty": git_dirty(project_root()),  # tracked sources (notebooks, package) differ from the commit
        "cwd": str(cwd),  # relative parameter paths (data.store) are taken from here
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
        source = notebooks_dir() / f"{name}.py"
        digest = file_sha256(source) if source.is_file() else None  # the script as executed
        try:
            execute_notebook(name, run_dir, parameters, cwd, progress)
            info["notebooks"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2)}
        except PipelineError as exc:
            info["notebooks"][name] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 2)}
            info["error"] = str(exc)
            error = exc
            break
        finally:
            info["notebooks"].setdefault(name, {})["source_sha256"] = digest
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


def run_seeds(
    params_file: str | Path,
    seeds: list[int],
    overrides: list[str] | None = None,
    reports: str | Path = "reports",
    progress: bool = True,
) -> tuple[list[RunResult], Path]:
    """Run the pipeline once per seed and write a mean ± std table of the key metrics."""

    results = [
        run_pipeline(params_file, [*(overrides or []), f"seed={seed}"], reports, new_run_id(seed), progress=progress)
        for seed in seeds
    ]
    params = load_params(params_file, overrides)
    table = seed_summary([{k: v for k, v in r.metrics.items() if isinstance(v, int | float)} for r in results])
    out = Path(reports).resolve() / params.experiment / f"seeds-{new_run_id()}.csv"
    write_text_atomic(out, table.to_csv())
    return results, out


def write_index(reports: Path) -> Path:
    """Rewrite `<reports>/index.html` (sortable, filterable, key metrics per stage) and each run's landing page."""
    return write_reports_index(reports)

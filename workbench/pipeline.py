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
from pathlib import Path
from typing import Any

from workbench.evaluate.summary import seed_summary
from workbench.io import atomic_notebook_target, read_json, write_json_atomic, write_text_atomic
from workbench.params import load_params
from workbench.report_pages import export_offline_html, write_reports_index
from workbench.run import (
    NOTEBOOKS,
    STAGE_NAMES,
    STAGES,
    TRAINING,
    RunLayout,
    file_sha256,
    git_commit,
    git_dirty,
    launcher_rank,
    launcher_run_id,
    launcher_world_size,
    new_run_id,
    notebooks_dir,
    package_versions,
    project_root,
)
from workbench.runstatus import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    KILLED,
    RUNNING,
    RunInterrupted,
    heartbeat,
    index_lock,
    mark_dead_runs,
    now,
    process_record,
    run_alive,
    stop_on_signals,
)
from workbench.stages.external import evaluate_external, external_store
from workbench.tracking import finish_tracking, track_stage
from workbench.train.launch import train_run

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
    """A notebook of the run failed; the message names the notebook and the cell (also kept as attributes)."""

    def __init__(self, message: str, stage: str | None = None, cell: int | None = None, cause: str | None = None):
        super().__init__(message)
        self.stage, self.cell, self.cause = stage, cell, cause or message


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


def failing_cell(notebook_path: Path) -> tuple[int | None, int | None]:
    """(index, execution count) of the last cell papermill started in a partly executed notebook.

    A code cell whose kernel died before numbering it gets the number it would have had: one more
    than the last numbered cell before it (the kernel numbers the cells it executes in order).
    """
    import nbformat

    try:
        notebook = nbformat.read(notebook_path, as_version=4)
    except (OSError, ValueError):
        return None, None
    started = [
        (index, cell.get("execution_count"))
        for index, cell in enumerate(notebook.cells)
        if cell.get("metadata", {}).get("papermill", {}).get("start_time")
    ]
    if not started:
        return None, None
    index, count = started[-1]
    if count is None and notebook.cells[index].get("cell_type") == "code":
        numbered = [number for _, number in started[:-1] if isinstance(number, int)]
        count = max(numbered, default=0) + 1
    return index, count


def execute_notebook(
    name: str,
    run_dir: Path,
    parameters: dict[str, Any],
    cwd: Path,
    progress: bool,
    cell_timeout: int | None = None,
) -> Path:
    """Execute one notebook into the run directory; raise PipelineError naming the failing cell and the cause.

    `cell_timeout` (seconds) ends a cell that runs longer (a hang); a kernel that dies (the
    out-of-memory killer, a crash in native code) ends the stage at once instead of leaving it waiting.
    """
    import nbformat
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if name not in NOTEBOOKS:  # never a path: a name like ../../x would run and write outside the project
        raise ValueError(f"unknown notebook {name!r}; a run executes only the stages {', '.join(NOTEBOOKS)}")
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
            atomic_notebook_target(output),  # each save replaces the notebook whole (temp + fsync + rename)
            parameters=parameters,
            cwd=str(cwd),
            kernel_name="python3",
            progress_bar=progress,
            log_output=False,
            request_save_on_cell_execute=True,
            execution_timeout=cell_timeout,
        )
    except PapermillExecutionError as exc:
        export_html(output)
        raise PipelineError(
            f"notebook {name} failed in cell {exc.exec_count} (index {exc.cell_index}): {exc.ename}: {exc.evalue}; "
            f"the partial notebook is {output}",
            stage=name,
            cell=exc.exec_count,
            cause=f"{exc.ename}: {exc.evalue}",
        ) from None
    except (DeadKernelError, CellTimeoutError, RuntimeError) as exc:
        dead = isinstance(exc, DeadKernelError) or "kernel died" in str(exc).lower()
        if not (dead or isinstance(exc, CellTimeoutError)):
            raise
        index, count = failing_cell(output)
        if dead:
            cause = (
                "the kernel died (killed by a signal, e.g. the out-of-memory killer, or crashed); "
                "check the memory of the machine and the batch size"
            )
        else:
            cause = f"the cell ran longer than the cell timeout of {cell_timeout} s and was stopped"
        if output.is_file():
            export_html(output)
        raise PipelineError(
            f"notebook {name} stopped in cell {count} (index {index}): {cause}; the partial notebook is {output}",
            stage=name,
            cell=count,
            cause=cause,
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


def select_notebooks(notebooks: list[str] | None = None, start: str | None = None) -> list[str]:
    """The stage notebooks to run, in stage order: `notebooks` (names or their two-digit prefixes), from `start` on."""

    def resolve(name: str) -> str:
        matches = [nb for nb in NOTEBOOKS if name in (nb, nb[:2]) or nb.startswith(f"{name}_")]
        if len(matches) != 1:
            raise ValueError(f"unknown notebook {name!r}: give one of {', '.join(NOTEBOOKS)} (or 01 ... 04)")
        return matches[0]

    chosen = {resolve(n) for n in notebooks} if notebooks else set(NOTEBOOKS)
    if start is not None:
        first = NOTEBOOKS.index(resolve(start))
        chosen &= set(NOTEBOOKS[first:])
    return [nb for nb in NOTEBOOKS if nb in chosen]


def resolve_run_id(run_id: str | None = None) -> str:
    """The id of a new run: given, else the launcher's (every rank agrees), else a new timestamp.

    Several processes started by a launcher without a shared id would each create their own run
    directory, so that is refused with the fix.
    """
    if run_id:
        if "/" in run_id or run_id in {".", ".."}:
            raise ValueError(f"run id {run_id!r} must be a plain folder name")
        return run_id
    shared = launcher_run_id()
    if shared:
        return shared
    if launcher_world_size() > 1:
        raise ValueError(
            "this process is one of several started by a launcher, which gives no shared run id; "
            "pass the same --run-id to every process (e.g. --run-id $JOB_ID)"
        )
    return new_run_id()


def check_cell_timeout(cell_timeout: int | None) -> None:
    """Refuse a cell timeout that is not a whole number of seconds >= 1 (papermill counts whole seconds)."""
    if cell_timeout is not None and (
        isinstance(cell_timeout, bool) or not isinstance(cell_timeout, int) or cell_timeout < 1
    ):
        raise ValueError(f"cell timeout {cell_timeout!r} must be a whole number of seconds >= 1 (or none)")


def _event(action: str, notebooks: list[str]) -> dict[str, Any]:
    return {"action": action, "started": now(), "status": RUNNING, "notebooks": notebooks, "command": sys.argv}


def _execute_stages(
    layout: RunLayout,
    info: dict[str, Any],
    names: list[str],
    parameters: dict[str, Any],
    reports: Path,
    progress: bool,
    cell_timeout: int | None,
) -> RunResult:
    """Execute `names` in order, keep run.json current and record how the run ended (any way it ends)."""
    cwd = Path.cwd()
    started = time.perf_counter()
    error: BaseException | None = None
    with stop_on_signals(), heartbeat(layout.heartbeat):  # other hosts tell a live run from a lost one by it
        try:
            for name in names:
                t0 = time.perf_counter()
                info["stage"] = name
                source = notebooks_dir() / f"{name}.py"
                info["notebooks"][name] = {
                    "status": RUNNING,
                    "started": now(),
                    "source_sha256": file_sha256(source) if source.is_file() else None,  # the script as executed
                }
                write_json_atomic(layout.info, info)
                try:
                    execute_notebook(name, layout.root, parameters, cwd, progress, cell_timeout)
                    status = "ok"
                except BaseException:
                    status = FAILED
                    raise
                finally:
                    info["notebooks"][name].update(status=status, seconds=round(time.perf_counter() - t0, 2))
                    track_stage(layout.root, name, status)
            info.pop("stage", None)
            run_params = load_params(layout.params)
            if run_params.evaluate.external and (layout.model / "model.pt").is_file():
                info["external"] = score_external_stores(run_params, layout.root, reports)
            info["status"] = COMPLETE
            info["end"] = {"status": COMPLETE}
        except PipelineError as exc:
            error = exc
            info["status"] = FAILED
            info["error"] = str(exc)
            info["end"] = {"status": FAILED, "stage": exc.stage, "cell": exc.cell, "cause": exc.cause}
        except RunInterrupted as exc:
            error = exc
            info["status"] = INTERRUPTED
            info["end"] = {"status": INTERRUPTED, "stage": info.get("stage"), "signal": exc.signal_name}
            if info.get("stage") in info["notebooks"]:
                info["notebooks"][info["stage"]]["status"] = INTERRUPTED
        except Exception as exc:  # anything else (a full disk, a broken kernel start): recorded, then re-raised
            error = exc
            info["status"] = FAILED
            info["error"] = f"{type(exc).__name__}: {exc}"
            info["end"] = {"status": FAILED, "stage": info.get("stage"), "cause": info["error"]}
        metrics = merge_metrics(layout.root)
        previous = read_json(layout.metrics) if layout.metrics.is_file() else {}
        metrics["wall_seconds"] = round(float(previous.get("wall_seconds", 0.0)) + time.perf_counter() - started, 2)
        write_json_atomic(layout.metrics, metrics)
        if layout.ledger_record.is_file():  # the review ledger the stages applied (path, line count, sha256)
            info["review_ledger"] = read_json(layout.ledger_record)
        info["finished"] = now()
        if info.get("history"):
            info["history"][-1].update(status=info["status"], finished=info["finished"])
        write_json_atomic(layout.info, info)
        finish_tracking(layout.root, info["status"])
        write_index(reports)
    if error is not None:
        raise error
    return RunResult(layout.root, metrics, info["status"])


def run_pipeline(
    params_file: str | Path,
    overrides: list[str] | None = None,
    reports: str | Path = "reports",
    run_id: str | None = None,
    notebooks: list[str] | None = None,
    progress: bool = True,
    cell_timeout: int | None = None,
) -> RunResult:
    """Execute the notebooks of a new run in order; however it ends, run.json and the index record it.

    Under a launcher (torchrun, srun) every process resolves the same run directory; only rank 0
    executes the notebooks and writes reports, figures and the index, while the other ranks wait
    for the data to be prepared and join training (`follow_run`).
    """
    check_cell_timeout(cell_timeout)
    overrides = list(overrides or [])
    unknown = [name for name in notebooks or [] if name not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; choose among the stages {', '.join(NOTEBOOKS)}")
    params = load_params(params_file, overrides)
    names = select_notebooks(notebooks)
    reports = Path(reports).resolve()
    layout = RunLayout.at(reports, params.experiment, resolve_run_id(run_id))
    if launcher_rank() != 0:
        return follow_run(layout, names)
    layout.root.mkdir(parents=True, exist_ok=False)
    layout.freeze_params(params)
    info: dict[str, Any] = {
        "experiment": params.experiment,
        "run_id": layout.root.name,
        "params_file": str(params_file),
        "overrides": overrides,
        "started": now(),
        "status": RUNNING,
        "git_commit": git_commit(project_root()),
        "git_dirty": git_dirty(project_root()),  # tracked sources (notebooks, package) differ from the commit
        "cwd": str(Path.cwd()),  # relative parameter paths (data.store) are taken from here
        "versions": package_versions(),
        "command": sys.argv,
        "process": process_record(),
        "cell_timeout": cell_timeout,
        "requested": names,
        "notebooks": {},
        "history": [_event("created", names)],
    }
    write_json_atomic(layout.info, info)
    parameters = {"params_file": str(Path(params_file).resolve()), "overrides": overrides, "run_dir": str(layout.root)}
    return _execute_stages(layout, info, names, parameters, reports, progress, cell_timeout)


def continue_run(
    run_dir: str | Path,
    start: str | None = None,
    notebooks: list[str] | None = None,
    progress: bool = True,
    cell_timeout: int | None = None,
) -> RunResult:
    """Continue or redo stages of an existing run with its frozen parameters.

    Without `start` (`workbench run --resume`), the run goes on from its first stage that did not
    finish, and training from `checkpoints/last.ckpt`; with `start` (`--run-dir RUN --from 03`), the
    stages from `start` on are executed again. run.json keeps one entry per attempt in `history`.
    """
    check_cell_timeout(cell_timeout)
    layout = RunLayout(Path(run_dir).resolve())
    if not layout.info.is_file() or not layout.params.is_file():
        raise FileNotFoundError(f"{layout.root} is not a run directory (it lacks {layout.info.name} or params.yaml)")
    reports = layout.root.parent.parent
    if launcher_rank() == 0:
        with index_lock(reports):
            mark_dead_runs(reports)
    info = read_json(layout.info)
    requested = info.get("requested") or NOTEBOOKS
    if start is None:
        names = [
            nb for nb in select_notebooks(notebooks or requested) if info["notebooks"].get(nb, {}).get("status") != "ok"
        ]
        action = "resumed"
        if not names:
            raise ValueError(f"run {layout.root} has finished every stage it asked for; use --from to redo some")
    else:
        names = select_notebooks(notebooks, start)
        action = f"re-ran from {names[0]}" if names else "re-ran"
        missing = (
            [nb for nb in NOTEBOOKS[: NOTEBOOKS.index(names[0])] if info["notebooks"].get(nb, {}).get("status") != "ok"]
            if names
            else []
        )
        if missing:
            raise ValueError(
                f"run {layout.root} has not finished {', '.join(missing)}, which {names[0]} needs; "
                "continue it with --resume first"
            )
    if launcher_rank() != 0:
        return follow_run(layout, names, fresh=False)
    if info.get("status") == RUNNING and run_alive(info, layout.root) is not False:
        record = info.get("process") or {}
        raise ValueError(
            f"run {layout.root} is still running (process {record.get('pid')} on {record.get('host')}); "
            "wait for it to end, or stop it first"
        )
    info.update(status=RUNNING, process=process_record(), cell_timeout=cell_timeout)
    for key in ("error", "end", "finished"):
        info.pop(key, None)
    info.setdefault("history", []).append(_event(action, names))
    info["requested"] = list(dict.fromkeys([*requested, *names]))
    write_json_atomic(layout.info, info)
    params_file = layout.params
    parameters = {"params_file": str(params_file), "overrides": [], "run_dir": str(layout.root)}
    return _execute_stages(layout, info, names, parameters, reports, progress, cell_timeout)


def follow_run(layout: RunLayout, names: list[str], fresh: bool = True, poll_seconds: float = 1.0) -> RunResult:
    """A non-zero rank of a launched run: wait until rank 0 has prepared the data, then join training.

    Rank 0 executes the notebooks; when its training stage starts the process group, this process
    is one of its members. A run without the training stage needs nothing from the other ranks.
    A new run (`fresh`) that ends before training ends the wait; for a continued run, whose run.json
    still shows the previous attempt's end until rank 0 starts, a failing rank 0 is left to the
    launcher, which stops the other ranks when one exits with an error.
    """

    training = TRAINING.notebook
    if training not in names:
        return RunResult(layout.root, {}, "worker")
    before = [nb for nb in names if NOTEBOOKS.index(nb) < NOTEBOOKS.index(training)]
    while True:
        info = read_json(layout.info) if layout.info.is_file() else {}
        status = info.get("status")
        done = info.get("notebooks", {})
        if status == RUNNING and all(done.get(nb, {}).get("status") == "ok" for nb in before):
            break
        if fresh and status in {FAILED, INTERRUPTED, KILLED, COMPLETE}:
            raise PipelineError(f"rank 0 of run {layout.root} ended ({status}) before training started")
        time.sleep(poll_seconds)
    result = train_run(layout.root)
    return RunResult(layout.root, result.metrics, "worker")


def score_external_stores(params: Any, run_dir: Path, reports: Path) -> list[dict[str, Any]]:
    """Score the run's (calibrated) model on each `evaluate.external` store; one linked run per store."""

    done = []
    for entry in params.evaluate.external:
        store = external_store(entry)
        external_dir, metrics = evaluate_external(run_dir, store, reports=reports, tta=params.evaluate.tta)
        done.append({"store": str(store), "run_dir": str(external_dir), "iou": metrics.get("test.calibrated.iou")})
    return done


def run_seeds(
    params_file: str | Path,
    seeds: list[int],
    overrides: list[str] | None = None,
    reports: str | Path = "reports",
    progress: bool = True,
    notebooks: list[str] | None = None,
    cell_timeout: int | None = None,
    run_id: str | None = None,
) -> tuple[list[RunResult], Path]:
    """Run the pipeline once per seed (every other option kept) and write a mean ± std table of the key metrics."""

    base = resolve_run_id(run_id) if run_id or launcher_run_id() else None
    results = [
        run_pipeline(
            params_file,
            [*(overrides or []), f"seed={seed}"],
            reports,
            f"{base}-s{seed}" if base else new_run_id(seed),
            progress=progress,
            notebooks=notebooks,
            cell_timeout=cell_timeout,
        )
        for seed in seeds
    ]
    params = load_params(params_file, overrides)
    table = seed_summary([{k: v for k, v in r.metrics.items() if isinstance(v, int | float)} for r in results])
    out = Path(reports).resolve() / params.experiment / f"seeds-{base or new_run_id()}.csv"
    if launcher_rank() == 0:
        write_text_atomic(out, table.to_csv())
    return results, out


def write_index(reports: Path) -> Path:
    """Rewrite `<reports>/index.html` (sortable, filterable, key metrics per stage) and each run's landing page.

    The rewrite holds the reports' index lock, so runs finishing at once all appear, and first marks
    `killed` every run whose process vanished while it was running (`workbench.runstatus`).
    """
    reports = Path(reports)
    with index_lock(reports):
        mark_dead_runs(reports)
        return write_reports_index(reports)

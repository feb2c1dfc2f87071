"""Small helpers the notebooks share: open a run, show figures and tables.

`open_run` gives a notebook its parameters and run directory and checks, before any stage starts, what
would otherwise fail deep inside one: a run directory that does not exist or is half written, a notebook
opened on a run that lacks an earlier stage's outputs, a missing chip store, and an `.ipynb` that
disagrees with the paired `.py` script that batch runs execute. Each is a short message in the notebook
(`RunNotReady`), not a traceback.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from workbench.params import Params, ParamsError, load_params
from workbench.run import (
    CALIBRATION,
    DATA_AUDIT,
    INTERACTIVE_RUN,
    NOTEBOOKS,
    REVIEW,
    RUN_DIR_VARIABLE,
    TRAINING,
    RunLayout,
    param_differences,
    project_root,
)

SESSION_VARIABLE = "JPY_SESSION_NAME"  # set by Jupyter for a kernel: the path of its notebook


class RunNotReady(RuntimeError):
    """The run a notebook was pointed at cannot be used (yet); the message names the file and the fix."""


def _show_short_errors() -> None:
    """In IPython, show RunNotReady and ParamsError as their message only (the traceback adds nothing)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def handler(shell: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> Any:
        shell.showtraceback((etype, value, tb), exception_only=True)

    shell.set_custom_exc((RunNotReady, ParamsError), handler)


# library messages that say nothing about the run: Lightning's hardware lines and advertising tips, and
# deprecation notices inside libraries (they concern the libraries' own code, not the notebook's)
QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
QUIET_WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
    (r".*does not have many workers", UserWarning),
    (r"", DeprecationWarning),
)


def quiet_libraries() -> None:
    """Keep library noise out of a notebook's output; warnings of the workbench itself still show."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def session_notebook() -> Path | None:
    """The notebook file this kernel was started for in JupyterLab (None under papermill or in a console)."""
    name = os.environ.get(SESSION_VARIABLE, "")
    if not name or Path(name).suffix not in (".ipynb", ".py"):
        return None
    path = Path(name)
    return path if path.is_absolute() else project_root() / path


def stage_of(notebook: Path | None) -> str | None:
    """The stage notebook name (e.g. `02_train`) of a notebook file, or None for any other file."""
    if notebook is None:
        return None
    return notebook.stem if notebook.stem in NOTEBOOKS else None


def check_paired_source(notebook: Path) -> list[int]:
    """Code cells (1-based) where an `.ipynb` differs from its paired `.py` script; [] when they agree.

    Batch runs execute the `.py`; an `.ipynb` edited without jupytext, or left over from an older checkout,
    runs other code. Only code cell sources are compared (outputs and metadata are not code).
    """
    import jupytext
    import nbformat

    script = notebook.with_suffix(".py")
    if notebook.suffix != ".ipynb" or not script.is_file() or not notebook.is_file():
        return []
    ours = [cell.source.strip() for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"]
    theirs = [cell.source.strip() for cell in jupytext.read(script).cells if cell.cell_type == "code"]
    differ = [i + 1 for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if len(ours) != len(theirs):
        differ.append(min(len(ours), len(theirs)) + 1)
    return differ


def _warn_stale_notebook() -> None:
    notebook = session_notebook()
    if notebook is None or stage_of(notebook) is None:
        return
    differ = check_paired_source(notebook)
    if differ:
        warnings.warn(
            f"{notebook.name} differs from {notebook.with_suffix('.py').name} in code cell(s) {differ}: batch runs "
            f"execute the .py script. Open {notebook.with_suffix('.py').name} instead (it opens as a notebook), or "
            f"delete the stale {notebook.name} and reopen the script",
            stacklevel=3,
        )


def _check_run_dir(run_dir: str | Path) -> RunLayout:
    """The run at `run_dir`: an existing run directory, or an empty folder to freeze a new run in."""
    layout = RunLayout(Path(run_dir).expanduser())
    if not layout.root.is_dir():
        raise RunNotReady(
            f"run directory {layout.root} does not exist. Set run_dir to a folder reports/<experiment>/<run-id> "
            "written by `workbench run` (or an empty folder for a new run), or to '' to work in "
            "reports/<experiment>/interactive"
        )
    if not layout.params.is_file() and any(layout.root.iterdir()):
        raise RunNotReady(
            f"{layout.root} has no {layout.params.name}: it is not a run directory, or one whose creation was "
            "interrupted. Start a new run with `workbench run PARAMS`, or set run_dir to another run"
        )
    return layout


def _base_dir(layout: RunLayout) -> Path:
    """The folder the run's relative parameter paths (data.store, ...) are taken from.

    `workbench run` records the folder it was started in (run.json `cwd`); otherwise the project root.
    """
    try:
        recorded = json.loads(layout.info.read_text(encoding="utf-8")).get("cwd")
    except (OSError, ValueError):
        recorded = None
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return project_root()


def _check_ready(params: Params, layout: RunLayout, stage: str | None, base: Path) -> None:
    """Refuse a stage whose inputs are not in the run: earlier stages' outputs and the chip store."""
    if stage is None:
        return
    order = NOTEBOOKS.index(stage)
    hint = f"set run_dir to a finished run, or run the notebooks before {stage} in {layout.root} first"
    needs: list[tuple[Path, str]] = []
    if order > NOTEBOOKS.index(DATA_AUDIT.notebook):
        needs += [(layout.catalog, DATA_AUDIT.notebook), (layout.normalization_stats, DATA_AUDIT.notebook)]
    if order > NOTEBOOKS.index(TRAINING.notebook):
        needs.append((layout.weights, TRAINING.notebook))
    for path, producer in needs:
        if not path.is_file():
            raise RunNotReady(f"{stage} needs {path.relative_to(layout.root)}, which {producer} writes; {hint}")
    store = params.data.store if params.data.store.is_absolute() else base / params.data.store
    if store.exists() or (params.data.source == "synthetic" and stage == DATA_AUDIT.notebook):
        return
    if params.data.source == "synthetic":
        fix = f"the synthetic store is generated by {DATA_AUDIT.notebook}: run it in this run first"
    else:
        fix = f"create it with `workbench ingest FORMAT SOURCE_FOLDER {store}` or point data.store at an existing store"
    raise RunNotReady(
        f"chip store {store} (data.store = {str(params.data.store)!r}, relative to {base}) is missing; {fix}"
    )


STAGE_NAMES = {stage.notebook for stage in (DATA_AUDIT, TRAINING, CALIBRATION, REVIEW)}


def open_run(
    params_file: str, overrides: list[str] | None, run_dir: str, stage: str | None = None
) -> tuple[Params, Path]:
    """The parameters and the run directory a notebook works in.

    A run directory that already holds `params.yaml` (the pipeline freezes it before the first
    notebook; the first notebook opened by hand freezes it too) is worked with those frozen
    parameters: `params_file` is not read again, so editing it after the run started changes
    nothing, and `overrides` that would change a frozen value are refused (ParamsError). Relative
    paths of the parameters (data.store) are taken from the folder `workbench run` started in, or the
    project root, whichever notebook folder the kernel started in.

    Under `workbench run` the run directory is injected. Opened by hand in JupyterLab with `run_dir`
    empty, the notebook works in the run `workbench lab RUN` was started on (WORKBENCH_RUN_DIR), else
    in `reports/<experiment>/interactive` from the project root (the experiment named in
    `params_file`), so the four notebooks still hand over through files when run one after another;
    delete that folder to start again with other parameters.

    `stage` (the notebook name, e.g. `02_train`; taken from the notebook JupyterLab opened when not
    given) is checked against the run: its earlier stages' outputs and the chip store must exist.
    """
    _show_short_errors()
    quiet_libraries()
    _warn_stale_notebook()
    stage = stage or stage_of(session_notebook())
    if stage is not None and stage not in STAGE_NAMES:
        raise ValueError(f"stage must be one of {sorted(STAGE_NAMES)}, got {stage!r}")
    overrides = list(overrides or [])
    params_path = Path(params_file)
    run_dir = run_dir or os.environ.get(RUN_DIR_VARIABLE, "")
    if not run_dir:
        root = project_root()
        if not params_path.is_absolute():
            params_path = (Path.cwd() / params_path).resolve()
        os.chdir(root)
        source = load_params(params_path, overrides)
        layout = RunLayout.at(root / "reports", source.experiment, INTERACTIVE_RUN)
        base = root
    else:
        layout = _check_run_dir(run_dir)
        source = None
        base = _base_dir(layout)
        if Path.cwd().resolve() != base.resolve():
            os.chdir(base)
    params = layout.frozen_params(overrides)
    if params is None:
        params = source if source is not None else load_params(params_path, overrides)
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.freeze_params(params)
    elif source is not None and (changed := param_differences(params, source)):
        warnings.warn(
            f"{params_path} now differs from the parameters frozen in {layout.params} in {', '.join(changed)}; "
            f"this notebook uses the frozen ones. Delete {layout.root} to start again with the file's parameters",
            stacklevel=2,
        )
    _check_ready(params, layout, stage, base)
    layout.root.mkdir(parents=True, exist_ok=True)
    return params, layout.root.resolve()


def show_figures(paths: dict[str, Path] | list[Path], width: int | None = None) -> None:
    """Display saved PNG figures inline (they are also files of the run)."""
    from IPython.display import Image, display

    items = paths.values() if isinstance(paths, dict) else paths
    for path in items:
        display(Image(filename=str(path), width=width))


def show_metrics(metrics: dict[str, Any]) -> Any:
    """Metrics as a two-column table for display."""
    import pandas as pd

    return pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())}).set_index("metric")

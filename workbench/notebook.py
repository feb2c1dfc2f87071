"""Small helpers the notebooks share: open a run, show figures and tables."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from workbench.params import Params, load_params
from workbench.run import INTERACTIVE_RUN, RunLayout, param_differences, project_root


def open_run(params_file: str, overrides: list[str] | None, run_dir: str) -> tuple[Params, Path]:
    """The parameters and the run directory a notebook works in.

    A run directory that already holds `params.yaml` (the pipeline freezes it before the first
    notebook; the first notebook opened by hand freezes it too) is worked with those frozen
    parameters: `params_file` is not read again, so editing it after the run started changes
    nothing, and `overrides` that would change a frozen value are refused (ParamsError). Only a
    run directory without `params.yaml` reads `params_file` with `overrides` and freezes them.

    Under `workbench run` the run directory is injected. Opened by hand in JupyterLab, the
    notebook works in `reports/<experiment>/interactive` from the project root (the experiment
    named in `params_file`), so the four notebooks still hand over through files when run one
    after another; delete that folder to start again with other parameters.
    """
    overrides = list(overrides or [])
    params_path = Path(params_file)
    if not run_dir:
        root = project_root()
        if not params_path.is_absolute():
            params_path = (Path.cwd() / params_path).resolve()
        os.chdir(root)
        source = load_params(params_path, overrides)
        layout = RunLayout.at(root / "reports", source.experiment, INTERACTIVE_RUN)
    else:
        layout = RunLayout(Path(run_dir))
        source = None
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
    layout.root.mkdir(parents=True, exist_ok=True)
    return params, layout.root


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

"""Small helpers the notebooks share: open a run, show figures and tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from workbench.params import Params, load_params


def open_run(params_file: str, overrides: list[str] | None, run_dir: str) -> tuple[Params, Path]:
    """Load parameters and the run directory a notebook works in.

    Under `workbench run` the run directory is injected. Opened by hand in JupyterLab, the
    notebook works in `reports/<experiment>/interactive` from the project root, so the four
    notebooks still hand over through files when run one after another.
    """
    if not run_dir:
        from workbench.pipeline import project_root

        root = project_root()
        params_path = Path(params_file)
        if not params_path.is_absolute():
            params_path = (Path.cwd() / params_path).resolve()
        os.chdir(root)
        params = load_params(params_path, overrides)
        path = root / "reports" / params.experiment / "interactive"
    else:
        params = load_params(params_file, overrides)
        path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return params, path


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

"""What every stage shares: its result object and where it writes metrics and figures (see `workbench.run`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.figures import save_figure
from workbench.io import write_json_atomic
from workbench.run import RunLayout, Stage


@dataclass
class StageResult:
    """Metrics, tables and figure paths a stage produced (for the notebook to show)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)


def save_stage_figure(fig: Any, run_dir: Path, name: str, result: StageResult) -> None:
    """Save a figure under `<run_dir>/figures/` and record it in the stage result."""

    path = RunLayout(run_dir).figure(name)
    save_figure(fig, path)
    result.figures[name] = path


def write_stage_metrics(run_dir: Path, stage: Stage, metrics: dict[str, Any]) -> Path:
    """Write one stage's flat metrics; the pipeline merges all of them into metrics.json."""
    return write_json_atomic(RunLayout(run_dir).stage_metrics(stage), metrics)

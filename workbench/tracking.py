"""MLflow tracking of a whole run: every stage's metrics, the parameters, figures, notebooks and the model.

When `train.tracking.uri` is set (an MLflow server URI, or a local folder that becomes a file
store), a run of the pipeline is one MLflow run, named after the run id and tagged with it, the
experiment and the git commit. `track_stage` is called after each stage: the first call opens the
MLflow run (recorded in the run directory's `tracking.json`, so the training stage's Lightning
MLFlowLogger writes its per-step curves into the same MLflow run) and logs the frozen parameters;
each call logs that stage's metrics (`metrics/<stage>.json`), the figures, the executed notebook
and, after training, the model bundle as artefacts. `finish_tracking` logs the merged metrics and
the run records and closes the MLflow run as finished or failed. Without a tracking URI both do
nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from workbench.io import read_json, write_json_atomic
from workbench.params import Params, load_params
from workbench.run import STAGES, TRAINING, RunLayout, Stage, git_commit, mlflow_tracking_uri, project_root

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow accepts at most 100 parameters (1000 metrics) per batch


def _stage(stage: str | Stage) -> Stage:
    if isinstance(stage, Stage):
        return stage
    for known in STAGES:
        if stage in (known.notebook, known.metrics):
            return known
    raise ValueError(f"unknown stage {stage!r}; stages: {[s.notebook for s in STAGES]}")


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of nested dicts; lists stay leaves."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat metrics dict (booleans, text and NaN are not metrics)."""
    values = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            values[key] = float(value)
    return values


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_tracking_uri(uri))


def _chunks(items: list[Any], size: int = BATCH) -> Iterable[list[Any]]:
    return (items[i : i + size] for i in range(0, len(items), size))


class RunTracker:
    """The MLflow run of one run directory (opened on first use, found again through tracking.json)."""

    def __init__(self, run_dir: str | Path, params: Params) -> None:
        self.layout = RunLayout(Path(run_dir))
        self.params = params
        uri = params.train.tracking.uri
        if not uri:
            raise ValueError("tracking needs train.tracking.uri")
        self.uri = mlflow_tracking_uri(uri)
        self.client = _client(uri)
        self.run_id = self._open()

    def _open(self) -> str:
        record = self.layout.tracking
        if record.is_file():
            saved = read_json(record)
            if saved.get("tracking_uri") == self.uri and saved.get("run_id"):
                return str(saved["run_id"])
        name = self.params.train.tracking.experiment or self.params.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run_id = self.layout.root.name
        commit = git_commit(project_root())
        tags = {
            "workbench.run_id": run_id,
            "workbench.experiment": self.params.experiment,
            "workbench.run_dir": str(self.layout.root),
            "mlflow.source.git.commit": commit or "unknown",
            "git_commit": commit or "unknown",
            "seed": str(self.params.seed),
        }
        run = self.client.create_run(experiment_id, run_name=run_id, tags=tags)
        write_json_atomic(
            record,
            {"tracking_uri": self.uri, "experiment": name, "experiment_id": experiment_id, "run_id": run.info.run_id},
        )
        self._log_params(run.info.run_id)
        return str(run.info.run_id)

    def _log_params(self, run_id: str) -> None:
        from mlflow.entities import Param

        pairs = [
            Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in flatten(self.params.model_dump(mode="json"))
        ]
        for chunk in _chunks(pairs):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> dict[str, float]:
        """Log the finite numbers of a flat metrics dict; returns what was logged."""
        import time

        from mlflow.entities import Metric

        values = metric_values(metrics)
        now = int(time.time() * 1000)
        entries = [Metric(key, value, now, step) for key, value in values.items()]
        for chunk in _chunks(entries, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)
        return values

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder (recursively) when it exists."""
        if path.is_dir() and any(path.iterdir()):
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def track_stage(self, stage: Stage, status: str = "ok") -> dict[str, float]:
        """One stage's metrics, figures, executed notebook and (after training) the model bundle."""
        metrics_file = self.layout.stage_metrics(stage)
        logged = self.log_metrics(read_json(metrics_file)) if metrics_file.is_file() else {}
        self.set_tag(f"workbench.stage.{stage.notebook}", status)
        self.log_artifacts(self.layout.figures, "figures")
        self.log_artifacts(self.layout.notebook_html(stage.notebook), "notebooks")
        if stage == TRAINING and self.layout.model.is_dir():
            self.log_artifacts(self.layout.model, "model")
        return logged

    def finish(self, status: str) -> None:
        """Merged metrics, the run records and the final status (FINISHED or FAILED)."""
        if self.layout.metrics.is_file():
            self.log_metrics(read_json(self.layout.metrics))
        for path in (self.layout.params, self.layout.info, self.layout.metrics):
            self.log_artifacts(path, "run")
        self.log_artifacts(self.layout.model, "model")  # calibration.json is written after training
        self.log_artifacts(self.layout.diagnostics, "diagnostics")
        self.set_tag("workbench.status", status)
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "complete" else "FAILED")


def _tracker(run_dir: str | Path, params: Params | None) -> RunTracker | None:
    layout = RunLayout(Path(run_dir))
    if params is None:
        if not layout.params.is_file():
            return None
        params = load_params(layout.params)
    if not params.train.tracking.uri:
        return None
    return RunTracker(run_dir, params)


def _safely(action: str, strict: bool, call: Any) -> RunTracker | None:
    try:
        result: RunTracker | None = call()
        return result
    except Exception as exc:
        if strict:
            raise
        warnings.warn(f"MLflow tracking failed while {action}: {exc}; the run goes on", RuntimeWarning, stacklevel=3)
        return None


def track_stage(
    run_dir: str | Path, stage: str | Stage, status: str = "ok", params: Params | None = None, strict: bool = False
) -> RunTracker | None:
    """Report a finished (or failed) stage of a run to MLflow; a no-op without `train.tracking.uri`.

    A tracking failure (server down, disk full) warns and the run goes on, unless `strict`.
    """

    def call() -> RunTracker | None:
        tracker = _tracker(run_dir, params)
        if tracker is not None:
            tracker.track_stage(_stage(stage), status)
        return tracker

    return _safely(f"reporting stage {stage}", strict, call)


def finish_tracking(
    run_dir: str | Path, status: str, params: Params | None = None, strict: bool = False
) -> RunTracker | None:
    """Close a run's MLflow run with its merged metrics and records; a no-op without `train.tracking.uri`."""

    def call() -> RunTracker | None:
        tracker = _tracker(run_dir, params)
        if tracker is not None:
            tracker.finish(status)
        return tracker

    return _safely("closing the run", strict, call)

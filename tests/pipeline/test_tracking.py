"""MLflow tracking of a run: every stage's metrics, parameters, figures, notebooks, model bundle, tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.io import read_json, write_json_atomic
from workbench.params import load_params
from workbench.run import STAGES, RunLayout, git_commit, project_root
from workbench.tracking import finish_tracking, track_stage

STAGE_METRICS = {
    "audit_data": {"audit.check_ok": True, "audit.n_chips": 320, "audit.positive_fraction": 0.12},
    "train": {"train.last_val_iou": 0.81, "train.epochs": 2, "train.note": "text is not a metric"},
    "calibration": {"calibration.temperature": 1.3, "calibration.ece_after": float("nan")},
    "review": {"review.top_k_recall": 0.9},
}


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunLayout:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after the test
    params = load_params(
        None,
        [
            "experiment=unit_exp",
            f"train.tracking.uri={tmp_path / 'mlruns'}",
            "train.tracking.experiment=unit",
            "seed=7",
        ],
    )
    layout = RunLayout.at(tmp_path / "reports", params.experiment, "20260101-000000-abcd")
    layout.root.mkdir(parents=True)
    layout.freeze_params(params)
    return layout


def write_stage(layout: RunLayout, index: int) -> None:
    stage = STAGES[index]
    write_json_atomic(layout.stage_metrics(stage), STAGE_METRICS[stage.metrics])
    layout.figures.mkdir(parents=True, exist_ok=True)
    (layout.figures / f"figure_{index}.png").write_bytes(b"\x89PNG fake " + bytes([index]))
    layout.notebook_html(stage.notebook).write_text(f"<html>{stage.notebook}</html>")
    if stage.metrics == "train":
        layout.model.mkdir()
        layout.weights.write_bytes(b"weights")
    if stage.metrics == "calibration":
        write_json_atomic(layout.calibration, {"temperature": 1.3, "threshold": 0.4})


def test_every_stage_reaches_one_mlflow_run(run: RunLayout, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    for index, stage in enumerate(STAGES):
        write_stage(run, index)
        track_stage(run.root, stage.notebook, "ok", strict=True)
    write_json_atomic(run.metrics, {"test.iou": 0.77, "wall_seconds": 12.5})
    write_json_atomic(run.info, {"status": "complete"})
    finish_tracking(run.root, "complete", strict=True)

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("unit")
    assert experiment is not None
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert read_json(run.tracking)["run_id"] == mlflow_run.info.run_id
    data = mlflow_run.data
    expected = {
        "audit.n_chips": 320.0,
        "audit.positive_fraction": 0.12,
        "train.last_val_iou": 0.81,
        "train.epochs": 2.0,
        "calibration.temperature": 1.3,
        "review.top_k_recall": 0.9,
        "test.iou": 0.77,
        "wall_seconds": 12.5,
    }
    assert data.metrics == expected  # booleans, text and NaN are left out
    assert data.params["seed"] == "7" and data.params["train.tracking.experiment"] == "unit"
    assert data.params["model.architecture"] == str(load_params(run.params).model.architecture)
    assert data.tags["workbench.run_id"] == run.root.name and mlflow_run.info.run_name == run.root.name
    assert data.tags["mlflow.source.git.commit"] == (git_commit(project_root()) or "unknown")
    assert data.tags["workbench.status"] == "complete" and mlflow_run.info.status == "FINISHED"
    assert all(data.tags[f"workbench.stage.{stage.notebook}"] == "ok" for stage in STAGES)

    def listing(path: str) -> set[str]:
        return {item.path for item in client.list_artifacts(mlflow_run.info.run_id, path)}

    assert listing("figures") == {f"figures/figure_{i}.png" for i in range(4)}
    assert listing("notebooks") == {f"notebooks/{stage.notebook}.html" for stage in STAGES}
    assert listing("model") == {"model/model.pt", "model/calibration.json"}
    assert listing("run") == {"run/params.yaml", "run/run.json", "run/metrics.json"}
    local = Path(client.download_artifacts(mlflow_run.info.run_id, "model/model.pt", str(tmp_path / "dl")))
    assert local.read_bytes() == b"weights"


def test_training_logger_writes_into_the_same_mlflow_run(run: RunLayout) -> None:
    from workbench.train.fit import build_loggers

    write_stage(run, 0)
    tracker = track_stage(run.root, STAGES[0], strict=True)
    assert tracker is not None
    mlflow_logger = build_loggers(load_params(run.params), run.root)[1]
    assert mlflow_logger.run_id == tracker.run_id


def test_failed_run_is_marked_failed_and_no_uri_means_no_tracking(run: RunLayout, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    write_stage(run, 0)
    track_stage(run.root, STAGES[0], "failed", strict=True)
    finish_tracking(run.root, "failed", strict=True)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags["workbench.stage.01_data_audit"] == "failed"

    plain = RunLayout.at(tmp_path / "other", "x", "r")
    plain.root.mkdir(parents=True)
    plain.freeze_params(load_params(None, ["experiment=x"]))
    assert track_stage(plain.root, STAGES[0], strict=True) is None and not plain.tracking.exists()


def test_tracking_failure_warns_and_the_run_goes_on(run: RunLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    import workbench.tracking as tracking

    def broken(uri: str) -> None:
        raise ConnectionError("server at http://mlflow:5000 unreachable")

    monkeypatch.setattr(tracking, "_client", broken)
    with pytest.warns(RuntimeWarning, match="unreachable; the run goes on"):
        assert track_stage(run.root, STAGES[0]) is None

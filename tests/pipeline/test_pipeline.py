"""The whole demo pipeline with tiny parameters: report files, metrics keys, four-panel figures."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from workbench.pipeline import PipelineError, run_pipeline
from workbench.run import NOTEBOOKS, file_sha256, notebooks_dir

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "params" / "demo.yaml"


def tiny(tmp_path: Path) -> list[str]:
    """Seconds of training on a small synthetic store."""
    return [
        f"data.store={tmp_path / 'store'}",
        "data.synthetic.n_chips=96",
        "data.synthetic.chip_size=32",
        "data.batch_size=16",
        "train.max_epochs=2",
        "train.progress_bar=false",
        "model.decoder_channels=[32, 16, 16, 8, 8]",
        "review.n_figures=3",
        "review.out_of_fold=false",  # the fold models are covered by tests/test_crossfit.py
    ]


@pytest.mark.slow
def test_demo_pipeline_writes_complete_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after the test
    overrides = [*tiny(tmp_path), "train.tracking.uri=mlruns"]
    result = run_pipeline(DEMO, overrides, reports=tmp_path / "reports", progress=False)
    run_dir = result.run_dir
    assert result.status == "complete"
    assert run_dir.parent == tmp_path / "reports" / "demo"
    for name in NOTEBOOKS:
        notebook = nbformat.read(run_dir / f"{name}.ipynb", as_version=4)
        injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and str(run_dir) in injected[0].source
        assert (run_dir / f"{name}.html").stat().st_size > 10_000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test.iou", "val.iou", "calibration.temperature", "review.top_k_precision", "review.top_k_recall"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test.iou"] <= 1.0
    assert metrics["calibration.temperature"] > 0
    assert metrics["wall_seconds"] > 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and set(run["notebooks"]) == set(NOTEBOOKS)
    assert isinstance(run["git_dirty"], bool) and run["cwd"] == str(tmp_path)
    for name in NOTEBOOKS:  # provenance: the exact script each notebook ran
        assert run["notebooks"][name]["source_sha256"] == file_sha256(notebooks_dir() / f"{name}.py")
    stderr = [
        "".join(output.get("text", ""))
        for name in NOTEBOOKS
        for cell in nbformat.read(run_dir / f"{name}.ipynb", as_version=4).cells
        for output in cell.get("outputs", [])
        if output.get("name") == "stderr"
    ]
    assert not [text for text in stderr if "Tip:" in text or "GPU available" in text or "deprecated" in text]
    calibration_images = [
        output["data"]["image/png"]
        for cell in nbformat.read(run_dir / "03_calibrate.ipynb", as_version=4).cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert calibration_images and len(set(calibration_images)) == len(calibration_images)  # each figure once
    for name in ("model.pt", "normalization_stats.json", "calibration.json"):
        assert (run_dir / "model" / name).is_file()
    assert (run_dir / "diagnostics" / "per_chip_test.parquet").is_file()
    panels = sorted((run_dir / "figures" / "review").glob("*.png"))
    assert len(panels) == 3
    with Image.open(panels[0]) as image:
        width, height = image.size
    assert width > 2.5 * height  # four panels side by side
    index = (tmp_path / "reports" / "index.html").read_text()
    assert run_dir.name in index and "complete" in index
    profile = json.loads((run_dir / "model" / "input_profile.json").read_text())
    assert profile["chip_size"] == 32 and profile["pixel_size_m"] == 10.0  # the synthetic chips' 10 m pixels

    # one MLflow run holds every stage's metrics, the training curves and the artefacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (tracked,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert tracked.info.run_name == run_dir.name and tracked.info.status == "FINISHED"
    for key in ("test.iou", "calibration.temperature", "review.top_k_recall", "train.last_val_iou"):
        assert tracked.data.metrics[key] == pytest.approx(metrics[key]), key
    assert tracked.data.metrics["data.n_chips"] == metrics["data.n_chips"] == 96  # the data stage
    assert len(client.get_metric_history(tracked.info.run_id, "val/iou")) == 2  # the training logger's curve
    artefacts = {item.path for item in client.list_artifacts(tracked.info.run_id, "model")}
    assert {"model/model.pt", "model/calibration.json", "model/input_profile.json"} <= artefacts
    assert client.list_artifacts(tracked.info.run_id, "figures")


@pytest.mark.slow
def test_failing_cell_fails_run_and_keeps_partial_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [*tiny(tmp_path), "model.architecture=NoSuchNet"]
    with pytest.raises(PipelineError, match=r"02_train failed in cell") as info:
        run_pipeline(DEMO, overrides, reports=tmp_path / "reports", progress=False)
    assert "NoSuchNet" in str(info.value)
    run_dir = next((tmp_path / "reports" / "demo").iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed"
    assert run["notebooks"]["01_data_audit"]["status"] == "ok"
    assert run["notebooks"]["02_train"]["status"] == "failed"
    assert (run_dir / "02_train.ipynb").is_file() and (run_dir / "02_train.html").is_file()
    assert not (run_dir / "03_calibrate.ipynb").exists()
    assert "failed" in (tmp_path / "reports" / "index.html").read_text()

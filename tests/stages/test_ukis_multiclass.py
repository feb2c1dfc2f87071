"""The ukis-csmask three-class parameter file (clear / cloud / shadow) on the real samples in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench.cli import main
from workbench.data.ingest import ingest
from workbench.data.store import open_store, read_catalog
from workbench.params import load_params, resolve_classes
from workbench.run import NOTEBOOKS

PARAMS = Path(__file__).resolve().parents[2] / "params" / "ukis_csmask_multiclass.yaml"
CLASS_MAP = {1: 0, 2: 0, 3: 0, 4: 1, 0: 2}  # the map of the parameter file's ingest command
NAMES = ["clear", "cloud", "shadow"]


def _ingest(shared_data: Path, store: Path) -> None:
    ingest(
        "ukis-csmask",
        shared_data / "ukis-csmask",
        store,
        chip_size=64,
        class_map=CLASS_MAP,
        progress=False,
        split="rows",
        split_options={"buffer_px": 0, "train_percent": 60, "val_percent": 20},
    )


def test_parameter_file_and_class_map_give_the_three_ukis_classes(shared_data: Path, tmp_path: Path) -> None:
    params = load_params(PARAMS)
    assert [spec.name for spec in resolve_classes(params.model)] == NAMES and params.model.num_classes == 3
    assert "class_map={1: 0, 2: 0, 3: 0, 4: 1, 0: 2}" in PARAMS.read_text()
    _ingest(shared_data, tmp_path / "store")
    label = open_store(tmp_path / "store")["label"].values
    # independent count from the raw masks: 0 = shadow, 1/2/3 = clear, 4 = cloud (whole 512 px scenes, 64 px chips)
    raw = np.concatenate(
        [np.load(f)["msk"][..., 0].reshape(-1) for f in sorted((shared_data / "ukis-csmask").glob("*.npz"))]
    )
    assert np.bincount(label.reshape(-1), minlength=3)[:3].tolist() == [
        int(np.isin(raw, [1, 2, 3]).sum()),
        int((raw == 4).sum()),
        int((raw == 0).sum()),
    ]
    split = read_catalog(tmp_path / "store")["split"].value_counts()
    assert split["train"] > 0 and split["val"] > 0 and split["test"] > 0


@pytest.mark.slow
def test_ukis_multiclass_smoke_run(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _ingest(shared_data, tmp_path / "store")
    reports = tmp_path / "reports"
    code = main(["run", str(PARAMS), "--smoke", "--quiet", "--reports", str(reports),
                 "--set", f"data.store={tmp_path / 'store'}"])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-3000:]
    run_dir = next((reports / "ukis_csmask_multiclass").iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and list(run["notebooks"]) == NOTEBOOKS
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in NAMES:
        assert f"test.iou.{name}" in metrics
    assert 0 <= metrics["test.overall_accuracy"] <= 1
    ranking = pd.read_parquet(run_dir / "diagnostics" / "review.parquet")
    assert {f"disagree.{name}" for name in NAMES} <= set(ranking.columns)

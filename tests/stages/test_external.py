"""`workbench evaluate`: a model scored on another store, bands matched by name and alias."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_fakes

from workbench.cli import main
from workbench.data.bands import BandMatchError, match_bands, parse_band_map
from workbench.data.dataset import ChipDataset
from workbench.data.ingest import ingest
from workbench.data.normalize import NormalizationStats
from workbench.evaluate.chips import per_chip_table, pooled_metrics
from workbench.infer.chips import load_predictions, write_predictions
from workbench.models.bundle import save_bundle, write_calibration
from workbench.models.factory import build_model
from workbench.params import ModelParams, load_params
from workbench.run import RunLayout
from workbench.stages.external import ExternalStoreError, evaluate_external

fakes = load_fakes()
S2 = ["B02", "B03", "B04", "B08", "B11", "B12"]
LANDSAT = ["Blue", "Green", "Red", "NIR", "SWIR16", "SWIR22"]


def test_alias_table_maps_landsat_and_sentinel2_and_refuses_a_missing_band():
    assert match_bands(S2, LANDSAT) == LANDSAT
    assert match_bands(["Blue", "Green", "Red", "NIR", "SWIR1", "SWIR2"], S2) == S2
    assert match_bands(["red", "nir"], ["B04", "B08", "B03"]) == ["B04", "B08"]
    with pytest.raises(BandMatchError, match=r"\['B11', 'B12'\]"):
        match_bands(S2, ["Blue", "Green", "Red", "NIR"])
    assert match_bands(["B11"], ["x", "y"], parse_band_map("B11=y")) == ["y"]
    with pytest.raises(BandMatchError, match="MODEL=STORE"):
        parse_band_map("B11")


@pytest.fixture
def source_run(tmp_path: Path) -> Path:
    """A run whose model (random weights, S2 names) was trained on 32 px chips of an S2-named store."""
    fakes.make_npz(tmp_path / "raw", size=64)
    ingest("npz", tmp_path / "raw", tmp_path / "s2", chip_size=32, band_names=S2, progress=False,
           class_map={4: 1})  # fmt: skip
    params = load_params(None, ["experiment=clouds", f"data.store={tmp_path / 's2'}", "data.source=store"])
    run = RunLayout(tmp_path / "reports" / "clouds" / "src")
    run.data.mkdir(parents=True)
    run.freeze_params(params)
    pd.read_parquet(tmp_path / "s2" / "catalog.parquet").to_parquet(run.catalog)
    (run.root / "run.json").write_text(json.dumps({"experiment": "clouds", "status": "complete"}))
    torch.manual_seed(0)
    model_params = ModelParams(architecture="satunet", base_channels=8)
    model = build_model(model_params, len(S2), S2, ["L"] * 6).eval()
    stats = NormalizationStats(S2, "zscore", mean=[0.3] * 6, std=[0.2] * 6)
    save_bundle(run.model, model, model_params, S2, ["L"] * 6, stats)
    write_calibration(run.model, {"temperature": 1.5, "threshold": 0.4})
    return run.root


def test_scores_on_a_second_store_equal_scoring_the_same_chips_in_the_source_run(source_run: Path, tmp_path: Path):
    from workbench.models.bundle import load_bundle

    ingest("ukis-csmask", tmp_path / "raw", tmp_path / "landsat", chip_size=32, progress=False, class_map={4: 1})
    run_dir, metrics = evaluate_external(source_run, tmp_path / "landsat", reports=tmp_path / "reports")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["source_run"] == str(source_run.resolve()) and info["bands"]["B11"] == "SWIR16"
    # the same chips scored in the source run's own store with its own bands
    bundle = load_bundle(source_run / "model")
    catalog = pd.read_parquet(RunLayout(source_run).catalog)
    dataset = ChipDataset(tmp_path / "s2", np.arange(len(catalog)), bands=S2, normalizer=bundle.normalization)
    write_predictions(tmp_path / "ref", "test", bundle.model, dataset, 16)
    table = per_chip_table(tmp_path / "s2", catalog, load_predictions(tmp_path / "ref", "test"), 0.4, 1.5, S2)
    expected = pooled_metrics(table)
    assert metrics["test.calibrated.iou"] == pytest.approx(expected["iou"], abs=1e-9)
    assert metrics["test.calibrated.n_chips"] == 4
    saved = pd.read_parquet(RunLayout(run_dir).per_chip("test"))
    np.testing.assert_array_equal(saved["tp"].to_numpy(), table["tp"].to_numpy())
    assert metrics["calibration.temperature"] == 1.5 and "calibration.ece_after" in metrics


def test_bad_external_stores_are_refused_by_name(source_run: Path, tmp_path: Path, capsys):
    ingest("ukis-csmask", tmp_path / "raw", tmp_path / "big", chip_size=64, progress=False)
    with pytest.raises(ExternalStoreError, match="--chip-size 32"):
        evaluate_external(source_run, tmp_path / "big", reports=tmp_path / "reports")
    ingest("npz", tmp_path / "raw", tmp_path / "odd", chip_size=32, band_names=list("abcdef"), progress=False)
    code = main(["evaluate", str(source_run), str(tmp_path / "odd"), "--reports", str(tmp_path / "reports")])
    assert code == 2 and "B02" in capsys.readouterr().err

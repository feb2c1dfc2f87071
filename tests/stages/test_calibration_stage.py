"""The calibration stage on tiny run directories: files, metrics and values recomputed independently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from sklearn.metrics import jaccard_score

from workbench.evaluate.calibration import ece, fit_temperature
from workbench.params import Params, load_params

REPO = Path(__file__).resolve().parents[2]
GRID = [round(0.1 + 0.05 * i, 2) for i in range(17)]


def tiny_params(tmp: Path, *extra: str) -> Params:
    overrides = [
        "data.synthetic.n_chips=64",
        "data.synthetic.chip_size=32",
        f"data.store={tmp / 'store'}",
        "data.batch_size=8",
        "model.decoder_channels=[16,16,16,16,16]",
        "train.max_epochs=1",
        "train.progress_bar=false",
        *extra,
    ]
    return load_params(REPO / "params" / "demo.yaml", overrides)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def split_pixels(run: Path, params: Params, split: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Stored logits and labels of the usable pixels of a split, read straight from the files."""
    from workbench.data.dataset import ChipDataset

    catalog = pd.read_parquet(run / "data" / "catalog.parquet")
    predictions = xr.open_zarr(run / "predictions" / f"{split}.zarr", consolidated=False)
    indices = predictions["chip_index"].values
    dataset = ChipDataset(Path(params.data.store), indices)
    logits, labels = [], []
    for position in range(len(indices)):
        _, label, valid = dataset.read_raw(position)
        keep = valid & (label != 255)
        logits.append(predictions["logit"].values[position][keep].astype(np.float32))
        labels.append((label[keep] > 0).astype(np.uint8))
    return np.concatenate(logits), np.concatenate(labels), catalog.iloc[indices]


def write_noisy_predictions(run: Path, params: Params, split: str, seed: int) -> None:
    """Logits that separate lake from background imperfectly and are four times too confident."""
    from workbench.data.dataset import ChipDataset

    catalog = pd.read_parquet(run / "data" / "catalog.parquet")
    indices = np.flatnonzero(catalog["split"].to_numpy() == split)
    dataset = ChipDataset(Path(params.data.store), indices)
    rng = np.random.default_rng(seed)
    logits = []
    for position in range(len(indices)):
        _, label, _ = dataset.read_raw(position)
        signal = np.where((label > 0) & (label != 255), 2.0, -2.0)
        logits.append((4.0 * (signal + rng.normal(0, 1.5, label.shape))).astype(np.float16))  # overconfident
    ds = xr.Dataset({"logit": (("chip", "y", "x"), np.stack(logits))}, coords={"chip_index": ("chip", indices)})
    ds.to_zarr(run / "predictions" / f"{split}.zarr", mode="w", consolidated=False)


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Prepare a tiny synthetic store, store hand-made logits, save an untrained small bundle, run calibration."""
    from workbench.data.prepare import prepare_data
    from workbench.data.store import read_store_meta
    from workbench.models.bundle import save_bundle
    from workbench.models.factory import build_model
    from workbench.stages import run_calibration

    tmp = tmp_path_factory.mktemp("calibration")
    small_model = ["model.architecture=satunet", "model.base_channels=4"]
    params = tiny_params(tmp, "calibrate.per_region=true", *small_model)
    run = tmp / "run"
    prepare_data(params.data, run, seed=params.seed)
    for seed, split in enumerate(("val", "test")):
        write_noisy_predictions(run, params, split, seed)
    bands = read_store_meta(Path(params.data.store))["bands"]
    names = [band["name"] for band in bands]
    model = build_model(params.model, len(names), band_names=names, modalities=[b["modality"] for b in bands])
    modalities = [band["modality"] for band in bands]
    save_bundle(run / "model", model, params.model, names, modalities, run / "data" / "normalization_stats.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: thread start-up would cost more than the work
    try:
        result = run_calibration(params, run, tta_chips=2)
    finally:
        torch.set_num_threads(threads)
    return {"params": params, "run": run, "result": result}


def test_temperature_and_threshold_match_an_independent_fit(calibrated_run: dict[str, Any]) -> None:
    run, params = calibrated_run["run"], calibrated_run["params"]
    saved = json.loads((run / "model" / "calibration.json").read_text())
    logits, labels, catalog = split_pixels(run, params, "val")
    assert saved["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-5)
    prob = sigmoid(logits / saved["temperature"])
    ious = [jaccard_score(labels, prob >= t, zero_division=0.0) for t in GRID]
    assert saved["threshold"] == pytest.approx(GRID[int(np.argmax(ious))])
    assert set(saved["per_region"]) == set(catalog["region"])
    metrics = calibrated_run["result"].metrics
    assert metrics["calibration.temperature"] == saved["temperature"]
    assert metrics["calibration.threshold"] == saved["threshold"]
    # the pixel sample holds every val pixel here, so the scores are those of all pixels
    assert metrics["calibration.ece_before"] == pytest.approx(ece(sigmoid(logits), labels, bins=15), rel=1e-6)
    after = sigmoid(logits / saved["temperature"])
    assert metrics["calibration.ece_mass_after"] == pytest.approx(ece(after, labels, 15, "quantile"), rel=1e-6)
    assert metrics["calibration.brier_after"] == pytest.approx(np.mean((after - labels) ** 2), rel=1e-6)


def test_test_scores_use_each_regions_threshold(calibrated_run: dict[str, Any]) -> None:
    run, params = calibrated_run["run"], calibrated_run["params"]
    saved = json.loads((run / "model" / "calibration.json").read_text())
    from workbench.data.dataset import ChipDataset

    predictions = xr.open_zarr(run / "predictions" / "test.zarr", consolidated=False)
    catalog = pd.read_parquet(run / "data" / "catalog.parquet")
    dataset = ChipDataset(Path(params.data.store), predictions["chip_index"].values)
    truth, pred = [], []
    for position, index in enumerate(predictions["chip_index"].values):
        _, label, valid = dataset.read_raw(position)
        keep = valid & (label != 255)
        threshold = saved["per_region"].get(catalog.iloc[index]["region"], saved["threshold"])
        prob = sigmoid(predictions["logit"].values[position].astype(np.float32) / saved["temperature"])
        truth.append(label[keep] > 0)
        pred.append(prob[keep] >= threshold)
    expected = jaccard_score(np.concatenate(truth), np.concatenate(pred))
    metrics = calibrated_run["result"].metrics
    assert metrics["test.calibrated_iou"] == pytest.approx(expected)
    per_region = json.loads((run / "diagnostics" / "per_region.json").read_text())
    assert per_region["all"]["iou"] == pytest.approx(expected)
    per_year = json.loads((run / "diagnostics" / "per_year.json").read_text())
    test_years = catalog.iloc[predictions["chip_index"].values]["year"].astype(str)
    assert set(per_year) == {*test_years, "all"}
    assert sum(per_year[y]["n_chips"] for y in set(test_years)) == len(test_years)


def test_stage_writes_every_diagnostic(calibrated_run: dict[str, Any]) -> None:
    run, result = calibrated_run["run"], calibrated_run["result"]
    diagnostics = run / "diagnostics"
    prevalence = json.loads((diagnostics / "prevalence.json").read_text())
    assert [row["ratio"] for row in prevalence["table"]] == [200, 500, 1000]
    assert set(prevalence["curves"]) == {"1:200", "1:500", "1:1000"}
    objects = pd.DataFrame(json.loads((diagnostics / "objects.json").read_text()))
    assert sorted(objects["iou_threshold"].unique()) == [0.1, 0.3, 0.5]
    tta = json.loads((diagnostics / "tta.json").read_text())
    assert [row["mode"] for row in tta] == ["none", "minimal", "standard", "full"]
    assert all(row["n_chips"] == 2 for row in tta)
    sweep = pd.DataFrame(json.loads((diagnostics / "threshold_sweep.json").read_text()))
    assert set(sweep["split"]) == {"val", "test"} and len(sweep) == 2 * len(GRID)
    per_chip = pd.read_parquet(diagnostics / "per_chip_test_calibrated.parquet")
    assert (per_chip["split"] == "test").all()
    for name in ("reliability", "pr_curves", "prevalence_pr"):
        assert result.figures[name].is_file()
    stored = json.loads((run / "metrics" / "calibration.json").read_text())
    for key in (
        "calibration.ece_mass_after",
        "calibration.mce_before",
        "calibration.brier_after",
        "test.calibrated_miou",
        "test.calibrated_pixel_accuracy",
        "test.pr_auc",
        "test.pr_auc_1000",
        "test.recall_500",
        "test.object_f1_0.5",
        "val.tta_iou_full",
    ):
        assert key in stored and key in result.metrics
    assert len(result.tables["worst_chips"]) <= 10


def test_missing_predictions_are_reported(tmp_path: Path) -> None:
    from workbench.stages import run_calibration

    params = tiny_params(tmp_path)
    (tmp_path / "run" / "data").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        run_calibration(params, tmp_path / "run")


@pytest.mark.slow
def test_audit_train_calibrate_end_to_end(tmp_path: Path) -> None:
    """The stages on a 1-epoch model: the TTA 'none' row reproduces the stored val predictions."""
    from workbench.stages import run_calibration, run_data_audit, run_training

    params = tiny_params(tmp_path)
    run = tmp_path / "run"
    run_data_audit(params, run)
    run_training(params, run)
    result = run_calibration(params, run, tta_chips=64)
    saved = json.loads((run / "model" / "calibration.json").read_text())
    logits, labels, _ = split_pixels(run, params, "val")
    stored_iou = jaccard_score(labels, sigmoid(logits / saved["temperature"]) >= saved["threshold"], zero_division=0)
    tta = result.tables["tta"].set_index("mode")
    # the model re-run on all val chips without TTA gives the stored logits up to float16 rounding
    assert tta.loc["none", "iou"] == pytest.approx(stored_iou, abs=0.01)
    assert json.loads((run / "metrics" / "calibration.json").read_text())["calibration.temperature"] > 0

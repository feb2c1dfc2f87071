"""Calibration with a review ledger: fitted and scored on label-corrected data, raw metrics beside them."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn.metrics import f1_score, jaccard_score
from test_calibration_stage import sigmoid, tiny_params, write_noisy_predictions


def pooled_pixels(run: Path, store: Path, split: str, drop: set[int], fixes: dict[int, np.ndarray]) -> tuple:
    """Logits and 0/1 labels of a split's usable pixels, read from the files, with the decisions applied by hand."""
    from workbench.data.dataset import ChipDataset

    predictions = xr.open_zarr(run / "predictions" / f"{split}.zarr", consolidated=False)
    indices = predictions["chip_index"].values
    dataset = ChipDataset(store, indices)
    logits, labels = [], []
    for position, index in enumerate(indices):
        if int(index) in drop:
            continue
        _, label, valid = dataset.read_raw(position)
        label = fixes.get(int(index), label)
        keep = valid & (label != 255)
        logits.append(predictions["logit"].values[position][keep].astype(np.float32))
        labels.append((label[keep] > 0).astype(np.uint8))
    return np.concatenate(logits), np.concatenate(labels)


@pytest.mark.slow
def test_calibration_reports_raw_and_label_corrected_metrics(tmp_path: Path) -> None:
    from workbench.data.ledger import Ledger
    from workbench.data.prepare import prepare_data
    from workbench.data.store import read_store_meta
    from workbench.models.bundle import save_bundle
    from workbench.models.factory import build_model
    from workbench.stages import run_calibration

    params = tiny_params(tmp_path, "model.architecture=satunet", "model.base_channels=4")
    run, store = tmp_path / "run", Path(params.data.store)
    prepare_data(params.data, run, seed=params.seed)
    for seed, split in enumerate(("val", "test")):
        write_noisy_predictions(run, params, split, seed)
    bands = read_store_meta(store)["bands"]
    names = [band["name"] for band in bands]
    model = build_model(params.model, len(names), band_names=names, modalities=[b["modality"] for b in bands])
    modalities = [b["modality"] for b in bands]
    save_bundle(run / "model", model, params.model, names, modalities, run / "data" / "normalization_stats.json")

    catalog = pd.read_parquet(run / "data" / "catalog.parquet")
    test_ids = np.flatnonzero(catalog["split"].to_numpy() == "test")
    val_ids = np.flatnonzero(catalog["split"].to_numpy() == "val")
    lakes = [int(i) for i in test_ids if catalog["positive_fraction"].iloc[i] > 0]
    dropped_test, fixed_test, dropped_val = lakes[0], lakes[1], int(val_ids[0])
    size = params.data.synthetic.chip_size
    corrected = np.zeros((size, size), np.uint8)
    corrected[: size // 2] = 1  # a deliberately different label: half the chip is lake
    ledger = Ledger.for_store(store)
    ledger.record(str(catalog["chip_id"].iloc[dropped_test]), "drop", reviewer="ana")
    ledger.record(str(catalog["chip_id"].iloc[fixed_test]), "fix", reviewer="ana", corrected=corrected)
    ledger.record(str(catalog["chip_id"].iloc[dropped_val]), "drop", reviewer="ana")

    result = run_calibration(params, run, tta_chips=0)
    saved = json.loads((run / "model" / "calibration.json").read_text())
    t, cut = saved["temperature"], saved["threshold"]
    raw_logits, raw_labels = pooled_pixels(run, store, "test", set(), {})
    cor_logits, cor_labels = pooled_pixels(run, store, "test", {dropped_test}, {fixed_test: corrected})
    raw_pred = sigmoid(raw_logits / t) >= cut
    cor_pred = sigmoid(cor_logits / t) >= cut
    metrics = result.metrics
    assert metrics["test.calibrated_iou_raw"] == pytest.approx(jaccard_score(raw_labels, raw_pred), abs=1e-9)
    assert metrics["test.calibrated_iou_corrected"] == pytest.approx(jaccard_score(cor_labels, cor_pred), abs=1e-9)
    assert metrics["test.calibrated_f1_corrected"] == pytest.approx(f1_score(cor_labels, cor_pred), abs=1e-9)
    assert metrics["test.calibrated_iou"] == pytest.approx(metrics["test.calibrated_iou_corrected"], abs=1e-9)
    assert metrics["test.calibrated_iou_raw"] != pytest.approx(metrics["test.calibrated_iou_corrected"], abs=1e-4)
    assert (metrics["test.n_dropped"], metrics["test.n_fixed"], metrics["val.n_dropped"]) == (1, 1, 1)

    table = pd.read_csv(run / "diagnostics" / "label_corrected_calibrated.csv")
    assert list(table.columns[:4]) == ["split", "region", "iou_raw", "iou_corrected"]
    assert set(table["split"]) == {"val", "test"}
    region = str(catalog["region"].iloc[dropped_test])
    row = table[(table["split"] == "test") & (table["region"] == region)].iloc[0]
    in_region = [int(i) for i in test_ids if catalog["region"].iloc[i] == region]
    assert row["n_chips"] == len(in_region) and row["n_dropped"] == 1
    assert "label_corrected" in result.tables
    record = json.loads((run / "data" / "ledger.json").read_text())
    assert record["lines"] == 4 and record["dropped"] == 2 and record["fixed"] == 1

    # the ledger switched off: no corrected keys, the test split scored on every chip's raw label
    without = params.model_copy(update={"review": params.review.model_copy(update={"decisions": False})})
    off = run_calibration(without, run, tta_chips=0)
    assert "test.calibrated_iou_raw" not in off.metrics and "label_corrected" not in off.tables
    saved = json.loads((run / "model" / "calibration.json").read_text())
    raw_pred = sigmoid(raw_logits / saved["temperature"]) >= saved["threshold"]
    assert off.metrics["test.calibrated_iou"] == pytest.approx(jaccard_score(raw_labels, raw_pred), abs=1e-9)

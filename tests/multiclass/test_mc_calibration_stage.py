"""The calibration stage of a softmax model on a tiny three-class run: known temperature, class-of-interest
threshold, reliability tables, calibrated test metrics against scikit-learn, and the bundle's checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score
from test_mc_train import mc_params

from workbench.data.ingest import ingest
from workbench.data.sources.npz import UKIS_MULTICLASS_MAP, UKIS_MULTICLASS_NAMES
from workbench.params import Params

T_KNOWN = 2.5
NAMES = UKIS_MULTICLASS_NAMES  # clear, cloud, shadow
GRID = [round(0.1 + 0.05 * i, 2) for i in range(17)]


def split_pixels(run: Path, params: Params, split: str) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per chip: labels and valid masks read straight from the store, and the split's store indices."""
    from workbench.data.dataset import ChipDataset

    catalog = pd.read_parquet(run / "data" / "catalog.parquet")
    indices = np.flatnonzero(catalog["split"].to_numpy() == split)
    dataset = ChipDataset(Path(params.data.store), indices)
    labels, valids = [], []
    for position in range(len(indices)):
        _, label, valid = dataset.read_raw(position)
        labels.append(label)
        valids.append(valid & (label != 255))
    return labels, valids, indices


def store_logits(run: Path, split: str, indices: np.ndarray, logits: list[np.ndarray]) -> None:
    ds = xr.Dataset(
        {"logit": (("chip", "class", "y", "x"), np.stack(logits).astype(np.float16))},
        coords={"chip_index": ("chip", indices)},
        attrs={"num_classes": 3},
    )
    ds.to_zarr(run / "predictions" / f"{split}.zarr", mode="w", consolidated=False)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train a 3-class model for one epoch (training stage), then replace the stored val / test logits by
    known ones: val = T_KNOWN x log(class frequencies of val) at every pixel (so softmax(logit / T_KNOWN)
    equals the observed frequencies: the NLL is minimal exactly at T_KNOWN); test = noisy, informative."""
    import torch

    from workbench.stages import run_training

    fakes_dir = tmp_path_factory.mktemp("mccal")
    from conftest import load_fakes

    fakes = load_fakes()
    for i in range(4):
        fakes.make_npz(fakes_dir / "raw", name=f"scene{i}", size=64)
    ingest(
        "ukis-csmask",
        fakes_dir / "raw",
        fakes_dir / "store",
        chip_size=32,
        progress=False,
        class_map=UKIS_MULTICLASS_MAP,
    )
    params = mc_params(
        fakes_dir / "store",
        "train.max_epochs=1",
        "calibrate.class_of_interest=shadow",
        "calibrate.threshold_rule=best_f1",
        f"evaluate.sweep_thresholds={GRID}",
    )
    run = fakes_dir / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from workbench.data.prepare import prepare_data

        prepare_data(params.data, run, seed=params.seed)
        run_training(params, run)
    finally:
        torch.set_num_threads(threads)
    labels, valids, indices = split_pixels(run, params, "val")
    counts = np.bincount(np.concatenate([lab[v] for lab, v in zip(labels, valids, strict=True)]), minlength=3)
    freq = counts / counts.sum()
    vector = T_KNOWN * np.log(np.maximum(freq, 1e-9))
    store_logits(run, "val", indices, [np.broadcast_to(vector[:, None, None], (3, *lab.shape)) for lab in labels])
    rng = np.random.default_rng(0)
    labels_t, _, indices_t = split_pixels(run, params, "test")
    test_logits = []
    for lab in labels_t:
        onehot = np.stack([(lab == c) for c in range(3)]).astype(np.float64)
        test_logits.append(3.0 * (1.5 * onehot + rng.normal(0, 1.0, onehot.shape)))
    store_logits(run, "test", indices_t, test_logits)
    from workbench.stages.calibration import run_calibration

    result = run_calibration(params, run)
    return {"params": params, "run": run, "result": result, "freq": freq}


def test_known_temperature_and_class_threshold(mc_run: dict[str, Any]) -> None:
    run, params = mc_run["run"], mc_run["params"]
    saved = json.loads((run / "model" / "calibration.json").read_text())
    assert saved["decision"] == "argmax" and saved["classes"] == NAMES
    assert saved["temperature"] == pytest.approx(T_KNOWN, rel=1e-2)
    assert mc_run["result"].metrics["calibration.temperature"] == saved["temperature"]
    # class-of-interest threshold: best F1 of "shadow wherever p_shadow >= t, else argmax" over the val pixels
    labels, valids, _ = split_pixels(run, params, "val")
    truth = np.concatenate([lab[v] for lab, v in zip(labels, valids, strict=True)]) == 2
    p = softmax(np.log(np.maximum(mc_run["freq"], 1e-9)) * T_KNOWN / saved["temperature"], 0)
    scores = [f1_score(truth, np.full(truth.size, p[2] >= t or p.argmax() == 2), zero_division=0.0) for t in GRID]
    assert saved["class_thresholds"]["shadow"] == pytest.approx(GRID[int(np.argmax(scores))])
    # ECE after calibration is that of a calibrated constant forecast: ~0
    assert saved["ece_top_label_after"] < 0.01 and saved["ece_top_label_before"] > saved["ece_top_label_after"]


def test_calibrated_test_metrics_equal_sklearn(mc_run: dict[str, Any]) -> None:
    run, params = mc_run["run"], mc_run["params"]
    saved = json.loads((run / "model" / "calibration.json").read_text())
    predictions = xr.open_zarr(run / "predictions" / "test.zarr", consolidated=False)
    labels, valids, _ = split_pixels(run, params, "test")
    truth, pred = [], []
    for position, (lab, keep) in enumerate(zip(labels, valids, strict=True)):
        logit = predictions["logit"].values[position].astype(np.float64)
        prob = softmax(logit / saved["temperature"], 0)
        decided = prob.argmax(0)
        decided[prob[2] >= saved["class_thresholds"]["shadow"]] = 2
        truth.append(lab[keep])
        pred.append(decided[keep])
    y, yhat = np.concatenate(truth), np.concatenate(pred)
    metrics = mc_run["result"].metrics
    for c, name in enumerate(NAMES):
        assert metrics[f"test.calibrated_iou.{name}"] == pytest.approx(jaccard_score(y == c, yhat == c))
        assert metrics[f"test.calibrated_f1.{name}"] == pytest.approx(f1_score(y == c, yhat == c))
        assert metrics[f"test.calibrated_precision.{name}"] == pytest.approx(precision_score(y == c, yhat == c))
        assert metrics[f"test.calibrated_recall.{name}"] == pytest.approx(recall_score(y == c, yhat == c))
    assert metrics["test.calibrated_miou"] == pytest.approx(jaccard_score(y, yhat, average="macro"))
    assert metrics["test.calibrated_overall_accuracy"] == pytest.approx(accuracy_score(y, yhat))
    confusion = pd.read_csv(run / "diagnostics" / "confusion_test_calibrated.csv")
    assert int(confusion["count"].sum()) == y.size
    shadow_as_clear = confusion.query("label == 'shadow' and predicted == 'clear'")["count"].item()
    assert shadow_as_clear == int(np.sum((y == 2) & (yhat == 0)))
    # reliability tables: top-label and one block per class, before and after, bins holding every pixel
    table = pd.read_csv(run / "diagnostics" / "reliability_test.csv")
    assert set(table["class"]) == {"all", *NAMES}
    for (_kind, _cls, _cal), block in table.groupby(["kind", "class", "calibrated"]):
        assert int(block["count"].sum()) == y.size


def test_per_class_temperature_and_bundle_checks(mc_run: dict[str, Any]) -> None:
    from workbench.models.bundle import BundleIntegrityError, load_bundle, write_calibration
    from workbench.stages.mc_calibration import run_multiclass_calibration

    run, params = mc_run["run"], mc_run["params"]
    per_class = params.model_copy(deep=True)
    per_class.calibrate.per_class_temperature = True
    result = run_multiclass_calibration(per_class, run)
    saved = json.loads((run / "model" / "calibration.json").read_text())
    assert isinstance(saved["temperature"], list) and len(saved["temperature"]) == 3
    assert [result.metrics[f"calibration.temperature.{n}"] for n in NAMES] == saved["temperature"]
    # the per-class vector fits the val NLL at least as well as the single temperature
    assert result.metrics["calibration.nll_after"] <= mc_run["result"].metrics["calibration.nll_after"] + 1e-9
    bundle = load_bundle(run / "model", require_calibration=True)
    assert bundle.calibration["temperature"] == saved["temperature"]
    with pytest.raises(ValueError, match=r"2 per-class temperatures for a model of 3 classes"):
        write_calibration(run / "model", {**saved, "temperature": [1.0, 2.0]}, bundle.model_params)
    with pytest.raises(ValueError, match=r"class_thresholds names 'lake'"):
        write_calibration(run / "model", {**saved, "class_thresholds": {"lake": 0.3}}, bundle.model_params)
    with pytest.raises(ValueError, match=r"binary calibration .* model has 3 classes"):
        write_calibration(run / "model", {"temperature": 1.2, "threshold": 0.4}, bundle.model_params)
    path = run / "model" / "calibration.json"
    path.write_text(json.dumps({**saved, "temperature": [1.0, 1.0, 9.0]}))
    with pytest.raises(BundleIntegrityError, match=r"calibration\.json changed"):
        load_bundle(run / "model")


def test_pixel_sample_is_bounded_and_takes_every_pixel_of_a_small_split(tmp_path: Path) -> None:
    from workbench.data.store import BandSpec, Chip, StoreWriter
    from workbench.stages.mc_calibration import sample_pixels

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (6, 8, 8)).astype(np.uint8)
    labels[:, 0, :] = 255  # ignored
    with StoreWriter(tmp_path / "store", [BandSpec("B1", "S2L2A", optical=True)], source="test") as writer:
        for i in range(6):
            writer.append(Chip(f"c{i}", np.zeros((1, 8, 8), np.float32), labels[i], np.ones((8, 8), bool)))
    logits = rng.normal(0, 1, (6, 3, 8, 8)).astype(np.float16)
    predictions = xr.Dataset(
        {"logit": (("chip", "class", "y", "x"), logits)}, coords={"chip_index": ("chip", np.arange(6))}
    )
    pixels, classes = sample_pixels(tmp_path / "store", predictions, 10_000, seed=0)
    keep = labels != 255
    np.testing.assert_array_equal(classes, labels[keep])  # all 6 x 7 x 8 labelled pixels, in order
    np.testing.assert_array_equal(pixels, np.moveaxis(logits, 1, -1)[keep].astype(np.float64))
    pixels, classes = sample_pixels(tmp_path / "store", predictions, 100, seed=0)
    assert pixels.shape == (classes.size, 3) and 0 < classes.size <= 100
    assert set(classes.tolist()) <= {0, 1, 2}

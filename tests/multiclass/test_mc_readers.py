"""Readers of stored softmax logits besides training and calibration: out-of-fold predictions and
`workbench evaluate` on another store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_fakes, tiny_demo_params
from sklearn.metrics import accuracy_score, jaccard_score
from torch import nn

from workbench.data.dataset import ChipDataset
from workbench.data.ingest import ingest
from workbench.data.normalize import NormalizationStats
from workbench.data.prepare import PreparedData, prepare_data
from workbench.data.sources.npz import UKIS_MULTICLASS_MAP, UKIS_MULTICLASS_NAMES
from workbench.infer.chips import load_predictions
from workbench.models.bundle import save_bundle, write_calibration
from workbench.models.factory import build_model
from workbench.params import ClassSpec, ModelParams, Params
from workbench.run import RunLayout
from workbench.stages.external import evaluate_external
from workbench.train.crossfit import out_of_fold_predictions

fakes = load_fakes()
UKIS = ["Blue", "Green", "Red", "NIR", "SWIR16", "SWIR22"]


class ClassConstants(nn.Module):
    """Logit of class c = fold + 10 c everywhere."""

    def __init__(self, fold: float) -> None:
        super().__init__()
        self.fold = fold

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        values = torch.tensor([self.fold, self.fold + 10.0, self.fold + 20.0]).view(1, 3, 1, 1)
        return values.expand(image.shape[0], 3, *image.shape[-2:]).clone()


def test_out_of_fold_predictions_keep_the_class_axis(tmp_path: Path, one_thread: None) -> None:
    params: Params = tiny_demo_params(
        tmp_path / "store",
        "data.split.n_folds=3",
        "review.out_of_fold=true",
        "model.num_classes=3",
        "train.loss=[{name: ce}]",
    )
    prepared = prepare_data(params.data, tmp_path / "run", seed=params.seed)

    def fake_train(settings: Params, data: PreparedData, run_dir: Path) -> Any:
        fold = float(run_dir.name.removeprefix("fold-"))
        return SimpleNamespace(
            task=SimpleNamespace(model=ClassConstants(fold)), datamodule=SimpleNamespace(normalizer=None)
        )

    out_of_fold_predictions(params, prepared, tmp_path / "run", "train", train=fake_train)
    oof = load_predictions(tmp_path / "run", "train_oof")
    assert oof["logit"].dims == ("chip", "class", "y", "x") and oof.attrs["num_classes"] == 3
    values = oof["logit"].values.astype(np.float32)
    fold = values[:, 0, 0, 0]
    for c in range(3):  # each class channel kept in place, per chip the fold model's constants
        np.testing.assert_array_equal(values[:, c], np.broadcast_to((fold + 10 * c)[:, None, None], values[:, c].shape))
    assert set(fold.tolist()) == {0.0, 1.0, 2.0}


def test_no_coordinates_no_spatial_folds(tmp_path: Path) -> None:
    from workbench.train.crossfit import assign_folds, use_out_of_fold

    fakes.make_npz(tmp_path / "raw", size=64)
    ingest(
        "ukis-csmask", tmp_path / "raw", tmp_path / "store", chip_size=32, progress=False, class_map=UKIS_MULTICLASS_MAP
    )
    params = tiny_demo_params(tmp_path / "store", "data.source=store", "review.splits=[train, val, test]")
    catalog = pd.read_parquet(tmp_path / "store" / "catalog.parquet").assign(split="train")
    assert not use_out_of_fold(params, catalog)
    prepared = SimpleNamespace(catalog=catalog)
    with pytest.raises(ValueError, match=r"4 chip\(s\) of split 'train' have no coordinates.*out_of_fold: false"):
        assign_folds(params, prepared, "train")  # type: ignore[arg-type]


def test_external_evaluation_of_a_softmax_model_equals_sklearn(tmp_path: Path, one_thread: None) -> None:
    fakes.make_npz(tmp_path / "raw", size=64)
    store = tmp_path / "store"
    ingest("ukis-csmask", tmp_path / "raw", store, chip_size=32, progress=False, class_map=UKIS_MULTICLASS_MAP)
    classes = [
        ClassSpec(name=n, color=c)
        for n, c in zip(UKIS_MULTICLASS_NAMES, ["#000000", "#ffffff", "#ff0000"], strict=True)
    ]
    model_params = ModelParams(architecture="satunet", base_channels=4, num_classes=3, classes=classes)
    torch.manual_seed(0)
    model = build_model(model_params, 6, UKIS, ["L"] * 6).eval()
    stats = NormalizationStats(UKIS, "zscore", mean=[0.3] * 6, std=[0.2] * 6)
    save_bundle(tmp_path / "model", model, model_params, UKIS, ["L"] * 6, stats)
    calibration = {"decision": "argmax", "temperature": [1.0, 0.5, 2.0], "class_thresholds": {"shadow": 0.34}}
    write_calibration(tmp_path / "model", calibration, model_params)
    run_dir, metrics = evaluate_external(tmp_path / "model", store, reports=tmp_path / "reports")
    predictions = load_predictions(run_dir, "test")
    assert predictions["logit"].dims == ("chip", "class", "y", "x")
    dataset = ChipDataset(store, predictions["chip_index"].values)
    truth, raw, calibrated = [], [], []
    for position in range(len(dataset)):
        _, label, valid = dataset.read_raw(position)
        keep = valid & (label != 255)
        z = predictions["logit"].values[position].astype(np.float64)
        p = np.exp(z / np.array([1.0, 0.5, 2.0])[:, None, None])
        p /= p.sum(axis=0)
        decided = p.argmax(0)
        decided[p[2] >= 0.34] = 2
        truth.append(label[keep])
        raw.append(z.argmax(0)[keep])
        calibrated.append(decided[keep])
    y = np.concatenate(truth)
    for name, pred in (("raw", np.concatenate(raw)), ("calibrated", np.concatenate(calibrated))):
        assert metrics[f"test.{name}.overall_accuracy"] == pytest.approx(accuracy_score(y, pred))
        for c, cls in enumerate(UKIS_MULTICLASS_NAMES):
            expected = jaccard_score(y == c, pred == c) if ((y == c) | (pred == c)).any() else float("nan")
            assert metrics[f"test.{name}.iou.{cls}"] == pytest.approx(expected, nan_ok=True)
    assert [metrics[f"calibration.temperature.{n}"] for n in UKIS_MULTICLASS_NAMES] == [1.0, 0.5, 2.0]
    assert (RunLayout(run_dir).confusion("test")).is_file()

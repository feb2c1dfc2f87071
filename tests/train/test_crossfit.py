"""Out-of-fold predictions: each train chip scored by a model trained without its spatial fold."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_demo_params
from torch import nn

from workbench.data.prepare import PreparedData, prepare_data
from workbench.data.split import block_indices
from workbench.infer.chips import load_predictions
from workbench.params import Params
from workbench.run import FOLDS_DIR
from workbench.train.crossfit import HELDOUT, assign_folds, fold_params, out_of_fold_predictions


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crossfit") / "store"


def params_for(store: Path, *extra: str) -> Params:
    return tiny_demo_params(store, "data.split.n_folds=3", "review.out_of_fold=true", *extra)


class ConstantModel(nn.Module):
    """Predicts the same logit everywhere: the number of the fold whose model it is."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.full((image.shape[0], 1, *image.shape[-2:]), self.value)


def fake_result(value: float) -> Any:
    """What train_model returns, as far as cross-fitting uses it."""
    return SimpleNamespace(
        task=SimpleNamespace(model=ConstantModel(value)), datamodule=SimpleNamespace(normalizer=None)
    )


def test_every_train_chip_is_scored_by_a_model_that_never_saw_it(store: Path, tmp_path: Path) -> None:
    params = params_for(store)
    prepared = prepare_data(params.data, tmp_path, seed=params.seed)
    trained_on: dict[int, set[int]] = {}
    fold_of_call: list[int] = []

    def fake_train(settings: Params, data: PreparedData, run_dir: Path) -> Any:
        fold = int(run_dir.name.removeprefix("fold-"))
        fold_of_call.append(fold)
        assert settings.train.tracking.uri is None
        trained_on[fold] = set(np.flatnonzero(data.catalog["split"].to_numpy() == "train").tolist())
        assert (data.catalog["split"].to_numpy() == "val").sum() == (prepared.catalog["split"] == "val").sum()
        return SimpleNamespace(
            task=SimpleNamespace(model=ConstantModel(float(fold))), datamodule=SimpleNamespace(normalizer=None)
        )

    metrics = out_of_fold_predictions(params, prepared, tmp_path, "train", train=fake_train)
    train_chips = set(np.flatnonzero(prepared.catalog["split"].to_numpy() == "train").tolist())
    oof = load_predictions(tmp_path, "train_oof")
    indices = [int(i) for i in oof["chip_index"].values]
    assert indices == sorted(train_chips)  # each train chip exactly once, in store order
    assert fold_of_call == [0, 1, 2] and metrics["oof.n_folds"] == 3
    for index, logits in zip(indices, oof["logit"].values, strict=True):
        fold = int(logits[0, 0])
        assert (logits == fold).all()
        assert index not in trained_on[fold]  # the model that scored it did not train on it
        assert trained_on[fold] | {index} <= train_chips
    # whole spatial blocks leave together: chips of one block always share their fold
    positions, folds = assign_folds(params, prepared, "train")
    lat = prepared.catalog["lat"].to_numpy()[positions]
    lon = prepared.catalog["lon"].to_numpy()[positions]
    lat_idx, lon_idx = block_indices(lat, lon, params.data.split.block_deg)
    for block in set(zip(lat_idx.tolist(), lon_idx.tolist(), strict=True)):
        members = (lat_idx == block[0]) & (lon_idx == block[1])
        assert len(set(folds[members].tolist())) == 1


def test_finished_folds_are_not_trained_again(store: Path, tmp_path: Path) -> None:
    params = params_for(store)
    prepared = prepare_data(params.data, tmp_path, seed=params.seed)
    calls: list[str] = []

    def fake_train(settings: Params, data: PreparedData, run_dir: Path) -> Any:
        calls.append(run_dir.name)
        if run_dir.name == "fold-1" and calls.count("fold-1") == 1:
            raise KeyboardInterrupt  # the run stops during fold 1
        return SimpleNamespace(
            task=SimpleNamespace(model=ConstantModel(0.0)), datamodule=SimpleNamespace(normalizer=None)
        )

    with pytest.raises(KeyboardInterrupt):
        out_of_fold_predictions(params, prepared, tmp_path, "train", train=fake_train)
    assert (tmp_path / FOLDS_DIR / "fold-0" / "predictions" / f"{HELDOUT}.zarr").exists()
    out_of_fold_predictions(params, prepared, tmp_path, "train", train=fake_train)
    assert calls == ["fold-0", "fold-1", "fold-1", "fold-2"]


def test_fold_params_set_epochs_and_drop_tracking(store: Path) -> None:
    params = params_for(store, "review.out_of_fold_epochs=3", "train.tracking.uri=mlruns")
    settings = fold_params(params)
    assert settings.train.max_epochs == 3 and settings.train.tracking.uri is None
    assert settings.model == params.model and settings.data == params.data
    assert fold_params(params_for(store)).train.max_epochs == params.train.max_epochs


def test_training_and_review_stages_use_out_of_fold_predictions(store: Path, tmp_path: Path) -> None:
    from workbench.stages.review import run_review
    from workbench.stages.training import run_training

    params = params_for(store, "data.split.n_folds=2", "review.n_figures=1")
    prepare_data(params.data, tmp_path, seed=params.seed)
    result = run_training(params, tmp_path)
    assert result.metrics["oof.n_folds"] == 2
    for fold in range(2):
        fold_dir = tmp_path / FOLDS_DIR / f"fold-{fold}"
        assert (fold_dir / "predictions" / f"{HELDOUT}.zarr").exists()
        assert not (fold_dir / "checkpoints").exists() and not (fold_dir / "model").exists()
    in_sample = load_predictions(tmp_path, "train")
    out_of_fold = load_predictions(tmp_path, "train_oof")
    assert list(in_sample["chip_index"].values) == list(out_of_fold["chip_index"].values)
    assert not np.array_equal(in_sample["logit"].values, out_of_fold["logit"].values)
    review = run_review(params, tmp_path)
    assert review.metrics["review.out_of_fold"] is True
    metrics = json.loads((tmp_path / "metrics" / "review.json").read_text())
    assert metrics["review.out_of_fold"] is True


def test_review_without_out_of_fold_predictions_says_what_to_run(store: Path, tmp_path: Path) -> None:
    from workbench.stages.review import review_predictions

    params = params_for(store)
    assert review_predictions(params, tmp_path, "val") == "val"
    with pytest.raises(FileNotFoundError, match=r"train_oof\.zarr is missing; run the training stage"):
        review_predictions(params, tmp_path, "train")

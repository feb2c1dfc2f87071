"""Out-of-fold predictions: every chip of a split scored by a model that never trained on it.

A model scores the chips it was trained on too kindly: it has partly memorised their labels,
corrupted ones included, so label-noise review ranks training chips too low. Cross-fitting
removes that bias. The chips of the split are dealt to spatial folds (whole blocks of
`data.split.block_deg`, so a chip's neighbours leave with it), one model per fold is trained on
the other folds, and it predicts the held-out fold. Validation data, normalisation and every other
setting stay those of the run.

Each fold works in `<run_dir>/folds/fold-<k>/`; its held-out logits are written there first, so an
interrupted run resumes with the next unfinished fold. The fold's checkpoints and weights are
deleted once its logits are safe; its logs and metrics stay. The combined logits are written as
the predictions `<split>_oof` beside the run's own.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.dataset import ChipDataset
from workbench.data.prepare import PreparedData
from workbench.data.split import spatial_kfold
from workbench.infer.chips import collect_logits, load_predictions, save_predictions
from workbench.params import Params
from workbench.run import RunLayout
from workbench.train.fit import train_model

HELDOUT = "heldout"


def oof_name(split: str) -> str:
    """Name of the out-of-fold predictions of `split` (under predictions/)."""
    return f"{split}_oof"


def assign_folds(params: Params, prepared: PreparedData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Store positions of the chips of `split` and the spatial fold of each."""

    catalog = prepared.catalog
    positions = np.flatnonzero(catalog["split"].to_numpy() == split)
    if positions.size == 0:
        raise ValueError(f"split {split!r} has no chips to cross-fit; check review.splits and data.split")
    cfg = params.data.split
    lat, lon = catalog["lat"].to_numpy(float)[positions], catalog["lon"].to_numpy(float)[positions]
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        missing = int(np.sum(~(np.isfinite(lat) & np.isfinite(lon))))
        raise ValueError(
            f"{missing} chip(s) of split {split!r} have no coordinates (lat/lon), so they cannot be dealt to spatial "
            "folds; set review.out_of_fold: false (or ingest a store with georeferenced chips)"
        )
    folds = spatial_kfold(
        catalog["lat"].to_numpy()[positions],
        catalog["lon"].to_numpy()[positions],
        n_folds=cfg.n_folds,
        block_deg=cfg.block_deg,
        salt=cfg.salt,
    )
    return positions, folds


def fold_params(params: Params) -> Params:
    """The run's parameters for a fold model: `review.out_of_fold_epochs` epochs, no MLflow run of its own."""
    train = params.train.model_copy(
        update={
            "max_epochs": params.review.out_of_fold_epochs or params.train.max_epochs,
            "tracking": params.train.tracking.model_copy(update={"uri": None}),
        }
    )
    return params.model_copy(update={"train": train})


def fold_data(prepared: PreparedData, heldout: np.ndarray) -> PreparedData:
    """The run's data with the held-out chips moved out of every split the trainer uses."""
    catalog = prepared.catalog.copy()
    split = catalog["split"].to_numpy(dtype=object).copy()
    split[heldout] = HELDOUT
    catalog["split"] = split
    return dataclasses.replace(prepared, catalog=catalog)


def out_of_fold_predictions(
    params: Params,
    prepared: PreparedData,
    run_dir: Path,
    split: str = "train",
    train: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train one model per spatial fold of `split`, predict its held-out chips, save them as `<split>_oof`.

    `train` is the training function (default `workbench.train.fit.train_model`); returns metrics:
    the number of folds, the fewest and most chips in a fold, and seconds.
    """

    fit = train if train is not None else train_model
    run_dir = Path(run_dir)
    positions, folds = assign_folds(params, prepared, split)
    settings = fold_params(params)
    started = time.perf_counter()
    indices, logits = [], []
    for fold in range(params.data.split.n_folds):
        heldout = positions[folds == fold]
        fold_layout = RunLayout(run_dir).fold(fold)
        fold_dir = fold_layout.root
        saved = fold_layout.predictions(HELDOUT)
        if not saved.exists():
            trained = fit(settings, fold_data(prepared, heldout), fold_dir)
            dataset = ChipDataset(
                prepared.store,
                heldout,
                bands=prepared.bands,
                normalizer=trained.datamodule.normalizer,
                corrections=prepared.corrections,
            )
            model = trained.task.model.eval()
            fold_indices, fold_logits = collect_logits(model, dataset, params.data.batch_size, params.evaluate.tta)
            save_predictions(fold_dir, HELDOUT, fold_indices, fold_logits, {"split": split, "fold": fold})
            for bulky in (fold_layout.checkpoints, fold_layout.model):
                shutil.rmtree(bulky, ignore_errors=True)
        stored = load_predictions(fold_dir, HELDOUT)
        if sorted(int(i) for i in stored["chip_index"].values) != sorted(int(i) for i in heldout):
            raise RuntimeError(f"{saved} holds other chips than fold {fold}; delete {fold_dir} and run again")
        indices.append(stored["chip_index"].values)
        logits.append(stored["logit"].values)
    index = np.concatenate(indices)
    order = np.argsort(index, kind="stable")
    save_predictions(
        run_dir,
        oof_name(split),
        index[order],
        np.concatenate(logits)[order],
        {"split": split, "out_of_fold": params.data.split.n_folds},
    )
    counts = [int((folds == fold).sum()) for fold in range(params.data.split.n_folds)]
    return {
        "oof.n_folds": params.data.split.n_folds,
        "oof.min_chips_per_fold": min(counts),
        "oof.max_chips_per_fold": max(counts),
        "oof.seconds": time.perf_counter() - started,
    }


def use_out_of_fold(params: Params, catalog: Any) -> bool:
    """Whether train chips are scored out of fold: `review.out_of_fold`, or by default (null) when the train
    split is reviewed and holds at least 2 x `data.split.n_folds` spatial blocks of `data.split.block_deg`."""
    cfg = params.review
    if cfg.out_of_fold is not None:
        return bool(cfg.out_of_fold) and "train" in cfg.splits
    if "train" not in cfg.splits:
        return False
    train = catalog[catalog["split"].to_numpy() == "train"]
    if len(train) == 0 or not np.isfinite(train[["lat", "lon"]].to_numpy(float)).all():
        return False  # nothing to review, or chips without coordinates (no spatial folds)
    size = params.data.split.block_deg
    blocks = {
        (int(np.floor(lat / size)), int(np.floor(lon / size)))
        for lat, lon in zip(train["lat"], train["lon"], strict=True)
    }
    return len(blocks) >= 2 * params.data.split.n_folds

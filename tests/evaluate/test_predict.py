"""Chip predictions on disk and the per-chip table built from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import jaccard_score

from workbench.arrays import IGNORE_INDEX
from workbench.data.store import BandSpec, Chip, StoreWriter, read_catalog
from workbench.evaluate.chips import per_chip_table
from workbench.infer.chips import load_predictions, save_predictions

BANDS = [BandSpec("B03", "S2L2A", True), BandSpec("B11", "S2L2A", True)]
SIZE = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(11)
    dest = tmp_path_factory.mktemp("predict") / "store"
    with StoreWriter(dest, BANDS, source="unit") as writer:
        for i in range(4):
            label = (rng.random((SIZE, SIZE)) < 0.4).astype(np.uint8)
            label[0, 0] = IGNORE_INDEX
            valid = np.ones((SIZE, SIZE), bool)
            valid[-1, :] = False
            image = rng.uniform(0.05, 0.4, size=(2, SIZE, SIZE)).astype(np.float32)
            writer.append(Chip(f"p{i}", image, label, valid, lat=1.0, lon=2.0, region="r", year=2020, split="val"))
    return dest


def test_saved_predictions_round_trip_as_float16(tmp_path: Path) -> None:
    logits = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    save_predictions(tmp_path, "val", np.array([7, 2, 5]), logits, {"split": "val"})
    loaded = load_predictions(tmp_path, "val")
    assert loaded["chip_index"].values.tolist() == [7, 2, 5]
    np.testing.assert_array_equal(loaded["logit"].values, logits.astype(np.float16))
    assert loaded.attrs["split"] == "val"


def test_per_chip_table_counts_against_sklearn_and_counts_ties_as_positive(store: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(4, SIZE, SIZE)).astype(np.float16)
    logits[:, 2, :] = 0.0  # probability exactly 0.5: predicted positive at threshold 0.5, as in calibration
    save_predictions(tmp_path, "val", np.arange(4), logits)
    catalog = read_catalog(store)
    table = per_chip_table(store, catalog, load_predictions(tmp_path, "val"), threshold=0.5, bands=["B03", "B11"])
    import zarr

    labels = zarr.open_array(str(store / "chips.zarr" / "label"), mode="r")[:]
    valids = zarr.open_array(str(store / "chips.zarr" / "valid"), mode="r")[:]
    for i, row in table.iterrows():
        usable = valids[i] & (labels[i] != IGNORE_INDEX)
        truth = labels[i][usable] == 1
        pred = logits[i].astype(np.float32)[usable] >= 0
        assert row["valid_pixels"] == usable.sum() == SIZE * (SIZE - 1) - 1
        assert row["tp"] == (pred & truth).sum() and row["fp"] == (pred & ~truth).sum()
        assert row["iou"] == pytest.approx(jaccard_score(truth, pred))
        assert row["chip_id"] == f"p{i}" and row["store_index"] == i
    assert (table["predicted_pixels"] >= SIZE).all()  # the tied row counts in every chip

"""Label values outside the model's classes stop a run at preflight, named with value, count and store file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import tiny_store

from workbench.data.store import ChipReader
from workbench.data.validate import PreflightError, outside_label_values, preflight
from workbench.params import Params, load_params


def params_for(store: Path, *extra: str) -> Params:
    return load_params(
        None, ["experiment=bad", "data.source=store", f"data.store={store}", "data.split.method=catalog", *extra]
    )


def test_labels_beyond_the_classes_are_named_at_preflight(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "s3", label_value=3)  # a 4x4 square of 3 in each of 8 chips
    labels = ChipReader(store, "label")
    expected = sum(int(np.sum(labels.read(i) == 3)) for i in range(labels.shape[0]))  # independent count
    assert expected == 8 * 16
    with pytest.raises(PreflightError) as error:
        preflight(params_for(store, "model.num_classes=3"), store)
    text = str(error.value)
    assert f"{store / 'chips.zarr' / 'label'} holds label value 3 ({expected} valid px in 8 chip(s): chip0" in text
    assert "model.num_classes=3 (classes 0..2, 255 = ignored)" in text and "class map" in text
    # binary: 3 is no class either; with four classes it is one, and the run may go on
    with pytest.raises(PreflightError, match="label value 3"):
        preflight(params_for(store), store)
    assert preflight(params_for(store, "model.num_classes=4"), store).bands


def test_ignored_and_invalid_pixels_are_not_counted(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "s255", label_value=255)
    assert outside_label_values(store, 3) == {}

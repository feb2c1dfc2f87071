"""The chip explorer on a finished run: the run's calibrated prediction and review score beside each chip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_audit import BANDS, SIZE, make_chip, write_store

from workbench.audit.explorer import chip_explorer, run_overlay
from workbench.data.store import read_catalog
from workbench.infer.chips import save_predictions
from workbench.run import RunLayout


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("overlay") / "store", [make_chip(n) for n in range(9)])


def finished_run(root: Path) -> RunLayout:
    layout = RunLayout(root)
    logits = np.stack([np.full((SIZE, SIZE), 4.0), np.full((SIZE, SIZE), -4.0)])
    save_predictions(layout.root, "val", np.array([5, 6]), logits)
    layout.model.mkdir(parents=True)
    layout.calibration.write_text(json.dumps({"temperature": 2.0, "threshold": 0.6}))
    layout.diagnostics.mkdir(parents=True)
    pd.DataFrame({"chip_id": ["chip6", "chip5"], "score": [0.9, 0.25], "rank": [1, 2]}).to_parquet(
        layout.diagnostic("review.parquet")
    )
    return layout


def test_explorer_draws_the_calibrated_prediction_and_the_review_score(store: Path, tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run")
    explorer = chip_explorer(store, read_catalog(store), BANDS, run=run.root)
    explorer.chip.value = "chip5"
    fig = explorer.figure()
    assert fig is not None and len(fig.axes) == 4
    shown = np.ma.filled(fig.axes[2].images[0].get_array(), np.nan)
    valid = make_chip(5)["valid"]
    expected = 1 / (1 + np.exp(-4.0 / 2.0))  # logit 4 at temperature 2
    np.testing.assert_allclose(shown[valid], expected, rtol=1e-3)
    assert np.isnan(shown[~valid]).all()
    assert "≥ 0.60" in fig.axes[2].get_title()  # the run's calibrated threshold
    assert "review score 0.250 (rank 2 of 2)" in explorer.caption.value
    explorer.chip.value = "chip6"
    assert "review score 0.900 (rank 1 of 2)" in explorer.caption.value

    before = explorer.image.value
    explorer.choice.value = "SWIR (B12/B8A/B04)"
    assert explorer.image.value != before and len(explorer.figure().axes) == 4

    explorer.chip.value = "chip0"  # a train chip this run did not predict
    assert len(explorer.figure().axes) == 3 and "not predicted" in explorer.caption.value


def test_a_run_without_predictions_has_no_overlay(tmp_path: Path) -> None:
    assert run_overlay(tmp_path) is None

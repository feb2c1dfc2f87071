"""A finished run's checkpoint is never resumed with other training parameters (loss, learning rate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_demo_params

from workbench.data.prepare import prepare_data
from workbench.run import RunLayout, params_hash, training_params
from workbench.train import fit


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """One torch thread (deterministic, no oversubscription)."""


def test_resume_with_other_loss_or_learning_rate_is_refused_and_names_the_keys(tmp_path: Path) -> None:
    params = tiny_demo_params(tmp_path / "store", "train.max_epochs=1", "train.ema.enabled=false")
    run = tmp_path / "run"
    prepared = prepare_data(params.data, run, seed=params.seed)
    fit.train_model(params, prepared, run, resume=False)
    last = RunLayout(run).last_checkpoint
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state[fit.PARAMS_HASH_KEY] == params_hash(training_params(params))
    assert state[fit.PARAMS_KEY]["train.optimizer.lr"] == params.train.optimizer.lr
    weights_before, checkpoint_before = RunLayout(run).weights.read_bytes(), last.read_bytes()

    changed = tiny_demo_params(
        tmp_path / "store", "train.max_epochs=1", "train.ema.enabled=false", "train.optimizer.lr=0.05"
    )
    with pytest.raises(fit.CheckpointMismatch, match=r"train\.optimizer\.lr: 0\.002 -> 0\.05") as caught:
        fit.train_model(changed, prepared, run, resume=True)
    assert "not resuming" in str(caught.value) and "delete" in str(caught.value)
    assert RunLayout(run).weights.read_bytes() == weights_before  # nothing re-saved
    assert last.read_bytes() == checkpoint_before

    # a longer run of the same parameters still resumes (train.max_epochs may grow)
    longer = tiny_demo_params(tmp_path / "store", "train.max_epochs=2", "train.ema.enabled=false")
    resumed = fit.train_model(longer, prepared, run, resume=True)
    assert resumed.metrics["train.epochs"] == 2


def test_training_params_leave_out_evaluation_and_review_sections(tmp_path: Path) -> None:
    params = tiny_demo_params(tmp_path / "store")
    other = tiny_demo_params(tmp_path / "store", "evaluate.threshold=0.3", "review.n_figures=2")
    assert params_hash(training_params(params)) == params_hash(training_params(other))
    lossy = tiny_demo_params(tmp_path / "store", "train.loss=[{name: focal, weight: 1.0}]")
    assert params_hash(training_params(params)) != params_hash(training_params(lossy))

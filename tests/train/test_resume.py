"""Exact resume: a run stopped mid-epoch and resumed from last.ckpt ends with the uninterrupted run's weights."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_demo_params

from workbench.data.loading import EpochShuffleSampler, ResumableDataLoader
from workbench.data.prepare import PreparedData, prepare_data
from workbench.params import Params
from workbench.train import fit
from workbench.train.callbacks import RngStateCallback, capture_rng_state, restore_rng_state

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 6  # 22 train chips in batches of 4


class Interrupted(RuntimeError):
    """Stands in for a killed process."""


class InterruptAt(L.Callback):
    """Raise after the optimiser step `step` (like a job killed between two checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"stopped at step {self.step}")


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume") / "store"


def tiny_params(store: Path, *extra: str) -> Params:
    return tiny_demo_params(
        store,
        "data.batch_size=4",
        "data.sampler.kind=balanced",
        "train.max_epochs=2",
        "train.checkpoint_every_n_steps=2",
        "train.ema.enabled=true",
        "train.ema.decay=0.9",
        "train.final_weights=ema",  # compare the end of training, not the best checkpoint
        *extra,
    )


def prepared_run(params: Params, run_dir: Path) -> PreparedData:
    prepared = prepare_data(params.data, run_dir, seed=params.seed)
    assert (prepared.catalog["split"] == "train").sum() == 22
    return prepared


def final_weights(result: fit.TrainResult) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.task.model.state_dict().items()}


def test_killed_mid_epoch_and_resumed_run_matches_uninterrupted_run(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params(store)
    uninterrupted = fit.train_model(params, prepared_run(params, tmp_path / "a"), tmp_path / "a", resume=False)
    assert uninterrupted.metrics["train.steps"] == 2 * STEPS_PER_EPOCH

    run_b = tmp_path / "b"
    prepared = prepared_run(params, run_b)
    original = fit.build_callbacks
    monkeypatch.setattr(fit, "build_callbacks", lambda *a: [*original(*a), InterruptAt(STEPS_PER_EPOCH + 3)])
    with pytest.raises(Interrupted):
        fit.train_model(params, prepared, run_b, resume=True)
    monkeypatch.setattr(fit, "build_callbacks", original)

    last = run_b / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS_PER_EPOCH + 2  # the step checkpoint just before the kill
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches": 2, "epoch": 1}]

    resumed = fit.train_model(params, prepared, run_b, resume=True)
    assert resumed.metrics["train.steps"] == 2 * STEPS_PER_EPOCH
    expected, got = final_weights(uninterrupted), final_weights(resumed)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    # the training log of the resumed run holds the whole run: the same per-epoch values as the uninterrupted one
    from workbench.train.log import epoch_table

    curves = [epoch_table(run / "logs" / "metrics.csv") for run in (tmp_path / "a", run_b)]
    assert curves[0].index.tolist() == [0, 1]
    pd.testing.assert_frame_equal(curves[0], curves[1])

    # the control: resuming without the loader position (restarting the epoch) does not reproduce the weights
    checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"batches": 0, "epoch": 1}]
    torch.save(checkpoint, last)
    restarted = fit.train_model(params, prepared, run_b, resume=True)
    assert any(not torch.equal(expected[n], v) for n, v in final_weights(restarted).items())


def test_epoch_end_checkpoint_resumes_at_next_epoch(store: Path, tmp_path: Path) -> None:
    params = tiny_params(store, "train.max_epochs=1", "train.ema.enabled=false", "train.final_weights=last")
    prepared = prepared_run(params, tmp_path)
    fit.train_model(params, prepared, tmp_path, resume=False)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS_PER_EPOCH
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches": 0, "epoch": None}]
    longer = tiny_params(store, "train.max_epochs=2", "train.ema.enabled=false", "train.final_weights=last")
    resumed = fit.train_model(longer, prepared, tmp_path, resume=True)
    assert resumed.metrics["train.steps"] == 2 * STEPS_PER_EPOCH
    assert (tmp_path / "model" / "run_info.json").is_file()


def test_resumable_loader_skips_delivered_batches_of_the_same_order() -> None:
    sampler = EpochShuffleSampler(10, seed=3)
    dataset = list(range(100, 110))
    loader = ResumableDataLoader(dataset, batch_size=3, sampler=sampler)
    sampler.set_epoch(4)
    full = [batch.tolist() for batch in loader]
    # 10 chips in threes: the one-chip remainder joins the last batch (BatchNorm needs two)
    assert sorted(i for batch in full for i in batch) == dataset and [len(b) for b in full] == [3, 3, 4]
    iterator = iter(loader)
    next(iterator)
    next(iterator)
    state = loader.state_dict()
    assert state == {"batches": 2, "epoch": 4}

    other_sampler = EpochShuffleSampler(10, seed=3)  # a fresh process: epoch 0 until the state says otherwise
    restored = ResumableDataLoader(dataset, batch_size=3, sampler=other_sampler)
    restored.load_state_dict(state)
    assert [batch.tolist() for batch in restored] == full[2:]
    assert [batch.tolist() for batch in restored] == full  # the skip applies to one iteration only
    assert restored.state_dict() == {"batches": 0, "epoch": None}  # a finished epoch resumes at the next one


def test_epoch_shuffle_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochShuffleSampler(50, seed=1), EpochShuffleSampler(50, seed=1)
    a.set_epoch(2)
    list(b)  # iterating an earlier epoch changes nothing
    b.set_epoch(2)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    callback = RngStateCallback()
    path = tmp_path / "state.pt"
    torch.save({"callbacks": {"RngStateCallback": callback.state_dict()}}, path)
    expected = (random.random(), np.random.rand(3), torch.rand(3), np.random.randn())
    loaded = torch.load(path, weights_only=True)["callbacks"]["RngStateCallback"]
    restored = RngStateCallback()
    restored.load_state_dict(loaded)
    random.random(), np.random.rand(5), torch.rand(5)  # draws that the restore must undo
    restored.on_train_start(None, None)  # type: ignore[arg-type]
    got = (random.random(), np.random.rand(3), torch.rand(3), np.random.randn())
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])
    assert got[3] == expected[3]


def test_restore_rng_state_rejects_foreign_state() -> None:
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"torch": torch.get_rng_state()})
    assert set(capture_rng_state()) >= {"python", "numpy", "torch"}

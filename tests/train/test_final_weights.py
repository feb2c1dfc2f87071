"""The final weights: every candidate scored on the validation split, the rule, and the bundle's record."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_demo_params

from workbench.data.loading import build_datamodule
from workbench.data.prepare import prepare_data
from workbench.run import RunLayout
from workbench.train.ema import save_state_dict
from workbench.train.final import FinalWeightsError, choose_final_weights, pick
from workbench.train.fit import build_task


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("final")
    params = tiny_demo_params(root / "store")
    prepared = prepare_data(params.data, root / "run")
    datamodule = build_datamodule(params, prepared)
    task = build_task(params, prepared, datamodule, root / "run")
    return params, prepared, datamodule, task, root / "run"


def constant(task, bias: float) -> dict[str, torch.Tensor]:
    """The task's weights with the output layer predicting `bias` everywhere (all water or none)."""
    state = {key: value.clone() for key, value in task.state_dict().items()}
    head = [key for key, value in state.items() if key.endswith("bias") and value.shape == (1,)][-1]
    weight = head[: -len("bias")] + "weight"
    state[weight].zero_()
    state[head].fill_(bias)
    return state


@pytest.mark.parametrize("good", ["ema", "swa"])
def test_the_candidate_best_on_validation_is_saved(prepared_run, good: str) -> None:
    params, prepared, datamodule, task, run_dir = prepared_run
    directory = RunLayout(run_dir).weight_candidates
    bad = "swa" if good == "ema" else "ema"
    save_state_dict(constant(task, 10.0), directory / f"{good}.pt")  # predicts water everywhere: IoU = share
    save_state_dict(constant(task, -10.0), directory / f"{bad}.pt")  # predicts nothing: IoU 0
    save_state_dict(constant(task, -10.0), directory / "soup.pt")
    final = choose_final_weights(params, task, datamodule, run_dir, None)
    assert final["weights"] == good and final["metric"] == "val/iou" and final["rule"] == "best_val"
    table = pd.read_csv(RunLayout(run_dir).diagnostic("train_final_weights.csv")).set_index("candidate")
    assert set(table.index) == {"ema", "swa", "soup"} and bool(table.loc[good, "chosen"])
    # all-water IoU is the validation split's share of positive valid pixels
    val = prepared.catalog[prepared.catalog["split"] == "val"]
    share = (val["positive_fraction"] * val["valid_fraction"]).sum() / val["valid_fraction"].sum()
    assert table.loc[good, "val_iou"] == pytest.approx(share, rel=1e-3)
    assert table.loc[bad, "val_iou"] == 0.0
    head = [k for k, v in task.state_dict().items() if k.endswith("bias") and v.shape == (1,)][-1]
    assert float(task.state_dict()[head]) == 10.0  # the task now holds the chosen weights
    assert not directory.exists()  # candidate files are removed once one is chosen


def test_rule_by_name_and_a_missing_candidate() -> None:
    table = pd.DataFrame({"candidate": ["best", "ema", "swa"], "score": [0.4, 0.7, 0.5]})
    assert pick(table, "best_val", "max") == "ema" and pick(table, "best_val", "min") == "best"
    assert pick(table, "swa", "max") == "swa"
    with pytest.raises(FinalWeightsError, match="soup"):
        pick(table, "soup", "max")


@pytest.mark.slow
def test_ema_swa_and_soup_are_all_candidates_and_the_bundle_says_which_it_holds(tmp_path: Path) -> None:
    from workbench.models.bundle import load_bundle
    from workbench.train.fit import train_model

    params = tiny_demo_params(
        tmp_path / "store",
        "train.max_epochs=2",
        "train.ema.enabled=true",
        "train.swa.enabled=true",
        "train.swa.start_fraction=0.5",
        "train.swa.soup_snapshots=2",
    )
    prepared = prepare_data(params.data, tmp_path / "run")
    result = train_model(params, prepared, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "model" / "run_info.json").read_text())
    final = info["final_weights"]
    assert {row["candidate"] for row in final["candidates"]} == {"best", "swa", "ema", "soup"}
    assert result.metrics["train.final_weights"] == final["weights"]
    scores = {row["candidate"]: row["score"] for row in final["candidates"]}
    assert scores[final["weights"]] == max(scores.values())
    bundle = load_bundle(tmp_path / "run" / "model")
    saved = bundle.model.state_dict()
    for key, value in result.task.model.state_dict().items():
        torch.testing.assert_close(saved[key], value.cpu())

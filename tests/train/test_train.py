"""Training engine: reproducibility, MLflow tracking, non-finite losses, callbacks, ranking metrics and the report."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_demo_params
from sklearn.metrics import average_precision_score
from torch import nn

from workbench.data.dataset import ChipDataset
from workbench.data.prepare import PreparedData, prepare_data
from workbench.figures import pick_gallery_chips, prediction_gallery
from workbench.params import EarlyStoppingConfig, Params, load_params
from workbench.train import fit
from workbench.train.callbacks import BackboneFreeze, GatedEarlyStopping
from workbench.train.card import sampler_composition, split_summary
from workbench.train.log import divergence_warnings, epoch_table
from workbench.train.task import PR_BINS, NonFiniteLossError, SegmentationTask

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train") / "store"


def tiny_params(store: Path, *extra: str) -> Params:
    return tiny_demo_params(store, *extra)


def train(params: Params, run_dir: Path) -> tuple[fit.TrainResult, PreparedData]:
    prepared = prepare_data(params.data, run_dir, seed=params.seed)
    return fit.train_model(params, prepared, run_dir, resume=False), prepared


# --------------------------------------------------------------------------- reproducibility and run info


def test_same_seed_same_weights_other_seed_other_weights(store: Path, tmp_path: Path) -> None:
    first, _ = train(tiny_params(store), tmp_path / "a")
    again, _ = train(tiny_params(store), tmp_path / "b")
    other, _ = train(tiny_params(store, "seed=7"), tmp_path / "c")
    weights = [r.task.model.state_dict() for r in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])

    info = json.loads((tmp_path / "a" / "model" / "run_info.json").read_text())
    assert info["params"]["seed"] == 42 and info["params"]["model"]["architecture"] == "satunet"
    assert info["versions"]["torch"] == metadata.version("torch")
    assert "git_commit" in info
    assert "train.last_val_pr_auc_200" in first.metrics  # the ranking metrics early stopping can monitor


# --------------------------------------------------------------------------- tracking


def test_mlflow_file_store_receives_the_run(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after the test
    monkeypatch.chdir(tmp_path)
    params = tiny_params(store, "train.tracking.uri=mlruns", "train.tracking.experiment=unit")
    result, _ = train(params, tmp_path / "run")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("unit")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "val/iou")
    assert len(history) == 1
    assert history[0].value == pytest.approx(result.metrics["train.last_val_iou"])
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 3  # one per step (24 chips / 8)
    assert (tmp_path / "run" / "logs" / "metrics.csv").is_file()  # CSV logs as well


# --------------------------------------------------------------------------- non-finite loss


def test_nan_input_stops_the_run_and_names_the_chips(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params(store)
    prepared = prepare_data(params.data, tmp_path, seed=params.seed)
    bad = int(np.flatnonzero(prepared.catalog["split"].to_numpy() == "train")[5])
    build = ChipDataset.build_sample

    def poisoned(self: ChipDataset, position: int, *arrays: np.ndarray) -> dict[str, Any]:
        sample = build(self, position, *arrays)
        if sample["index"] == bad:
            sample["image"][0, 3, 3] = float("nan")
        return sample

    monkeypatch.setattr(ChipDataset, "build_sample", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"nonfinite_batch\.json"):
        fit.train_model(params, prepared, tmp_path, resume=False)
    info = json.loads((tmp_path / "failures" / "nonfinite_batch.json").read_text())
    assert info["stage"] == "train" and bad in info["chip_index"]
    catalog_ids = prepared.catalog["chip_id"].astype(str).to_numpy()
    assert info["chip_id"] == [catalog_ids[i] for i in info["chip_index"]]
    assert info["nonfinite_input_chips"] == [bad]


# --------------------------------------------------------------------------- callbacks


def observe_all(cfg: EarlyStoppingConfig, values: list[float]) -> list[bool]:
    stopper = GatedEarlyStopping(cfg)
    return [stopper.observe(value, epoch) for epoch, value in enumerate(values)]


def test_gated_early_stopping_uses_moving_average_and_start_epoch() -> None:
    values = [0.5, 0.9, 0.2, 0.95]
    # window 2: averages .5, .7, .55, .575 -> two validations without beating .7; epoch 3 may stop
    assert observe_all(EarlyStoppingConfig(patience=2, window=2, start_epoch=3), values) == [False] * 3 + [True]
    # without the average, 0.95 is a new best
    assert observe_all(EarlyStoppingConfig(patience=2, window=1, start_epoch=3), values) == [False] * 4
    # patience is reached at epoch 2 already, but stopping is gated until epoch 3
    assert observe_all(EarlyStoppingConfig(patience=1, window=2, start_epoch=3), values) == [False] * 3 + [True]
    assert observe_all(EarlyStoppingConfig(patience=1, window=2, start_epoch=0), values) == [False, False, True, True]
    # mode min with min_delta: 0.99 is not a big enough improvement over 1.0
    cfg = EarlyStoppingConfig(mode="min", patience=1, min_delta=0.05)
    assert observe_all(cfg, [1.0, 0.99, 0.5]) == [False, True, False]


def test_gated_early_stopping_state_round_trip() -> None:
    cfg = EarlyStoppingConfig(patience=3, window=2)
    stopper = GatedEarlyStopping(cfg)
    for epoch, value in enumerate([0.3, 0.6, 0.4]):
        stopper.observe(value, epoch)
    copy = GatedEarlyStopping(cfg)
    copy.load_state_dict(stopper.state_dict())
    assert [copy.observe(0.1, 3), copy.observe(0.1, 4)] == [stopper.observe(0.1, 3), stopper.observe(0.1, 4)]


def test_backbone_freeze_keeps_encoder_frozen_for_n_epochs() -> None:
    module = nn.Module()
    module.model = nn.ModuleDict({"encoder": nn.Linear(2, 2), "decoder": nn.Linear(2, 1)})  # type: ignore[assignment]
    callback = BackboneFreeze(epochs=2, backbone_prefix="encoder")
    trainable = []
    for epoch in range(4):
        callback.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), module)  # type: ignore[arg-type]
        model = module.model
        trainable.append(
            (
                all(p.requires_grad for p in model["encoder"].parameters()),  # type: ignore[index]
                all(p.requires_grad for p in model["decoder"].parameters()),  # type: ignore[index]
            )
        )
    assert trainable == [(False, True), (False, True), (True, True), (True, True)]


# --------------------------------------------------------------------------- ranking metrics


def test_prevalence_pr_auc_matches_weighted_average_precision() -> None:
    from workbench.evaluate.metrics import per_chip_histograms

    rng = np.random.default_rng(0)
    n_chips, size = 12, 8
    label = np.zeros((n_chips, size, size), dtype=np.int64)
    label[:4, 2:5, 2:6] = 1  # chips 0-3 hold the target
    label[1, 0, 0] = 255
    bins = rng.integers(0, PR_BINS, size=label.shape) + 20 * (label == 1)
    prob = (np.minimum(bins, PR_BINS - 1) + 0.5) / PR_BINS  # bin centres: every bin holds one score value
    valid = np.ones_like(label, dtype=bool)
    valid[5, :, :2] = False
    pos, neg = per_chip_histograms(prob, label, valid, PR_BINS)
    task = SimpleNamespace(positive_threshold=0.0, prevalences=[200])
    scores = SegmentationTask.prevalence_pr_auc(task, pos, neg)  # type: ignore[arg-type]

    scored = valid & (label != 255)
    y, p = (label[scored] == 1).astype(int), prob[scored]
    chip = np.broadcast_to(np.arange(n_chips)[:, None, None], label.shape)[scored]
    assert scores["pr_auc"] == pytest.approx(average_precision_score(y, p))
    for ratio in (1, 200):
        weight = np.where(chip < 4, 1.0, ratio * 4 / 8)
        expected = average_precision_score(y, p, sample_weight=weight)
        assert scores[f"pr_auc_{ratio}"] == pytest.approx(expected, rel=1e-9)
    assert scores["pr_auc_200"] < scores["pr_auc_1"]


# --------------------------------------------------------------------------- report


def write_metrics_csv(
    path: Path, train_loss: list[float], val_loss: list[float], train_iou: float, val_iou: float
) -> Path:
    """A CSVLogger-like file: two step rows per epoch, then one validation row and one train-epoch row."""
    rows: list[dict[str, Any]] = []
    step = 0
    for epoch, (tl, vl) in enumerate(zip(train_loss, val_loss, strict=True)):
        for offset in (0.1, -0.1):
            rows.append({"epoch": epoch, "step": step, "train/loss": tl + offset})
            step += 1
        rows.append({"epoch": epoch, "step": step - 1, "val/loss": vl, "val/iou": val_iou})
        rows.append({"epoch": epoch, "step": step - 1, "train/iou": train_iou})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_divergence_warnings_on_hand_made_curves(tmp_path: Path) -> None:
    diverging = write_metrics_csv(tmp_path / "a.csv", [1.0, 0.8, 0.6, 0.5, 0.4], [0.9, 0.8, 0.85, 0.9, 1.0], 0.6, 0.5)
    warnings = divergence_warnings(diverging)
    assert len(warnings) == 1 and "divergence" in warnings[0] and "epoch 1 to 4" in warnings[0]

    healthy = write_metrics_csv(tmp_path / "b.csv", [1.0, 0.8, 0.6, 0.5, 0.4], [0.9, 0.8, 0.7, 0.65, 0.6], 0.6, 0.55)
    assert divergence_warnings(healthy) == []

    gap = write_metrics_csv(tmp_path / "c.csv", [1.0, 0.8], [0.9, 0.8], 0.95, 0.3)
    warnings = divergence_warnings(gap)
    assert len(warnings) == 1 and "IoU gap" in warnings[0] and "0.950" in warnings[0]

    # one run's validation loss rose from 0.54 to 1.52 with noise, so the last four epochs alone show no rise
    climbing = [0.9, 0.6, 0.54, 0.8, 0.7, 1.1, 0.9, 1.6, 1.3, 1.5, 1.52]
    falling = [1.0 - 0.08 * epoch for epoch in range(len(climbing))]
    warnings = divergence_warnings(write_metrics_csv(tmp_path / "e.csv", falling, climbing, 0.7, 0.5))
    assert len(warnings) == 1 and "lowest value at epoch 2" in warnings[0] and "0.54 -> 1.52" in warnings[0]

    noisy = write_metrics_csv(tmp_path / "d.csv", [1.0, 0.8, 0.6, 0.5], [0.9, 0.95, 0.9, 0.905], 0.6, 0.6)
    assert divergence_warnings(noisy) == []  # val loss 0.5 % above its low: below min_rise
    with pytest.raises(FileNotFoundError, match=r"metrics\.csv"):
        divergence_warnings(tmp_path / "missing.csv")


def test_epoch_table_keeps_the_last_value_of_a_step_and_averages_the_steps_of_an_epoch(tmp_path: Path) -> None:
    rows = [
        {"epoch": 0, "step": 0, "train/loss": 1.0},
        {"epoch": 0, "step": 1, "train/loss": 0.8},
        {"epoch": 0, "step": 1, "val/loss": 0.9, "val/iou": 0.4},
        {"epoch": 0, "step": 1, "val/loss": 0.7},  # re-logged at the same step: replaces 0.9
        {"epoch": 1, "step": 3, "train/loss": 0.6},
        {"epoch": None, "step": 4, "train/loss": 9.0},  # no epoch: dropped
    ]
    path = write_rows(tmp_path / "metrics.csv", rows)
    table = epoch_table(path)
    assert table.index.tolist() == [0, 1]
    np.testing.assert_allclose(table["train/loss"], [0.9, 0.6])
    np.testing.assert_allclose(table.loc[0, ["val/loss", "val/iou"]].to_numpy(dtype=float), [0.7, 0.4])
    assert np.isnan(table.loc[1, "val/loss"])


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def hand_catalog() -> pd.DataFrame:
    splits = ["train"] * 44 + ["val"] * 6
    fraction = [0.1] * 4 + [0.0] * 40 + [0.2, 0.0001, 0.0, 0.0, 0.0, 0.0]
    return pd.DataFrame({"chip_id": [f"c{i}" for i in range(50)], "split": splits, "positive_fraction": fraction})


def test_split_summary_counts_positive_chips_by_threshold() -> None:
    table = split_summary(hand_catalog(), positive_threshold=0.001).set_index("split")
    assert table.loc["train", "chips"] == 44 and table.loc["train", "positive_chips"] == 4
    assert table.loc["val", "positive_chips"] == 1  # 0.0001 is below the threshold
    assert table.loc["val", "mean_positive_fraction"] == pytest.approx(0.2001 / 6)


def test_sampler_composition_follows_the_curriculum() -> None:
    params = load_params(
        None,
        [
            "experiment=x",
            "train.max_epochs=5",
            "data.batch_size=8",
            "data.sampler.kind=curriculum",
            "data.sampler.curriculum=[{epoch: 0, negatives_per_positive: 1}, {epoch: 2, negatives_per_positive: 5},"
            " {epoch: 9, negatives_per_positive: 20}]",
        ],
    )
    table = sampler_composition(params, hand_catalog())
    assert table["from_epoch"].tolist() == [0, 2]  # the stage at epoch 9 is beyond max_epochs
    assert table["positive_draws"].tolist() == [4, 4]
    assert table["negative_draws"].tolist() == [4, 20]
    assert table["batches"].tolist() == [1, 3]
    random_kind = sampler_composition(load_params(None, ["experiment=x"]), hand_catalog())
    assert random_kind.loc[0, "chips_per_epoch"] == 44 and random_kind.loc[0, "distinct_chips"] == 44


def test_gallery_picks_labelled_chips_across_iou_then_false_alarms() -> None:
    per_chip = pd.DataFrame(
        {
            "store_index": [10, 11, 12, 13, 14, 15, 16],
            "label_pixels": [5, 5, 5, 5, 0, 0, 0],
            "predicted_pixels": [1, 2, 3, 4, 9, 0, 2],
            "iou": [0.9, 0.1, 0.5, 0.3, 0.0, np.nan, 0.0],
        }
    )
    chosen = pick_gallery_chips(per_chip, n=6)
    assert chosen[:4] == [11, 13, 12, 10]  # worst to best IoU
    assert chosen[4:] == [14, 16]  # then the chips without label, most predicted pixels first
    assert pick_gallery_chips(per_chip.iloc[:0], 6) == []


def test_prediction_gallery_has_three_panels_per_chip() -> None:
    rng = np.random.default_rng(1)
    chip = ("c0", rng.random((3, 16, 16)), (rng.random((16, 16)) > 0.7).astype(np.int64), np.ones((16, 16), bool))
    fig = prediction_gallery([(*chip, rng.random((16, 16)))] * 2, ["r", "g", "b"], ("r", "g", "b"))
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 6


def test_run_training_reports_tables_figures_and_keeps_metric_keys(store: Path, tmp_path: Path) -> None:
    from workbench.stages import run_training

    params = tiny_params(store, "data.sampler.kind=balanced")
    prepare_data(params.data, tmp_path, seed=params.seed)
    result = run_training(params, tmp_path)
    for key in ("val.iou", "test.iou", "train.steps", "train.n_warnings"):
        assert key in result.metrics
    assert set(result.figures) == {"training_curves", "val_predictions"}
    assert all(path.is_file() for path in result.figures.values())
    assert result.tables["sampler_composition"].loc[0, "sampler"] == "balanced"
    total = result.tables["model_parts"].iloc[-1]
    assert total["parameters"] == result.tables["param_groups"]["n_params"].sum()
    for name in ("split_summary", "sampler_composition", "model_parts", "param_groups", "warnings"):
        assert (tmp_path / "diagnostics" / f"train_{name}.csv").is_file()


def test_resume_refuses_checkpoint_with_other_bands_or_normalisation(tmp_path: Path) -> None:
    record = {"bands": ["B03", "B11"], "method": "zscore", "mean": [100.0, 200.0], "std": [10.0, 20.0]}
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"band_names": ["B03", "B11"], "normalization": record}}, checkpoint)
    fit.check_checkpoint_matches(checkpoint, ["B03", "B11"], dict(record))  # same data: accepted
    with pytest.raises(fit.CheckpointMismatch, match="B08"):
        fit.check_checkpoint_matches(checkpoint, ["B03", "B08"], dict(record, bands=["B03", "B08"]))
    shifted = dict(record, mean=[100.0, 250.0])
    with pytest.raises(fit.CheckpointMismatch, match=r"mean differs for bands \['B11'\]"):
        fit.check_checkpoint_matches(checkpoint, ["B03", "B11"], shifted)
    with pytest.raises(fit.CheckpointMismatch, match="'percentile'"):
        fit.check_checkpoint_matches(checkpoint, ["B03", "B11"], dict(record, method="percentile"))


def test_task_records_normalisation_for_resume_checks(tmp_path: Path, store: Path) -> None:
    params = tiny_params(store)
    prepared = prepare_data(params.data, tmp_path, seed=params.seed)
    record = fit.normalization_record(prepared.stats_path)
    assert record["bands"] == prepared.bands and len(record["mean"]) == len(prepared.bands)

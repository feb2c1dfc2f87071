"""The multiclass demo (lake / snow_ice / other) through all four notebooks with `workbench run`.

The per-class metrics of metrics.json are recomputed independently from the stored chip logits and the
store's labels with scikit-learn; the confusion figure, the per-class review table and its figures exist.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, jaccard_score, precision_score, recall_score

from workbench.cli import main
from workbench.data.store import open_store
from workbench.infer.chips import load_predictions
from workbench.run import NOTEBOOKS, TRAINING, RunLayout

PARAMS = Path(__file__).resolve().parents[2] / "params"
NAMES = ["other", "lake", "snow_ice"]


def _labels_and_logits(run_dir: Path, store: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Scored pixels' labels (P,) and logits (P, C) of a split, read straight from the store and the zarr."""
    predictions = load_predictions(run_dir, split)
    positions = predictions["chip_index"].values
    ds = open_store(store)
    label = ds["label"].values[positions]
    valid = ds["valid"].values[positions].astype(bool)
    logits = np.moveaxis(np.asarray(predictions["logit"].values, dtype=np.float64), 1, -1)  # (N, H, W, C)
    scored = valid & (label != 255)
    return label[scored].astype(np.int64), logits[scored]


def _sklearn_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    classes = list(range(len(NAMES)))
    out = {"overall_accuracy": accuracy_score(truth, pred)}
    for metric, function in (("iou", jaccard_score), ("f1", f1_score), ("precision", precision_score),
                             ("recall", recall_score)):  # fmt: skip
        values = function(truth, pred, labels=classes, average=None, zero_division=0)
        out.update({f"{metric}.{name}": float(v) for name, v in zip(NAMES, values)})
    present = [name for k, name in enumerate(NAMES) if (truth == k).any() or (pred == k).any()]
    for name in set(NAMES) - set(present):  # absent from label and prediction: undefined, not 0
        out.update({f"{metric}.{name}": float("nan") for metric in ("iou", "f1", "precision", "recall")})
    out["miou"] = float(np.mean([out[f"iou.{name}"] for name in present]))
    return out


def _assert_scores(metrics: dict, prefix: str, expected: dict[str, float]) -> None:
    for key, value in expected.items():
        got = metrics[f"{prefix}{key}"]
        if math.isnan(value):
            assert got is None or math.isnan(got), key
        else:
            assert got == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_multiclass_demo_runs_all_notebooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    store, reports = tmp_path / "store", tmp_path / "reports"
    code = main(["run", str(PARAMS / "demo_multiclass.yaml"), "--smoke", "--quiet", "--reports", str(reports),
                 "--set", f"data.store={store}"])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-3000:]
    run_dir = next((reports / "demo_multiclass").iterdir())
    layout = RunLayout(run_dir)
    run = json.loads(layout.info.read_text())
    assert run["status"] == "complete" and list(run["notebooks"]) == NOTEBOOKS
    metrics = json.loads((run_dir / "metrics.json").read_text())

    # training stage: argmax of the raw logits, scored by scikit-learn
    truth, logits = _labels_and_logits(run_dir, store, "test")
    trained = json.loads(layout.stage_metrics(TRAINING).read_text())
    _assert_scores(trained, "test.", _sklearn_scores(truth, np.argmax(logits, axis=-1)))

    # merged metrics: test.calibrated_* hold the calibrated decision, argmax of logits / T (T scalar or per class)
    calibration = json.loads(layout.calibration.read_text())
    assert calibration["decision"] == "argmax"
    temperature = np.asarray(calibration["temperature"], dtype=np.float64)
    decided = np.argmax(logits / temperature, axis=-1)
    expected = _sklearn_scores(truth, decided)
    _assert_scores(metrics, "test.calibrated_", expected)

    # the confusion table and figure
    for split, pred in (("test", np.argmax(logits, axis=-1)), ("test_calibrated", decided)):
        confusion = pd.read_csv(layout.confusion(split))
        counts = confusion.pivot_table(index="label", columns="predicted", values="count").reindex(NAMES)[NAMES]
        assert np.array_equal(counts.to_numpy(), confusion_matrix(truth, pred, labels=[0, 1, 2]))
    assert layout.figure("confusion_test").is_file() and layout.figure("reliability_classes").is_file()
    assert layout.figure("classes").is_file()

    # the review: per-class columns, a rank per chip, class-coloured figures of the top chips
    ranking = pd.read_parquet(layout.review_ranking)
    assert {f"disagree.{name}" for name in NAMES} <= set(ranking.columns)
    assert sorted(ranking["rank"]) == list(range(1, len(ranking) + 1))
    assert ranking["cleanlab_quality"].between(0, 1).all()
    assert len(list((layout.figures / "review").glob("*.png"))) == 2  # review.n_figures of the smoke profile
    assert 0 <= metrics["review.top_k_recall"] <= 1

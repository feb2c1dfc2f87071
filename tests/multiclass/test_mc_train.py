"""A softmax model trains end to end on a tiny three-class store (clear / cloud / shadow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_fakes

from workbench.data.dataset import target_from_label
from workbench.data.ingest import ingest
from workbench.data.prepare import prepare_data
from workbench.data.sources.npz import UKIS_MULTICLASS_MAP, UKIS_MULTICLASS_NAMES
from workbench.params import Params, load_params
from workbench.train import fit
from workbench.train.task import ClassCounts

fakes = load_fakes()


@pytest.fixture(scope="module")
def mc_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mc")
    for i in range(4):
        fakes.make_npz(root / "raw", name=f"scene{i}", size=64)
    ingest("ukis-csmask", root / "raw", root / "store", chip_size=32, progress=False, class_map=UKIS_MULTICLASS_MAP)
    return root / "store"


def mc_params(store: Path, *extra: str) -> Params:
    classes = ", ".join(
        f'{{name: {n}, color: "#{c}"}}' for n, c in zip(UKIS_MULTICLASS_NAMES, ["000000", "ffffff", "ff0000"])
    )
    return load_params(
        None,
        [
            "experiment=mc",
            "data.source=store",
            f"data.store={store}",
            "data.split.method=random",
            "data.split.train_percent=50",
            "data.split.val_percent=25",
            "data.batch_size=4",
            "model.architecture=satunet",
            "model.base_channels=8",
            "model.num_classes=3",
            f"model.classes=[{classes}]",
            "train.loss=[{name: ce, class_weights: frequency, label_smoothing: 0.05}, {name: dice}, {name: lovasz}]",
            "train.max_epochs=2",
            "train.progress_bar=false",
            "train.deterministic=true",
            *extra,
        ],
    )


def test_target_from_label_long_classes_and_refuses_unknown_class():
    label = torch.tensor([[0, 1, 2, 255]])
    assert target_from_label(label, 3).tolist() == [[0, 1, 2, 0]] and target_from_label(label, 3).dtype == torch.long
    assert target_from_label(label).tolist() == [[0.0, 1.0, 1.0, 0.0]]  # binary unchanged
    with pytest.raises(ValueError, match=r"label value\(s\) 3 \(2 px\).*num_classes=3.*class_map"):
        target_from_label(torch.tensor([[3, 3, 0]]), 3)


def test_class_counts_match_sklearn():
    from sklearn.metrics import confusion_matrix, jaccard_score

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 8, 8, generator=gen)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    mask = torch.rand(2, 8, 8, generator=gen) > 0.3
    counter = ClassCounts(["a", "b", "c"])
    counter.update(logits, target, mask)
    pred = logits.argmax(1)[mask].numpy()
    truth = target[mask].numpy()
    np.testing.assert_array_equal(counter.counts.numpy(), confusion_matrix(truth, pred, labels=[0, 1, 2]))
    scores = counter.compute()
    assert scores["miou"] == pytest.approx(jaccard_score(truth, pred, average="macro"))
    assert scores["iou"] == scores["miou"]
    assert scores["iou.b"] == pytest.approx(jaccard_score(truth, pred, labels=[1], average="macro"))


def test_softmax_training_logs_class_metrics_and_selects_by_miou(mc_store: Path, tmp_path: Path, one_thread):
    params = mc_params(mc_store, "train.early_stopping.enabled=true", "train.early_stopping.monitor=val/miou")
    prepared = prepare_data(params.data, tmp_path / "run", seed=params.seed)
    result = fit.train_model(params, prepared, tmp_path / "run", resume=False)
    metrics = result.metrics
    for key in ("val_miou", "val_miou_no_background", "val_overall_accuracy", "val_iou.clear", "val_iou.shadow"):
        assert f"train.last_{key}" in metrics, sorted(metrics)
    assert metrics["train.last_val_iou"] == metrics["train.last_val_miou"]
    assert 0.0 <= metrics["train.last_val_overall_accuracy"] <= 1.0
    assert metrics["train.final_weights"] in ("best", "last")
    assert any(k.endswith("_val_miou") and k.startswith("train.final_") for k in metrics)
    weights = result.task.criterion.terms[0]
    assert weights.class_weights == "frequency"
    logits = result.task(torch.zeros(1, 6, 32, 32))
    assert logits.shape == (1, 3, 32, 32)


def test_class_count_mismatch_with_checkpoint_and_bundle_names_both_and_the_file(
    mc_store: Path, tmp_path: Path, one_thread
):
    from workbench.models.bundle import load_bundle
    from workbench.run import RunLayout
    from workbench.train.fit import CheckpointMismatch

    params = mc_params(mc_store, "train.max_epochs=1")
    run = tmp_path / "run"
    prepared = prepare_data(params.data, run, seed=params.seed)
    fit.train_model(params, prepared, run, resume=False)
    bundle = load_bundle(RunLayout(run).model, num_classes=3)
    assert bundle.num_classes == 3 and [c.name for c in bundle.model_params.classes] == UKIS_MULTICLASS_NAMES
    with pytest.raises(ValueError, match=r"model\.pt holds a model with num_classes=3 but model\.num_classes=1"):
        load_bundle(RunLayout(run).model, num_classes=1)
    four = mc_params(mc_store, "model.num_classes=4", "model.classes=null")
    with pytest.raises(
        CheckpointMismatch, match=r"last\.ckpt holds a model with num_classes=3 but model\.num_classes=4"
    ):
        fit.train_model(four, prepared, run, resume=True)

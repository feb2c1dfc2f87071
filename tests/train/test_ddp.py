"""Two-process DDP on the CPU (gloo): both ranks end with the same weights and metrics pool every rank's chips."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from workbench.arrays import IGNORE_INDEX
from workbench.data.prepare import prepare_data
from workbench.data.store import ChipReader
from workbench.params import Params, load_params
from workbench.train import fit
from workbench.train.task import PixelCounts, SegmentationTask

ROOT = Path(__file__).resolve().parents[2]


class DumpPerRank(L.Callback):
    """Each process writes its final weights to `<directory>/weights-rank<r>.pt`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(pl_module.state_dict(), self.directory / f"weights-rank{trainer.global_rank}.pt")


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread."""


def two_process_params(tmp_path: Path, *extra: str) -> Params:
    """Demo parameters for a one-epoch run of a narrow SatUNet in two forked CPU processes."""
    return load_params(
        ROOT / "params" / "demo.yaml",
        [
            f"data.store={tmp_path / 'store'}",
            "data.synthetic.n_chips=48",
            "data.synthetic.chip_size=32",
            "data.batch_size=4",
            "model.architecture=satunet",
            "model.base_channels=8",
            "train.max_epochs=1",
            "train.progress_bar=false",
            "train.strategy=ddp_fork",
            "train.devices=2",
            *extra,
        ],
    )


def scored_pixels(store: Path, positions: np.ndarray) -> int:
    """Valid, labelled pixels of the chips at `positions`, read straight from the store."""
    labels, valids = ChipReader(store, "label"), ChipReader(store, "valid")
    return sum(int((valids.read(i).astype(bool) & (labels.read(i) != IGNORE_INDEX)).sum()) for i in positions)


def test_two_process_ddp_on_cpu_agrees_and_pools_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = two_process_params(tmp_path, "data.sampler.kind=balanced")
    run_dir = tmp_path / "run"
    prepared = prepare_data(params.data, run_dir, seed=params.seed)
    val = np.flatnonzero(prepared.catalog["split"].to_numpy() == "val")
    assert len(val) % 2 == 0  # no padding chips: each val chip is scored exactly once
    seen = tmp_path / "seen"
    seen.mkdir()

    # spies, inherited by the forked processes: what each rank's metrics were computed from
    compute, pr_auc = PixelCounts.compute, SegmentationTask.prevalence_pr_auc

    def spy_compute(self: PixelCounts) -> dict[str, float]:
        if torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
            (seen / f"counts-rank{rank}-{id(self)}.json").write_text(json.dumps(self.counts.tolist()))
        return compute(self)

    def spy_pr_auc(self: SegmentationTask, pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
        info = {"chips": len(pos), "pixels": int(pos.sum() + neg.sum())}
        (seen / f"histograms-rank{self.global_rank}.json").write_text(json.dumps(info))
        return pr_auc(self, pos, neg)

    monkeypatch.setattr(PixelCounts, "compute", spy_compute)
    monkeypatch.setattr(SegmentationTask, "prevalence_pr_auc", spy_pr_auc)
    original = fit.build_callbacks
    monkeypatch.setattr(fit, "build_callbacks", lambda *a: [*original(*a), DumpPerRank(tmp_path)])

    fit.train_model(params, prepared, run_dir, resume=False)

    rank0 = torch.load(tmp_path / "weights-rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights-rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    initial = SegmentationTask(
        model_params=params.model.model_dump(mode="json"),
        train_params=params.train.model_dump(mode="json"),
        in_channels=len(prepared.bands),
        band_names=prepared.bands,
        modalities=["x"] * len(prepared.bands),
    ).state_dict()
    assert any(not torch.equal(initial[k], rank0[k]) for k in initial if k.startswith("model."))  # it trained

    expected_pixels = scored_pixels(prepared.store, val)
    for rank in (0, 1):
        info = json.loads((seen / f"histograms-rank{rank}.json").read_text())
        assert info == {"chips": len(val), "pixels": expected_pixels}
    val_counts = [json.loads(p.read_text()) for p in seen.glob("counts-rank*.json")]
    pooled = [counts for counts in val_counts if sum(counts) == expected_pixels]
    assert len(pooled) >= 2  # the validation counts of both ranks cover every val pixel once
    metrics = json.loads((run_dir / "metrics" / "train.json").read_text())
    assert 0.0 <= metrics["train.last_val_pr_auc"] <= 1.0
    assert (run_dir / "model" / "model.pt").is_file()


def test_ddp_on_cpu_uses_gloo_and_finds_unused_parameters_when_needed() -> None:
    base = ["experiment=x", "train.strategy=ddp", "train.accelerator=cpu"]
    strategy = fit.build_strategy(load_params(None, base))
    assert strategy.process_group_backend == "gloo"
    assert strategy._ddp_kwargs.get("find_unused_parameters") is False
    shallow = fit.build_strategy(load_params(None, [*base, "model.encoder_depth=3"]))
    assert shallow._ddp_kwargs["find_unused_parameters"] is True
    frozen = fit.build_strategy(load_params(None, [*base, "train.optimizer.freeze_backbone_epochs=2"]))
    assert frozen._ddp_kwargs["find_unused_parameters"] is True
    assert fit.build_strategy(load_params(None, ["experiment=x"])) == "auto"


def test_nonfinite_loss_on_one_rank_stops_every_rank_at_the_same_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workbench.data.dataset import ChipDataset

    params = two_process_params(tmp_path, "data.sampler.kind=random")
    run_dir = tmp_path / "run"
    prepared = prepare_data(params.data, run_dir, seed=params.seed)
    bad = int(np.flatnonzero(prepared.catalog["split"].to_numpy() == "train")[3])
    build = ChipDataset.build_sample

    def poisoned(self: ChipDataset, position: int, *arrays: np.ndarray) -> dict[str, object]:
        sample = build(self, position, *arrays)
        if sample["index"] == bad:
            sample["image"][0, 3, 3] = float("nan")
        return sample

    monkeypatch.setattr(ChipDataset, "build_sample", poisoned)  # inherited by the forked processes
    with pytest.raises(Exception, match="loss"):
        fit.train_model(params, prepared, run_dir, resume=False)
    records = [json.loads(path.read_text()) for path in sorted((run_dir / "failures").glob("nonfinite_batch*.json"))]
    assert len(records) == 2  # both processes stopped and recorded their batch
    poisoned_records = [record for record in records if bad in record["chip_index"]]
    clean_records = [record for record in records if bad not in record["chip_index"]]
    assert len(poisoned_records) == 1 and len(clean_records) == 1
    assert poisoned_records[0]["nonfinite_input_chips"] == [bad]
    assert np.isfinite(float(clean_records[0]["loss"])) and not np.isfinite(float(poisoned_records[0]["loss"]))
    assert poisoned_records[0]["step"] == clean_records[0]["step"]


class DumpEMATargets(L.Callback):
    """At train end, in the training process: the raw weights and the weights the EMA says the run keeps."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from workbench.train.ema import EMACallback

        if not trainer.is_global_zero:
            return
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMACallback)).ema  # type: ignore[attr-defined]
        raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        kept = dict(raw)
        kept.update({k: v.clone() for k, v in [*ema.shadow.items(), *ema.buffers.items()]})
        torch.save({"raw": raw, "kept": kept}, self.directory / "ema-targets.pt")


def test_ddp_fork_returns_and_saves_the_ema_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = two_process_params(tmp_path, "train.ema.enabled=true", "train.ema.decay=0.5")
    run_dir = tmp_path / "run"
    prepared = prepare_data(params.data, run_dir, seed=params.seed)
    original = fit.build_callbacks
    monkeypatch.setattr(fit, "build_callbacks", lambda *a: [*original(*a), DumpEMATargets(tmp_path)])
    trained = fit.train_model(params, prepared, run_dir, resume=False)

    targets = torch.load(tmp_path / "ema-targets.pt", weights_only=True)
    returned = trained.task.state_dict()  # what the main process got back from the training processes
    params_names = [name for name, _ in trained.task.named_parameters()]
    assert any(not torch.equal(targets["raw"][k], targets["kept"][k]) for k in params_names)  # EMA differs
    assert all(torch.equal(returned[k].float(), targets["kept"][k].float()) for k in params_names)
    from workbench.models.bundle import load_bundle

    bundle = load_bundle(run_dir / "model")
    for name, value in bundle.model.state_dict().items():
        assert torch.equal(value.float(), targets["kept"][f"model.{name}"].float())

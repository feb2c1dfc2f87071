"""EMA shadow weights, the Lightning callbacks, snapshots and the uniform soup."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workbench.params import SwaConfig
from workbench.train.ema import (
    EMA,
    EMACallback,
    SnapshotCallback,
    build_snapshot_callback,
    build_swa_callback,
    ema_weights_from_checkpoint,
    load_snapshots,
    snapshot_epochs,
    soup_from_directory,
    uniform_soup,
)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


@torch.no_grad()
def _perturb(model: nn.Module, scale: float = 0.1) -> None:
    for param in model.parameters():
        param.add_(torch.randn_like(param) * scale)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ema_closed_form_on_scalar() -> None:
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor(0.0))
    decay = 0.9
    values = [1.0, 3.0, -2.0, 0.5, 4.0]
    ema = EMA(model, decay=decay)
    for value in values:
        with torch.no_grad():
            model.w.fill_(value)
        ema.update()
    # s_1 = w_1, s_n = d s_{n-1} + (1 - d) w_n  =>  d^(n-1) w_1 + sum_{k>=2} (1 - d) d^(n-k) w_k
    n = len(values)
    expected = decay ** (n - 1) * values[0] + sum(
        (1 - decay) * decay ** (n - k) * values[k - 1] for k in range(2, n + 1)
    )
    assert ema.shadow["w"].item() == pytest.approx(expected, rel=1e-6)
    assert ema.shadow["w"].dtype == torch.float32 and ema.shadow["w"].device.type == "cpu"
    assert ema.num_updates == n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_restores_live_weights_bit_exactly(dtype: torch.dtype) -> None:
    model = _net().to(dtype)
    model.train()
    ema = EMA(model, decay=0.7)
    for _ in range(4):
        _perturb(model)
        model(torch.randn(8, 3, dtype=dtype))  # moves BatchNorm statistics
        ema.update()
    _perturb(model)
    live = _snapshot(model)
    with ema.swapped_in() as swapped:
        assert swapped is model
        for name, param in model.named_parameters():
            assert torch.equal(param.detach(), ema.shadow[name].to(dtype))
            assert not torch.equal(param.detach(), live[name])
    for name, value in model.state_dict().items():
        assert torch.equal(value, live[name]), name


def test_swap_restores_after_an_exception() -> None:
    model = _net(1)
    ema = EMA(model, decay=0.5)
    ema.update()
    _perturb(model)
    live = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in():
        raise RuntimeError("boom")
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_ema_is_lazy_and_tracks_newly_trainable_parameters() -> None:
    model = _net(2)
    ema = EMA(model)
    live = _snapshot(model)
    with ema.swapped_in():  # nothing to swap before the first update
        assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    first, last = model.get_parameter("0.weight"), model.get_parameter("2.weight")
    first.requires_grad_(False)
    ema.update()
    assert "0.weight" not in ema.shadow and "2.weight" in ema.shadow
    assert torch.equal(ema.shadow["2.weight"], last.detach())  # first update copies
    first.requires_grad_(True)
    ema.update()
    assert torch.equal(ema.shadow["0.weight"], first.detach())


def test_ema_state_dict_round_trip_with_weights_only() -> None:
    model = _net(3)
    ema = EMA(model, decay=0.8)
    for _ in range(3):
        _perturb(model)
        ema.update()
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.decay == 0.8 and restored.num_updates == 3
    assert all(torch.equal(restored.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(ValueError, match="lacks"):
        restored.load_state_dict({"decay": 0.9})


def test_uniform_soup_is_the_mean() -> None:
    dicts = [
        {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5, dtype=torch.float64), "n": torch.tensor(3)},
        {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(1.5, dtype=torch.float64), "n": torch.tensor(7)},
        {"w": torch.tensor([2.0, -2.0]), "b": torch.tensor(4.0, dtype=torch.float64), "n": torch.tensor(9)},
    ]
    soup = uniform_soup(dicts)
    assert torch.allclose(soup["w"], torch.tensor([2.0, 2.0]))
    assert soup["b"].item() == pytest.approx(2.0) and soup["b"].dtype == torch.float64
    assert soup["n"].item() == 3 and soup["n"].dtype == torch.int64
    with pytest.raises(ValueError, match="'w'"):
        uniform_soup([dicts[0], {"b": dicts[1]["b"], "n": dicts[1]["n"]}])
    with pytest.raises(ValueError, match="at least one"):
        uniform_soup([])


def test_snapshot_epochs_and_builders(tmp_path: Path) -> None:
    assert snapshot_epochs(4, 0, 10) == [0, 3, 6, 9]
    assert snapshot_epochs(10, 7, 9) == [7, 8]
    assert build_snapshot_callback(SwaConfig(soup_snapshots=0), 30, tmp_path) is None
    callback = build_snapshot_callback(SwaConfig(soup_snapshots=5, start_fraction=0.4), 30, tmp_path)
    assert callback is not None and callback.epochs is not None
    # 0.4 of 30 epochs: Lightning's SWA starts at 0-based epoch 11; the last snapshot is the last epoch
    assert len(callback.epochs) == 5 and callback.epochs[0] == 11 and callback.epochs[-1] == 29
    assert build_swa_callback(SwaConfig(enabled=False), 10) is None
    swa = build_swa_callback(SwaConfig(enabled=True, lr=2e-5, start_fraction=0.4, anneal_epochs=2), 10)
    assert isinstance(swa, StochasticWeightAveraging)
    assert swa._swa_lrs == 2e-5 and swa._annealing_epochs == 2 and swa._swa_epoch_start == 0.4
    with pytest.raises(ValueError, match="exactly one"):
        SnapshotCallback(tmp_path)


# --------------------------------------------------------------------------- Lightning integration


class _Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.validation_weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.validation_weights.append(self.net.weight.detach().clone())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


def test_callbacks_in_a_lightning_run(tmp_path: Path) -> None:
    ema_callback = EMACallback(decay=0.5)
    snapshots = SnapshotCallback(tmp_path / "snapshots", every_n_epochs=2, start_epoch=1)
    module = _Regressor()
    trainer = L.Trainer(
        max_epochs=4,
        accumulate_grad_batches=2,
        callbacks=[ema_callback, snapshots],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, _loader(), _loader())
    # 4 batches per epoch, accumulation 2: two optimiser steps per epoch, one EMA update each
    assert trainer.global_step == 8 and ema_callback.ema.num_updates == 8
    # validation saw the EMA weights of that moment; training ends with the live weights back
    assert len(module.validation_weights) == 16
    assert torch.equal(module.validation_weights[-1], ema_callback.ema.shadow["net.weight"])
    assert not torch.equal(module.net.weight.detach(), ema_callback.ema.shadow["net.weight"])
    # snapshots at 0-based epochs 1 and 3, loadable with weights_only=True, and a soup of them
    files = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert files == ["snapshot-epoch001.pt", "snapshot-epoch003.pt"]
    loaded = load_snapshots(tmp_path / "snapshots")
    assert torch.equal(loaded[1]["net.weight"], module.net.weight.detach())
    soup = soup_from_directory(tmp_path / "snapshots")
    assert torch.allclose(soup["net.weight"], (loaded[0]["net.weight"] + loaded[1]["net.weight"]) / 2)
    # the checkpoint keeps the live weights and carries the EMA state
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["net.weight"], module.net.weight.detach())
    averaged = ema_weights_from_checkpoint(checkpoint)
    assert averaged is not None and torch.equal(averaged["net.weight"], ema_callback.ema.shadow["net.weight"])
    resumed = EMACallback(decay=0.9)
    resumed.load_state_dict(checkpoint["callbacks"][ema_callback.state_key])
    assert resumed.ema.decay == 0.5 and resumed.ema.num_updates == 8

"""Fault injection on the project's writes: a kill -9 in the middle of a checkpoint save, an error half-way
through a write, and a full disk (a small tmpfs; needs root, skipped otherwise) for checkpoints, notebooks,
JSON and `predict` outputs. Each asserts that the previous file still loads and that no corrupt file
carries a final name."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from reliability_helpers import first_channel, is_root, small_tmpfs, tiny_bundle, tiny_raster

from workbench.io import (
    TEMP_MARK,
    AtomicNotebookHandler,
    InsufficientSpaceError,
    atomic_notebook_target,
    sweep_leftovers,
    write_json_atomic,
)
from workbench.train.checkpoint_io import AtomicCheckpointIO, CheckpointReadError, load_checkpoint_file

ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(not is_root(), reason="a tmpfs for the full-disk case needs root")


def checkpoint(value: float, numel: int = 1000) -> dict[str, object]:
    return {"state_dict": {"w": torch.full((numel,), value)}, "global_step": int(value), "epoch": 0}


def final_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TEMP_MARK not in p.name)


# --------------------------------------------------------------------------- kill -9 during a checkpoint save

CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from workbench.train import checkpoint_io

    real_save = torch.save

    def slow_save(obj, handle):  # write the first half, say so, then hang until killed
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        print("HALF", flush=True)
        time.sleep(60)
        handle.write(data[len(data) // 2 :])

    checkpoint_io.torch.save = slow_save
    io_ = checkpoint_io.AtomicCheckpointIO()
    io_.save_checkpoint({"state_dict": {"w": torch.full((200_000,), 2.0)}, "global_step": 2}, sys.argv[1])
    """
)


@pytest.mark.slow  # the child process imports Lightning (10-30 s on two busy cores)
def test_kill_9_during_checkpoint_save_keeps_the_previous_last_ckpt(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), last)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(last)], stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "HALF"  # the new checkpoint is half written
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)

    assert final_names(last.parent) == ["last.ckpt"]  # no corrupt file under a final name
    state = load_checkpoint_file(last)  # the previous checkpoint is intact
    assert state["global_step"] == 1 and torch.equal(state["state_dict"]["w"], torch.full((1000,), 1.0))
    leftovers = [p for p in last.parent.iterdir() if TEMP_MARK in p.name]
    assert len(leftovers) == 1 and f"-{child.pid}-" in leftovers[0].name  # the half file, named by its writer
    found = sweep_leftovers(last.parent)  # the next run removes it: its writer is dead
    assert found.removed == leftovers and not leftovers[0].exists()
    AtomicCheckpointIO().save_checkpoint(checkpoint(3.0), last)  # and saving works again
    assert load_checkpoint_file(last)["global_step"] == 3


def test_error_half_way_through_a_checkpoint_save_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), last)

    def failing_save(obj: object, handle: object) -> None:
        handle.write(b"PK\x03\x04 half a zip")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("workbench.train.checkpoint_io.torch.save", failing_save)
    with pytest.raises(InsufficientSpaceError, match=r"filled up while writing last\.ckpt"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(2.0), last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left either
    assert load_checkpoint_file(last)["global_step"] == 1


def test_truncated_checkpoint_names_the_file_and_the_fix(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), last)
    last.write_bytes(last.read_bytes()[:300])
    with pytest.raises(CheckpointReadError, match=r"last\.ckpt cannot be read.*truncated or corrupt.*Delete it"):
        AtomicCheckpointIO().load_checkpoint(last)
    last.write_bytes(b"")
    with pytest.raises(CheckpointReadError, match=r"is empty \(0 bytes"):
        load_checkpoint_file(last)


def test_the_trainer_writes_checkpoints_through_the_atomic_checkpoint_io(tmp_path: Path) -> None:
    from conftest import tiny_demo_params

    from workbench.train.fit import build_trainer

    trainer = build_trainer(tiny_demo_params(tmp_path / "store"), tmp_path, [], [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# --------------------------------------------------------------------------- full disk (tmpfs)


@needs_root
def test_full_disk_checkpoint_save_is_refused_and_the_previous_one_loads(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "3m") as disk:
        last = disk / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint(checkpoint(1.0, numel=100_000), last)  # 400 kB
        with pytest.raises(InsufficientSpaceError, match=r"not enough free space in .* checkpoint last\.ckpt"):
            AtomicCheckpointIO().save_checkpoint(checkpoint(2.0, numel=2_000_000), last)  # 8 MB
        assert final_names(disk) == ["last.ckpt"] and not [p for p in disk.iterdir() if TEMP_MARK in p.name]
        assert load_checkpoint_file(last)["global_step"] == 1


@needs_root
def test_disk_filling_up_during_a_checkpoint_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with small_tmpfs(tmp_path, "3m") as disk:
        last = disk / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint(checkpoint(1.0, numel=100_000), last)
        monkeypatch.setattr("workbench.train.checkpoint_io.ensure_free_space", lambda *a, **k: None)  # no pre-check
        with pytest.raises(InsufficientSpaceError, match=r"filled up while writing last\.ckpt"):
            AtomicCheckpointIO().save_checkpoint(checkpoint(2.0, numel=2_000_000), last)
        assert sorted(p.name for p in disk.iterdir()) == ["last.ckpt"]
        assert load_checkpoint_file(last)["global_step"] == 1


@needs_root
def test_full_disk_json_and_notebook_writes_keep_the_previous_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbformat

    with small_tmpfs(tmp_path, "1m") as disk:
        metrics = write_json_atomic(disk / "metrics.json", {"test.iou": 0.5})
        notebook = disk / "02_train.ipynb"
        cell = nbformat.v4.new_code_cell("x = 1")
        handler = AtomicNotebookHandler()
        target = atomic_notebook_target(notebook)
        handler.write(nbformat.writes(nbformat.v4.new_notebook(cells=[cell])), target)
        big = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("x" * 1_500_000)])
        with pytest.raises(InsufficientSpaceError, match=r"02_train\.ipynb"):
            handler.write(nbformat.writes(big), target)
        with pytest.raises(InsufficientSpaceError, match=r"metrics\.json"):
            write_json_atomic(disk / "metrics.json", {"values": "x" * 1_500_000})
        # the pre-check bypassed: the disk fills during the write itself
        monkeypatch.setattr("workbench.io.ensure_free_space", lambda *a, **k: None)
        with pytest.raises(InsufficientSpaceError, match=r"filled up while writing 02_train\.ipynb"):
            handler.write(nbformat.writes(big), target)
        assert final_names(disk) == ["02_train.ipynb", "metrics.json"]
        assert not [p for p in disk.iterdir() if TEMP_MARK in p.name]
        assert json.loads(metrics.read_text()) == {"test.iou": 0.5}
        assert nbformat.read(notebook, as_version=4).cells[0].source == "x = 1"


@needs_root
def test_full_disk_predict_keeps_the_previous_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.infer import predict_raster

    model = tiny_bundle(tmp_path / "model")
    options = {"window": 32, "stride": 16, "progress": False, "build_model": first_channel}
    with small_tmpfs(tmp_path, "2m") as disk:
        first = predict_raster(model, tiny_raster(tmp_path / "small.tif", 64, 64), disk, **options)  # type: ignore[arg-type]
        with rasterio.open(first.mask) as src:
            before = src.read(1)
        assert before[:, :32].all() and not before[:, 32:].any()  # left half positive
        big = tiny_raster(tmp_path / "big.tif", 1024, 1024)  # 5 MB of uncompressed output
        with pytest.raises(InsufficientSpaceError, match=r"not enough free space .* probability\.tif"):
            predict_raster(model, big, disk, **options)  # type: ignore[arg-type]
        # without the pre-check GDAL fails or swallows the failure: either way nothing unreadable is renamed
        monkeypatch.setattr("workbench.infer.raster.ensure_free_space", lambda *a, **k: None)
        noise = np.random.default_rng(0).normal(size=(2, 1024, 1024)).astype(np.float32)  # compresses badly
        with rasterio.open(big, "r+") as dst:
            dst.write(noise)
        with pytest.raises((OSError, rasterio.errors.RasterioError)):
            predict_raster(model, big, disk, **options)  # type: ignore[arg-type]
        assert final_names(disk) == ["mask.tif", "polygons.geojson", "probability.tif"]
        assert not [p for p in disk.iterdir() if TEMP_MARK in p.name]
        with rasterio.open(first.mask) as src:
            assert np.array_equal(src.read(1), before)
        with rasterio.open(first.probability) as src:
            assert src.shape == (64, 64)

"""Free space is checked before the large Zarr writes (a store's chips at ingest, a split's logits): a write
that would not fit is refused with the folder, the sizes and the fix, before anything is written, and the
previous version of the output is kept. The free-space probe is replaced to simulate a full disk; the
tmpfs case (a real full disk) needs root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import is_root, small_tmpfs, tiny_store

from workbench.data.store import read_catalog
from workbench.infer.chips import load_predictions, save_predictions
from workbench.io import TEMP_MARK, InsufficientSpaceError

needs_root = pytest.mark.skipif(not is_root(), reason="a tmpfs for the full-disk case needs root")


def no_free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> list[Path]:
    """Make the free-space probe report `free` bytes; returns the folders it was asked about."""
    asked: list[Path] = []

    def probe(directory: Path) -> int:
        asked.append(Path(directory))
        return free

    monkeypatch.setattr("workbench.io.free_bytes", probe)
    return asked


def test_an_ingest_that_would_not_fit_is_refused_before_writing_chips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_store(tmp_path / "kept.zarr", size=64)  # a store written before the disk filled
    asked = no_free_space(monkeypatch, 100_000)
    # 8 chips x (4 bands x 64 x 64 x 4 B + 64 x 64 label + 64 x 64 valid) = 589,824 B = 0.6 MiB
    with pytest.raises(
        InsufficientSpaceError,
        match=rf"not enough free space in {tmp_path} to write 8 chips of the store new\.zarr \(uncompressed\): "
        r"it needs about 0\.6 MiB .* only 0\.1 MiB are free; free some space or write elsewhere",
    ):
        tiny_store(tmp_path / "new.zarr", size=64)
    assert asked == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.zarr"]  # no store, no .partial folder
    assert len(read_catalog(tmp_path / "kept.zarr")) == 8


def test_predictions_that_would_not_fit_keep_the_previous_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logits = np.full((8, 32, 32), 1.5, np.float16)
    save_predictions(tmp_path, "test", np.arange(8), logits)
    no_free_space(monkeypatch, 10_000)
    # 8 x 32 x 32 float16 logits + 8 int64 indices = 16,448 B
    with pytest.raises(InsufficientSpaceError, match=r"the logits of 8 chips \(test\.zarr\): it needs about 0\.0 MiB"):
        save_predictions(tmp_path, "test", np.arange(8), np.zeros((8, 32, 32), np.float16))
    kept = load_predictions(tmp_path, "test")
    assert float(kept["logit"].min()) == float(kept["logit"].max()) == 1.5
    assert not [p for p in (tmp_path / "predictions").iterdir() if TEMP_MARK in p.name]


def test_the_probe_is_asked_for_the_exact_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needed: list[int] = []
    monkeypatch.setattr("workbench.infer.chips.ensure_free_space", lambda d, n, what: needed.append(n))
    save_predictions(tmp_path, "val", np.arange(8), np.zeros((8, 32, 32), np.float16))
    assert needed == [8 * 32 * 32 * 2 + 8 * 8]


@needs_root
def test_an_ingest_onto_a_full_disk_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "1m") as disk:
        tiny_store(disk / "small.zarr", size=16)  # about 40 kB
        with pytest.raises(InsufficientSpaceError, match=r"store big\.zarr"):
            tiny_store(disk / "big.zarr", size=128)  # 8 chips x 4 bands x 128 x 128 x 4 B = 2 MiB
        assert sorted(p.name for p in disk.iterdir()) == ["small.zarr"]
        assert len(read_catalog(disk / "small.zarr")) == 8

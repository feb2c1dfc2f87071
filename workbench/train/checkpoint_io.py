"""Crash- and disk-full-safe checkpoint files for Lightning.

Lightning's default `TorchCheckpointIO` writes through fsspec, whose local "transaction" writes a
temporary file in the system temp folder and moves it into place: with the reports on another file
system the move is a copy, so a kill or a full disk during it leaves a 0-byte or truncated
`last.ckpt` (and the temporary file behind). `AtomicCheckpointIO` writes the checkpoint to a
temporary file in the checkpoint's own folder, fsyncs it and renames it over the final name, so
the previous `last.ckpt` stays intact until the new one is complete; free space is checked before
writing, and an unreadable checkpoint is reported with its name and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from workbench.io import atomic_path, ensure_free_space, sweep_leftovers


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read (truncated or corrupt); the message names it and the fix."""


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors inside a (nested) checkpoint dict: an estimate of its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load(path, weights_only=True)` with an error that names a truncated or corrupt file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointReadError(
            f"checkpoint {path} is empty (0 bytes; an interrupted write); delete it to train from the start or "
            "resume from another checkpoint in the same folder"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CheckpointReadError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); it is truncated or corrupt. "
            "Delete it to train from the start or resume from another checkpoint in the same folder"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointReadError(f"checkpoint {path} holds {type(state).__name__}, not a Lightning checkpoint dict")
    return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO writing temp file -> fsync -> rename in the checkpoint's folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(path.parent, only=path.name)
        ensure_free_space(path.parent, tensor_bytes(checkpoint), f"checkpoint {path.name}")
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("checkpoints are loaded with weights_only=True only (no pickled code is executed)")
        return load_checkpoint_file(path, map_location=map_location or "cpu")

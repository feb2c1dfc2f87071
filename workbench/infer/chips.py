"""Chip-level inference: the logits of every chip of a split, predicted once and stored.

Logits of every chip of a split are written once to `<run_dir>/predictions/<split>.zarr`
(float16, chunked per chip); calibration, evaluation and review read them from there, so a
model runs over the data a single time per run. The variable `logit` has dims (chip, y, x) for a
binary model (one logit) and (chip, class, y, x) for a softmax model of C >= 2 classes, whose
attrs carry `num_classes`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from workbench.data.dataset import ChipDataset
from workbench.infer.tta import predict_with_tta
from workbench.io import atomic_directory
from workbench.run import TRAINING, RunLayout


@torch.no_grad()
def iter_chip_logits(
    model: nn.Module,
    dataset: ChipDataset,
    batch_size: int = 16,
    tta: str = "none",
    device: str = "cpu",
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (store indices, logits) batch by batch, with test-time augmentation.

    Logits are (B, H, W) for a binary model (one output channel) and (B, C, H, W) for C >= 2 classes.
    """
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        logits = predict_with_tta(model, batch["image"].to(device), tta)
        out = logits[:, 0] if logits.shape[1] == 1 else logits
        yield batch["index"].numpy(), out.float().cpu().numpy()


def collect_logits(
    model: nn.Module,
    dataset: ChipDataset,
    batch_size: int = 16,
    tta: str = "none",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Store indices (n,) and float16 logits (n, H, W) or (n, C, H, W) of every chip of `dataset`."""
    indices: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    for batch_indices, batch_logits in iter_chip_logits(model, dataset, batch_size, tta, device):
        indices.append(batch_indices)
        logits.append(batch_logits.astype(np.float16))
    return np.concatenate(indices), np.concatenate(logits)


def save_predictions(
    run_dir: Path, name: str, indices: np.ndarray, logits: np.ndarray, attrs: dict[str, Any] | None = None
) -> Path:
    """Write logits (chunked per chip) to `<run_dir>/predictions/<name>.zarr` atomically.

    (n, H, W) logits are a binary model's; (n, C, H, W) a softmax model's (attrs `num_classes` = C).
    """
    values = np.asarray(logits, dtype=np.float16)
    attrs = dict(attrs or {})
    if values.ndim == 3:
        dims: tuple[str, ...] = ("chip", "y", "x")
    elif values.ndim == 4:
        dims = ("chip", "class", "y", "x")
        attrs["num_classes"] = int(values.shape[1])
    else:
        raise ValueError(f"logits must be (chip, y, x) or (chip, class, y, x), got shape {values.shape}")
    ds = xr.Dataset(
        {"logit": (dims, values)},
        coords={"chip_index": ("chip", np.asarray(indices))},
        attrs=attrs,
    )
    dest = RunLayout(run_dir).predictions(name)
    with atomic_directory(dest, overwrite=True) as tmp:
        encoding = {"logit": {"chunks": (1, *ds["logit"].shape[1:])}}  # one chunk per chip
        ds.to_zarr(tmp, mode="w", consolidated=False, encoding=encoding)
    return dest


def write_predictions(
    run_dir: Path,
    split: str,
    model: nn.Module,
    dataset: ChipDataset,
    batch_size: int = 16,
    tta: str = "none",
    device: str = "cpu",
) -> Path:
    """Run the model over a split and store its logits atomically."""
    indices, logits = collect_logits(model, dataset, batch_size, tta, device)
    return save_predictions(run_dir, split, indices, logits, {"split": split, "tta": tta})


def load_predictions(run_dir: Path, split: str) -> xr.Dataset:
    """Logits of one split written by `write_predictions`: `logit` (chip, y, x) or (chip, class, y, x)."""
    path = RunLayout(run_dir).predictions(split)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run the training stage ({TRAINING.notebook}) first")
    return xr.open_zarr(path, consolidated=False)

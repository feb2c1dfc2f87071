"""Chip-level inference and the per-chip diagnostics table.

Logits of every chip of a split are written once to `<run_dir>/predictions/<split>.zarr`
(float16, chunked per chip); calibration, evaluation and review read them from there, so a
model runs over the data a single time per run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from workbench.arrays import IGNORE_INDEX, sigmoid
from workbench.data.dataset import ChipDataset
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
    """Yield (store indices, logits (B, H, W)) batch by batch, with test-time augmentation."""
    from workbench.evaluate.tta import predict_with_tta

    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        logits = predict_with_tta(model, batch["image"].to(device), tta)
        yield batch["index"].numpy(), logits[:, 0].float().cpu().numpy()


def collect_logits(
    model: nn.Module,
    dataset: ChipDataset,
    batch_size: int = 16,
    tta: str = "none",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Store indices (n,) and float16 logits (n, H, W) of every chip of `dataset`."""
    indices: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    for batch_indices, batch_logits in iter_chip_logits(model, dataset, batch_size, tta, device):
        indices.append(batch_indices)
        logits.append(batch_logits.astype(np.float16))
    return np.concatenate(indices), np.concatenate(logits)


def save_predictions(
    run_dir: Path, name: str, indices: np.ndarray, logits: np.ndarray, attrs: dict[str, Any] | None = None
) -> Path:
    """Write logits (chunked per chip) to `<run_dir>/predictions/<name>.zarr` atomically."""
    ds = xr.Dataset(
        {"logit": (("chip", "y", "x"), np.asarray(logits, dtype=np.float16))},
        coords={"chip_index": ("chip", np.asarray(indices))},
        attrs=dict(attrs or {}),
    )
    dest = RunLayout(run_dir).predictions(name)
    with atomic_directory(dest, overwrite=True) as tmp:
        encoding = {"logit": {"chunks": (1, *ds["logit"].shape[1:])}}
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
    """Logits of one split written by `write_predictions`."""
    path = RunLayout(run_dir).predictions(split)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run the training stage ({TRAINING.notebook}) first")
    return xr.open_zarr(path, consolidated=False)


IDENTITY_COLUMNS = ("chip_id", "region", "year", "lat", "lon", "split")


def chip_counts(pred: np.ndarray, truth: np.ndarray, usable: np.ndarray) -> dict[str, Any]:
    """Confusion counts of one chip over `usable` pixels, with union, IoU and flags (empty, tail: IoU < 0.05).

    `pred` and `truth` are boolean masks; callers decide how probabilities become `pred`.
    """
    pred, truth = pred & usable, truth & usable
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    n = int(usable.sum())
    union = tp + fp + fn
    iou = tp / union if union else float("nan")
    flags = ["empty"] if union == 0 else []
    if tp + fn and iou < 0.05:
        flags.append("tail")
    return {
        "valid_pixels": n,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": n - tp - fp - fn,
        "label_pixels": tp + fn,
        "predicted_pixels": tp + fp,
        "intersection": tp,
        "union": union,
        "iou": iou,
        "flags": ",".join(flags),
    }


def chip_identity(catalog: pd.DataFrame, index: int) -> dict[str, Any]:
    """The catalog's identity columns of the chip at store position `index`, plus that position."""
    row = catalog.iloc[index]
    identity: dict[str, Any] = {c: row[c] for c in IDENTITY_COLUMNS if c in catalog.columns}
    identity["store_index"] = index
    return identity


def iter_split_chips(
    store: Path, predictions: xr.Dataset, bands: list[str] | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (store index, raw image, label, valid, logit) for each predicted chip, one at a time."""
    indices = predictions["chip_index"].values
    dataset = ChipDataset(store, indices, bands=bands)
    logits = predictions["logit"]
    for position, index in enumerate(indices):
        image, label, valid = dataset.read_raw(position)
        yield int(index), image, label, valid, np.asarray(logits[position].values, dtype=np.float32)


def per_chip_table(
    store: Path,
    catalog: pd.DataFrame,
    predictions: xr.Dataset,
    threshold: float = 0.5,
    temperature: float = 1.0,
    bands: list[str] | None = None,
    green: str = "B03",
    swir: str = "B11",
    water_threshold: float = 0.0,
) -> pd.DataFrame:
    """One row per chip: identity, pixel counts, intersection/union/IoU and the water-index fraction.

    A pixel is predicted positive when its probability is `>= threshold`, as in calibration and review.
    """
    from workbench.indices import mndwi

    rows = []
    for index, image, label, valid, logit in iter_split_chips(store, predictions, bands):
        prob = sigmoid(logit / temperature, np.float32)
        usable = valid & (label != IGNORE_INDEX)
        row = chip_identity(catalog, index)
        row.update(chip_counts(prob >= threshold, label > 0, usable))
        if bands is not None and green in bands and swir in bands:
            index_map = mndwi(image, bands, green=green, swir=swir)
            row["water_index_fraction"] = float((index_map[valid] > water_threshold).mean()) if valid.any() else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Pooled (sum I / sum U over the split) and per-chip mean metrics from a per-chip table."""
    tp, fp, fn = (float(table[c].sum()) for c in ("tp", "fp", "fn"))
    tn = float(table["tn"].sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "iou": ratio(tp, tp + fp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
        "mean_chip_iou": float(table["iou"].mean()) if table["iou"].notna().any() else float("nan"),
        "tail_chips": int((table["flags"].str.contains("tail")).sum()),
        "n_chips": len(table),
    }


def grouped_metrics(table: pd.DataFrame, by: str) -> dict[str, dict[str, float]]:
    """Pooled metrics per value of a catalog column (region, year, ...)."""
    return {str(key): pooled_metrics(group) for key, group in table.groupby(by)}

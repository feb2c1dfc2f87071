"""Pre-flight check of the training loader: whether it feeds the model what the data audit found.

`check_batches` iterates batches as a training loop receives them and reports shapes, dtypes, non-finite
values, label values and batch class balance (`check_batch` per batch), plus per-band moments of the
normalised images (`band_warnings` for z-score inputs far from mean 0 / std 1). `check_data` runs it over
the real training DataLoader (sampler, augmentation, normalisation) of a prepared run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from workbench.arrays import IGNORE_INDEX
from workbench.audit.stats import allowed_label_values
from workbench.data.normalize import Welford

if TYPE_CHECKING:
    from workbench.data.prepare import PreparedData
    from workbench.params import Params

BATCH_COLUMNS = [
    "batch",
    "n_samples",
    "valid_fraction",
    "ignore_fraction",
    "positive_pixel_fraction",
    "positive_chip_share",
    "image_min",
    "image_max",
    "n_nonfinite",
]
EXPECTED_DTYPES = {"image": "torch.float32", "label": "torch.int64", "valid": "torch.bool"}


@dataclass
class DataCheckReport:
    """Outcome of iterating the training loader: ok is False when any problem was found."""

    ok: bool
    problems: list[str]
    warnings: list[str]
    batches: pd.DataFrame
    bands: pd.DataFrame

    def summary(self) -> str:
        """One paragraph for logs and notebooks."""
        status = "passed" if self.ok else f"FAILED ({len(self.problems)} problems)"
        lines = [f"data check {status} over {len(self.batches)} batches"]
        lines += [f"  problem: {text}" for text in self.problems]
        lines += [f"  warning: {text}" for text in self.warnings]
        return "\n".join(lines)


def _chip_name(batch: Mapping[str, Any], sample: int, chip_ids: Sequence[str] | None) -> str:
    index = batch.get("index")
    if index is None:
        return f"sample {sample}"
    chip = int(np.asarray(index)[sample])
    name = f"chip {chip}"
    if chip_ids is not None and 0 <= chip < len(chip_ids):
        name += f" ({chip_ids[chip]})"
    return name


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _layout(batch: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and per-sample shape of each checked tensor."""
    return {
        key: (str(batch[key].dtype), tuple(batch[key].shape[1:]))
        for key in ("image", "label", "valid", "target")
        if key in batch
    }


def _structure_problems(
    batch: Mapping[str, Any], where: str, n_bands: int | None, reference: dict[str, tuple[str, tuple[int, ...]]] | None
) -> list[str]:
    """Missing keys, wrong dtypes, inconsistent shapes (within the batch and against the first batch)."""
    missing = [key for key in ("image", "label", "valid") if key not in batch]
    if missing:
        return [f"{where}: missing {missing}; a batch holds image, label, valid (and target)"]
    problems = []
    for key, expected in EXPECTED_DTYPES.items():
        if str(batch[key].dtype) != expected:
            problems.append(f"{where}: {key} has dtype {batch[key].dtype}, expected {expected}")
    if "target" in batch and not str(batch["target"].dtype).startswith("torch.float"):
        problems.append(f"{where}: target has dtype {batch['target'].dtype}, expected a float dtype")
    image = batch["image"]
    if image.ndim != 4:
        return [*problems, f"{where}: image has shape {tuple(image.shape)}, expected (B, C, H, W)"]
    size, _, height, width = image.shape
    if n_bands is not None and image.shape[1] != n_bands:
        problems.append(f"{where}: image has {image.shape[1]} bands, expected {n_bands}")
    for key in ("label", "valid", "target"):
        if key in batch and tuple(batch[key].shape) != (size, height, width):
            problems.append(f"{where}: {key} has shape {tuple(batch[key].shape)}, expected {(size, height, width)}")
    if reference is not None:
        for key, (dtype, shape) in _layout(batch).items():
            if key in reference and reference[key] != (dtype, shape):
                problems.append(f"{where}: {key} is {dtype} {shape} per sample, the first batch had {reference[key]}")
    return problems


def check_batch(
    batch: Mapping[str, Any],
    number: int,
    allowed_labels: set[int],
    positive_threshold: float = 0.002,
    n_bands: int | None = None,
    reference: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    chip_ids: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Check one collated batch; returns its table row and the problems found (naming chips)."""
    where = f"batch {number}"
    problems = _structure_problems(batch, where, n_bands, reference)
    row: dict[str, Any] = {"batch": number}
    if any("missing" in text or "expected (B, C, H, W)" in text for text in problems):
        return row, problems
    image, label = _numpy(batch["image"]), _numpy(batch["label"]).astype(np.int64)
    valid = _numpy(batch["valid"]).astype(bool)
    nonfinite = ~np.isfinite(image)
    for sample in np.flatnonzero(nonfinite.any(axis=(1, 2, 3))):
        count = int(nonfinite[sample].sum())
        problems.append(f"{where}: image of {_chip_name(batch, int(sample), chip_ids)} has {count} non-finite values")
    bad = ~np.isin(label, sorted(allowed_labels))
    for sample in np.flatnonzero(bad.any(axis=(1, 2))):
        values = sorted({int(v) for v in np.unique(label[sample][bad[sample]])})
        problems.append(
            f"{where}: label of {_chip_name(batch, int(sample), chip_ids)} holds values {values[:10]} "
            f"outside the allowed {sorted(allowed_labels)}"
        )
    if "target" in batch:
        target = _numpy(batch["target"])
        off = ~np.isfinite(target) | (target < 0) | (target > 1)
        for sample in np.flatnonzero(off.any(axis=(1, 2))):
            name = _chip_name(batch, int(sample), chip_ids)
            problems.append(f"{where}: target of {name} leaves [0, 1] at {int(off[sample].sum())} pixels")
    scored = valid & (label != IGNORE_INDEX)
    positive = scored & (label > 0) & ~bad
    per_chip = positive.sum(axis=(1, 2)) / np.maximum(scored.sum(axis=(1, 2)), 1)
    finite_valid = image[np.isfinite(image) & valid[:, None]]
    row.update(
        n_samples=int(image.shape[0]),
        valid_fraction=float(valid.mean()),
        ignore_fraction=float((valid & (label == IGNORE_INDEX)).sum() / max(int(valid.sum()), 1)),
        positive_pixel_fraction=float(positive.sum() / max(int(scored.sum()), 1)),
        positive_chip_share=float((per_chip >= positive_threshold).mean()),
        image_min=float(finite_valid.min()) if finite_valid.size else math.nan,
        image_max=float(finite_valid.max()) if finite_valid.size else math.nan,
        n_nonfinite=int(nonfinite.sum()),
    )
    return row, problems


def _band_moments(moments: Welford, batch: Mapping[str, Any]) -> None:
    image = _numpy(batch["image"]).astype(np.float64)
    valid = _numpy(batch["valid"]).astype(bool)
    for sample, mask in zip(image, valid):
        moments.update(sample, mask & np.isfinite(sample).all(axis=0))


def band_warnings(
    bands: pd.DataFrame, method: str, mean_tolerance: float = 0.5, std_range: tuple[float, float] = (0.5, 2.0)
) -> list[str]:
    """For z-score inputs, bands whose mean over the checked batches is far from 0 or whose std is far from 1."""
    if method != "zscore":
        return []
    found = []
    for name, mean, std in zip(bands["band"], bands["mean"].astype(float), bands["std"].astype(float)):
        if not math.isfinite(mean) or abs(mean) > mean_tolerance:
            found.append(f"band {name}: normalised mean {mean:.3g}, expected near 0 for zscore")
        if not math.isfinite(std) or not std_range[0] <= std <= std_range[1]:
            found.append(f"band {name}: normalised std {std:.3g}, expected near 1 for zscore")
    return found


def check_batches(
    batches: Iterable[Mapping[str, Any]],
    allowed_labels: set[int] | None = None,
    positive_threshold: float = 0.002,
    band_names: Sequence[str] | None = None,
    method: str = "zscore",
    chip_ids: Sequence[str] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> DataCheckReport:
    """Check batches as a training loop receives them; see `check_batch`. A loader error is a problem too."""
    allowed = allowed_label_values(1) if allowed_labels is None else allowed_labels
    n_bands = len(band_names) if band_names is not None else None
    rows, problems = [], []
    reference: dict[str, tuple[str, tuple[int, ...]]] | None = None
    moments: Welford | None = None
    stream = itertools.islice(batches, max_batches) if max_batches is not None else batches
    bar = tqdm(stream, total=max_batches, desc="data check", unit="batch", disable=not progress)
    try:
        for number, batch in enumerate(bar):
            row, found = check_batch(batch, number, allowed, positive_threshold, n_bands, reference, chip_ids)
            rows.append(row)
            problems += found
            if reference is None and not found:
                reference = _layout(batch)
            if "image" in batch and "valid" in batch and np.ndim(batch["image"]) == 4:
                moments = moments or Welford(int(batch["image"].shape[1]))
                if int(batch["image"].shape[1]) == moments.n_bands:
                    _band_moments(moments, batch)
    except Exception as exc:  # a crashing loader is the most important finding of a pre-flight check
        problems.append(f"loader failed after {len(rows)} batches: {type(exc).__name__}: {exc}")
    if not rows and not problems:
        problems.append("the loader yielded no batch")
    names = list(band_names) if band_names is not None else None
    if moments is not None and moments.count:
        names = (
            names if names is not None and len(names) == moments.n_bands else [str(i) for i in range(moments.n_bands)]
        )
        bands = pd.DataFrame({"band": names, "mean": moments.mean, "std": moments.std})
    else:
        bands = pd.DataFrame(columns=["band", "mean", "std"])
    table = pd.DataFrame(rows).reindex(columns=BATCH_COLUMNS)
    return DataCheckReport(not problems, problems, band_warnings(bands, method), table, bands)


def check_data(params: Params, prepared: PreparedData, n_batches: int = 8, progress: bool = True) -> DataCheckReport:
    """Iterate `n_batches` of the real training DataLoader (sampler, augmentation, normalisation) and check them.

    Batch-level augmentation (copy-paste, slide-mix) is applied as in training when it is configured. The
    check stops at the end of the first epoch when that comes before `n_batches`.
    """
    from workbench.data.augment import batch_augment_generator
    from workbench.data.loading import build_datamodule

    datamodule = build_datamodule(params, prepared)
    loader = datamodule.train_dataloader()
    batch_augment = datamodule.batch_augment if getattr(datamodule.batch_augment, "enabled", False) else None

    def batches() -> Iterable[Mapping[str, Any]]:
        for step, batch in enumerate(loader):
            if batch_augment is not None:
                batch = batch_augment(batch, batch_augment_generator(params.seed, step))
            yield batch

    return check_batches(
        batches(),
        allowed_labels=allowed_label_values(params.model.num_classes),
        positive_threshold=params.data.sampler.positive_threshold,
        band_names=prepared.bands,
        method=params.data.normalize.method,
        chip_ids=[str(value) for value in prepared.catalog["chip_id"]],
        max_batches=n_batches,
        progress=progress,
    )

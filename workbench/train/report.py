"""What the training notebook reports: data and sampler summary, model card, divergence warnings, prediction gallery.

The functions take plain inputs (catalog, parameters, a metrics CSV, prediction arrays) so that the
training stage can save their outputs and tests can check them on hand-made data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from workbench.params import Params

# --------------------------------------------------------------------------- data and sampler


def split_summary(catalog: pd.DataFrame, positive_threshold: float) -> pd.DataFrame:
    """Chips, positive chips (the samplers' rule) and mean label fraction per split."""
    from workbench.data.sampling import positive_chips

    for column in ("split", "positive_fraction"):
        if column not in catalog.columns:
            raise ValueError(f"the catalog has no {column!r} column; columns: {list(catalog.columns)}")
    frame = catalog.assign(positive=positive_chips(catalog["positive_fraction"].to_numpy(), positive_threshold))
    table = frame.groupby("split", sort=False).agg(
        chips=("positive", "size"),
        positive_chips=("positive", "sum"),
        mean_positive_fraction=("positive_fraction", "mean"),
    )
    table["positive_share"] = table["positive_chips"] / table["chips"]
    order = [s for s in ("train", "val", "test") if s in table.index] + [
        s for s in table.index if s not in ("train", "val", "test")
    ]
    return table.loc[order].reset_index()


def sampler_composition(params: Params, catalog: pd.DataFrame) -> pd.DataFrame:
    """Chips per epoch drawn by the configured sampler, with how many are positive, at each schedule change.

    Rows are the epochs where the composition can change (curriculum stage starts; else epoch 0),
    computed by drawing that epoch from the real sampler over the train split.
    """
    from workbench.data.loading import EpochShuffleSampler
    from workbench.data.sampling import CurriculumSampler, build_sampler, positive_chips

    train = catalog[catalog["split"] == "train"]
    fraction = train["positive_fraction"].to_numpy()
    cfg = params.data.sampler
    is_positive = positive_chips(fraction, cfg.positive_threshold)
    sampler = build_sampler(cfg, fraction, seed=params.seed) or EpochShuffleSampler(len(train), seed=params.seed)
    epochs = [0]
    if isinstance(sampler, CurriculumSampler):
        epochs = [stage.epoch for stage in sampler.stages if stage.epoch < params.train.max_epochs]
    rows = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        drawn = sampler.indices()
        positives = int(is_positive[drawn].sum())
        rows.append(
            {
                "sampler": cfg.kind,
                "from_epoch": epoch,
                "chips_per_epoch": len(drawn),
                "positive_draws": positives,
                "negative_draws": len(drawn) - positives,
                "negatives_per_positive": (len(drawn) - positives) / positives if positives else float("inf"),
                "distinct_chips": len(np.unique(drawn)),
                "batches": -(-len(drawn) // params.data.batch_size),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- model card


def model_card(task: Any) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(parameter counts per top-level part, optimiser groups with effective learning rates, lr warnings)."""
    from workbench.models.factory import describe_model
    from workbench.train.optim import warn_tiny_lr

    model = getattr(task.model, "_orig_mod", task.model)
    described = describe_model(model)
    rows = [
        {"part": name, "parameters": counts["parameters"], "trainable": counts["trainable"]}
        for name, counts in described["children"].items()
    ]
    rows.append(
        {
            "part": f"total ({described['class']})",
            "parameters": described["total_parameters"],
            "trainable": described["trainable_parameters"],
        }
    )
    groups = task.param_group_table()
    return pd.DataFrame(rows), groups, warn_tiny_lr(groups)


# --------------------------------------------------------------------------- train-validation divergence


def epoch_metrics(metrics_csv: str | Path) -> pd.DataFrame:
    """One row per epoch from a Lightning CSVLogger file: step-logged columns averaged, epoch-logged ones kept."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected the CSVLogger metrics.csv of a run")
    frame = pd.read_csv(path)
    if "epoch" not in frame.columns:
        raise ValueError(f"{path} has no 'epoch' column; columns: {list(frame.columns)}")
    frame = frame.dropna(subset=["epoch"])
    frame["epoch"] = frame["epoch"].astype(int)
    values = frame.drop(columns=[c for c in ("step",) if c in frame.columns])
    return values.groupby("epoch", sort=True).mean()


def _slope(values: np.ndarray) -> float:
    return float(np.polyfit(np.arange(len(values), dtype=float), values, 1)[0])


def divergence_warnings(
    metrics_csv: str | Path,
    window: int = 4,
    min_rise: float = 0.02,
    train_iou_high: float = 0.9,
    val_iou_low: float = 0.5,
) -> list[str]:
    """Overfitting signs in a run's metrics (seed 001's list), as readable warnings.

    * train loss falling while val loss rises over the last `window` validated epochs (both linear
      trends, and val loss at least `min_rise` (relative) above its lowest value in the window);
    * at the last validated epoch, train IoU above `train_iou_high` with val IoU below `val_iou_low`.
    """
    table = epoch_metrics(metrics_csv)
    warnings: list[str] = []
    if {"train/loss", "val/loss"} <= set(table.columns):
        both = table[["train/loss", "val/loss"]].dropna()
        if len(both) >= max(window, 2):
            recent = both.tail(window)
            train, val = recent["train/loss"].to_numpy(), recent["val/loss"].to_numpy()
            rise = (val[-1] - val.min()) / abs(val.min()) if val.min() else float("inf")
            if _slope(train) < 0 < _slope(val) and train[-1] < train[0] and val[-1] > val[0] and rise >= min_rise:
                first, last = int(recent.index[0]), int(recent.index[-1])
                warnings.append(
                    f"train-validation divergence: from epoch {first} to {last} train loss fell "
                    f"{train[0]:.4g} -> {train[-1]:.4g} while val loss rose {val[0]:.4g} -> {val[-1]:.4g}; "
                    "consider stronger augmentation, more regularisation or earlier stopping"
                )
    if {"train/iou", "val/iou"} <= set(table.columns):
        both = table[["train/iou", "val/iou"]].dropna()
        if len(both):
            epoch, (train_iou, val_iou) = int(both.index[-1]), both.iloc[-1].to_numpy()
            if train_iou > train_iou_high and val_iou < val_iou_low:
                warnings.append(
                    f"large IoU gap at epoch {epoch}: train IoU {train_iou:.3f} > {train_iou_high:g} but val IoU "
                    f"{val_iou:.3f} < {val_iou_low:g}; the model memorises the training chips (reduce capacity, "
                    "stop earlier)"
                )
    return warnings


# --------------------------------------------------------------------------- prediction gallery


def pick_gallery_chips(per_chip: pd.DataFrame, n: int = 6) -> list[int]:
    """Store indices of up to `n` chips to show: labelled chips spread from worst to best IoU, then false alarms.

    `per_chip` is the per-chip table of a split (store_index, label_pixels, predicted_pixels, iou).
    """
    if per_chip.empty or n < 1:
        return []
    labelled = per_chip[per_chip["label_pixels"] > 0].sort_values("iou", na_position="first")
    n_labelled = min(len(labelled), max(n - n // 3, 1))
    spread: list[int] = []
    if n_labelled:
        spread = np.unique(np.linspace(0, len(labelled) - 1, n_labelled).round().astype(int)).tolist()
    chosen = [int(v) for v in labelled.iloc[spread]["store_index"]]
    empty = per_chip[per_chip["label_pixels"] == 0].sort_values("predicted_pixels", ascending=False)
    chosen += [int(v) for v in empty["store_index"].head(n - len(chosen))]
    rest = per_chip[~per_chip["store_index"].isin(chosen)]
    chosen += [int(v) for v in rest["store_index"].head(n - len(chosen))]
    return chosen


def prediction_gallery(
    chips: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    band_names: Sequence[str],
    rgb: tuple[str, str, str],
    threshold: float = 0.5,
) -> Figure:
    """One row per chip: RGB | label | predicted probability (with the `threshold` contour).

    Each chip is (title, raw image (C, H, W), label (H, W), valid (H, W), probability (H, W)).
    """
    from workbench.arrays import IGNORE_INDEX
    from workbench.figures import FigureInputError, rgb_composite

    if not chips:
        raise FigureInputError("no chips to show in the prediction gallery")
    fig = Figure(figsize=(9, 3 * len(chips)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(chips), 3))
    for row, (title, image, label, valid, prob) in zip(axes, chips, strict=True):
        valid = np.asarray(valid, dtype=bool)
        row[0].imshow(rgb_composite(image, band_names, rgb, valid=valid), interpolation="nearest")
        row[0].set_title(f"{title}\nRGB ({'/'.join(rgb)})", fontsize=8)
        shown = np.where(label == IGNORE_INDEX, 0.5, (label > 0).astype(float))
        row[1].imshow(np.where(valid, shown, np.nan), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        row[1].set_title(f"label: {float((label[valid] > 0).mean()) if valid.any() else 0.0:.1%} positive", fontsize=8)
        image_prob = row[2].imshow(np.where(valid, prob, np.nan), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        if (prob >= threshold).any() and (prob < threshold).any():
            row[2].contour(prob, levels=[threshold], colors="cyan", linewidths=0.8)
        row[2].set_title(f"prediction probability (contour {threshold:g})", fontsize=8)
        fig.colorbar(image_prob, ax=row[2], fraction=0.046)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig

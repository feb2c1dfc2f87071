"""Reading a run's training log: Lightning's CSVLogger ``metrics.csv``, and the overfitting warnings drawn from it.

`epoch_table` is the one reader of that file; the training-curves figure and `divergence_warnings` both
use it, so they agree about what each epoch's value is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def epoch_table(metrics_csv: str | Path) -> pd.DataFrame:
    """One row per epoch (index ``epoch``, ascending) from a Lightning CSVLogger ``metrics.csv``.

    Lightning writes sparse rows: every logging call adds a row holding the step, the epoch and the
    values it logged. Each column is aggregated in two stages:

    1. per ``(epoch, step)``, the LAST non-empty value written (a value re-logged at the same step
       replaces the earlier one);
    2. per epoch, the MEAN of those step values over the steps that logged the column.

    A column logged once per epoch (``val/loss``, ``train/iou``) therefore keeps its value, and a
    column logged at training steps (``train/loss``) becomes the mean over the epoch's logged steps.
    Epochs where a column was not logged hold NaN in it; rows without an epoch are dropped. Without
    a ``step`` column each row counts as its own step.
    """
    path = Path(metrics_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected the Lightning CSVLogger metrics.csv of a run")
    frame = pd.read_csv(path)
    if "epoch" not in frame.columns:
        raise ValueError(f"{path} has no 'epoch' column; columns: {list(frame.columns)}")
    frame = frame.dropna(subset=["epoch"])
    frame["epoch"] = frame["epoch"].astype(int)
    if "step" in frame.columns:
        frame = frame.groupby(["epoch", "step"], sort=True, dropna=False).last().reset_index("step", drop=True)
    return frame.groupby("epoch", sort=True).mean()


def _slope(values: np.ndarray) -> float:
    return float(np.polyfit(np.arange(len(values), dtype=float), values, 1)[0])


def _divergence_since_best(both: pd.DataFrame, min_rise: float) -> list[str]:
    """The divergence warning when val loss ends well above its lowest value while train loss kept falling."""
    val = both["val/loss"]
    best = val.idxmin()
    after = both.loc[best:]
    if len(after) < 3 or not val.min() > 0:
        return []
    val_best, val_last = float(after["val/loss"].iloc[0]), float(after["val/loss"].iloc[-1])
    train_best, train_last = float(after["train/loss"].iloc[0]), float(after["train/loss"].iloc[-1])
    if val_last < val_best * (1.0 + min_rise) or not train_last < train_best:
        return []
    return [
        f"train-validation divergence: since its lowest value at epoch {int(after.index[0])}, val loss rose "
        f"{val_best:.4g} -> {val_last:.4g} (epoch {int(after.index[-1])}) while train loss fell "
        f"{train_best:.4g} -> {train_last:.4g}; the saved weights come from train.final_weights (default: the "
        "candidate best on validation); consider stronger augmentation, more regularisation or earlier stopping"
    ]


def divergence_warnings(
    metrics_csv: str | Path,
    window: int = 4,
    min_rise: float = 0.02,
    train_iou_high: float = 0.9,
    val_iou_low: float = 0.5,
    since_best_rise: float = 0.1,
) -> list[str]:
    """Overfitting signs in a run's metrics (per-epoch values of `epoch_table`), as readable warnings.

    * train loss falling while val loss rises over the last `window` validated epochs (both linear
      trends, and val loss at least `min_rise` (relative) above its lowest value in the window);
    * or, over the whole run, val loss at the end at least `since_best_rise` (relative) above its lowest value
      two or more validations earlier while train loss fell since then (noisy curves that rise overall);
    * at the last validated epoch, train IoU above `train_iou_high` with val IoU below `val_iou_low`.
    """
    table = epoch_table(metrics_csv)
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
            else:
                warnings += _divergence_since_best(both, since_best_rise)
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

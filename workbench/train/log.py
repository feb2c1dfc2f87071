"""Reading a run's training log: Lightning's CSVLogger ``metrics.csv``, and the overfitting warnings drawn from it.

`epoch_table` is the one reader of that file; the training-curves figure and `divergence_warnings` both
use it, so they agree about what each epoch's value is. The project writes the file atomically
(`workbench.train.csvlog`), but a file from an older run or another writer can end in a torn row (the
writer stopped mid-line): `read_log_lines` drops such a row, and any row whose field count differs
from the header, and reports each one (`TrainingLogWarning`) rather than parsing half a number.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


class TrainingLogWarning(UserWarning):
    """Rows of a training log that were dropped as unreadable (a torn last row, a wrong field count)."""


def read_log_lines(path: Path) -> tuple[list[str], list[str]]:
    """The readable lines of a CSV log (header first) and one message per dropped line.

    A line is dropped when it is the last one and lacks its line end (a torn write: its last value may be
    cut short), or when its field count differs from the header's. A torn or empty header is an error.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    if not lines or not lines[0].endswith(("\n", "\r")):
        raise ValueError(
            f"{path} has no complete header line (empty or torn while written); delete it, or re-run the training "
            "stage to write it again"
        )
    width = len(next(csv.reader([lines[0]])))
    kept, problems = [lines[0]], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if not line.endswith(("\n", "\r")):
            problems.append(
                f"{path}:{number}: dropped a torn last row (no line end: the writer stopped mid-row): {line[:80]!r}"
            )
            continue
        fields = next(csv.reader([line]))
        if len(fields) != width:
            problems.append(f"{path}:{number}: dropped a row of {len(fields)} fields (the header has {width})")
            continue
        kept.append(line)
    return kept, problems


def read_log(path: str | Path) -> pd.DataFrame:
    """A CSV log as written, less the unreadable rows of `read_log_lines` (each reported as a TrainingLogWarning)."""
    path = Path(path)
    lines, problems = read_log_lines(path)
    for problem in problems:
        warnings.warn(problem, TrainingLogWarning, stacklevel=2)
    return pd.read_csv(io.StringIO("".join(lines)))


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
    a ``step`` column each row counts as its own step. Unreadable rows (a torn last row) are dropped
    with a `TrainingLogWarning`, see `read_log_lines`.
    """
    path = Path(metrics_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected the Lightning CSVLogger metrics.csv of a run")
    frame = read_log(path)
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
    found: list[str] = []
    if {"train/loss", "val/loss"} <= set(table.columns):
        both = table[["train/loss", "val/loss"]].dropna()
        if len(both) >= max(window, 2):
            recent = both.tail(window)
            train, val = recent["train/loss"].to_numpy(), recent["val/loss"].to_numpy()
            rise = (val[-1] - val.min()) / abs(val.min()) if val.min() else float("inf")
            if _slope(train) < 0 < _slope(val) and train[-1] < train[0] and val[-1] > val[0] and rise >= min_rise:
                first, last = int(recent.index[0]), int(recent.index[-1])
                found.append(
                    f"train-validation divergence: from epoch {first} to {last} train loss fell "
                    f"{train[0]:.4g} -> {train[-1]:.4g} while val loss rose {val[0]:.4g} -> {val[-1]:.4g}; "
                    "consider stronger augmentation, more regularisation or earlier stopping"
                )
            else:
                found += _divergence_since_best(both, since_best_rise)
    if {"train/iou", "val/iou"} <= set(table.columns):
        both = table[["train/iou", "val/iou"]].dropna()
        if len(both):
            epoch, (train_iou, val_iou) = int(both.index[-1]), both.iloc[-1].to_numpy()
            if train_iou > train_iou_high and val_iou < val_iou_low:
                found.append(
                    f"large IoU gap at epoch {epoch}: train IoU {train_iou:.3f} > {train_iou_high:g} but val IoU "
                    f"{val_iou:.3f} < {val_iou_low:g}; the model memorises the training chips (reduce capacity, "
                    "stop earlier)"
                )
    return found

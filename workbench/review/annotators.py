"""Signals of multi-annotator labels: how much the annotators of a chip disagree, and which annotator is the outlier.

Stores ingested from several annotators' polygons (`workbench.data.sources.vector`) carry the plane
``votes``: per pixel, how many of the n annotators marked it. Per chip:

* ``vote_entropy``: mean binary entropy (bits) of the vote fraction v/n over the pixels at least one
  annotator marked: 0 when all agree, 1 where half of them marked the pixel;
* ``contested_share``: share of those pixels that not all annotators marked (0 < v < n), which is
  1 - |intersection| / |union| of the annotators' masks.

`annotator_table` compares each annotator with the leave-one-out consensus of the others (a strict
majority of the remaining n - 1): pixel IoU and object F1 (connected components matched at IoU 0.5), and
ranks them, lowest agreement first, so an outlying annotator shows at the top.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

VOTE_COLUMNS = ["vote_entropy", "contested_share"]


def vote_signals(votes: np.ndarray, n_annotators: int, valid: np.ndarray | None = None) -> dict[str, float]:
    """`vote_entropy` and `contested_share` of one chip's vote-count plane (see the module docstring)."""
    votes = np.asarray(votes)
    if n_annotators < 1:
        raise ValueError(f"n_annotators must be at least 1, got {n_annotators}")
    if votes.size and int(votes.max()) > n_annotators:
        raise ValueError(f"votes reach {int(votes.max())} but there are only {n_annotators} annotators")
    marked = votes > 0
    if valid is not None:
        marked &= np.asarray(valid, dtype=bool)
    n_marked = int(np.count_nonzero(marked))
    if n_marked == 0:
        return {"vote_entropy": 0.0, "contested_share": 0.0}
    share = votes[marked].astype(np.float64) / n_annotators
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(share * np.log2(share) + (1 - share) * np.log2(np.where(share < 1, 1 - share, 1.0)))
    entropy = np.nan_to_num(entropy, nan=0.0)
    contested = int(np.count_nonzero(votes[marked] < n_annotators))
    return {"vote_entropy": float(entropy.mean()), "contested_share": contested / n_marked}


def _object_f1(mask: np.ndarray, reference: np.ndarray, iou_threshold: float = 0.5) -> float:
    from workbench.evaluate.objects import object_metrics

    table = object_metrics(
        mask[None].astype(np.float32), reference[None].astype(np.int64), iou_thresholds=[iou_threshold]
    )
    row = table[(table["size_bin"] == "all")].iloc[0]
    if row["n_pred"] + row["n_gt"] == 0:
        return 1.0
    return float(row["f1"])


def annotator_table(masks: Mapping[str, np.ndarray], valid: np.ndarray | None = None) -> pd.DataFrame:
    """One row per annotator: agreement with the leave-one-out majority of the others, outliers first.

    Columns: annotator, marked_fraction, iou_loo (pixel IoU with the strict majority of the other n - 1
    annotators), object_f1_loo (objects matched at IoU 0.5), rank (1 = least agreement). Needs >= 3
    annotators so that the others still form a majority.
    """
    names = list(masks)
    if len(names) < 3:
        raise ValueError(f"a per-annotator table needs at least 3 annotators, got {len(names)}")
    stack = np.stack([np.asarray(masks[name]) > 0 for name in names])
    usable = np.ones(stack.shape[1:], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    stack &= usable
    votes = stack.sum(axis=0)
    others_needed = (len(names) - 1) // 2 + 1
    rows: list[dict[str, Any]] = []
    for position, name in enumerate(names):
        mask = stack[position]
        consensus = (votes - mask) >= others_needed
        union = int(np.count_nonzero(mask | consensus))
        iou = int(np.count_nonzero(mask & consensus)) / union if union else 1.0
        rows.append(
            {
                "annotator": name,
                "marked_fraction": float(mask[usable].mean()) if usable.any() else 0.0,
                "iou_loo": iou,
                "object_f1_loo": _object_f1(mask, consensus),
            }
        )
    table = pd.DataFrame(rows)
    table["rank"] = table["iou_loo"].rank(method="first").astype("int64")
    return table.sort_values("rank").reset_index(drop=True)


def annotator_masks_from_files(image: str | Path, files: list[str], all_touched: bool = False) -> dict[str, np.ndarray]:
    """Each annotator's polygons rasterised on the grid of `image` (names: the files' parent folder and stem)."""
    import rasterio

    from workbench.data.sources.vector import rasterize_polygons, read_polygons

    with rasterio.open(image) as src:
        crs, shape, transform = src.crs, src.shape, src.transform
    masks = {}
    for file in files:
        path = Path(file)
        name = f"{path.parent.name}/{path.stem}"
        masks[name] = rasterize_polygons(read_polygons(path, crs), shape, transform, all_touched)
    return masks

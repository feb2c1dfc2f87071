"""The tables of the training report: chips per split, the sampler's composition per epoch, and the model card.

The functions take plain inputs (catalog, parameters, a task) so that the training stage can save their
outputs and tests can check them on hand-made data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from workbench.data.loading import EpochShuffleSampler
from workbench.data.sampling import CurriculumSampler, build_sampler, positive_chips
from workbench.models.factory import describe_model
from workbench.params import Params
from workbench.train.optim import warn_tiny_lr

# --------------------------------------------------------------------------- data and sampler


def split_summary(catalog: pd.DataFrame, positive_threshold: float) -> pd.DataFrame:
    """Chips, positive chips (the samplers' rule) and mean label fraction per split."""

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

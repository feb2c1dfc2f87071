"""Stage 1: prepare the data (store, splits, normalisation) and audit it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.params import Params
from workbench.stages.base import StageResult, save_stage_figure, write_stage_metrics


def run_data_audit(params: Params, run_dir: Path) -> StageResult:
    """Prepare the data (store, splits, normalisation) and summarise it."""
    from workbench.data.prepare import prepare_data
    from workbench.data.split import leakage_report
    from workbench.figures import class_balance_bar, split_map_static

    run_dir = Path(run_dir)
    prepared = prepare_data(params.data, run_dir, seed=params.seed)
    catalog = prepared.catalog
    result = StageResult()
    split_summary = (
        catalog.groupby("split")
        .agg(chips=("chip_id", "size"), positive_fraction=("positive_fraction", "mean"))
        .reindex(["train", "val", "test", "buffer"])
        .dropna(how="all")
    )
    region_summary = catalog.pivot_table(
        index="region", columns="split", values="positive_fraction", aggfunc="mean"
    ).round(4)
    leakage = leakage_report(catalog[catalog["split"] != "buffer"])
    result.tables.update(split_summary=split_summary, region_summary=region_summary, leakage=leakage)
    save_stage_figure(class_balance_bar(catalog), run_dir, "class_balance", result)
    save_stage_figure(
        split_map_static(catalog["lat"].to_numpy(), catalog["lon"].to_numpy(), catalog["split"].to_numpy()),
        run_dir,
        "split_map",
        result,
    )
    metrics: dict[str, Any] = {"data.n_chips": len(catalog), "data.bands": len(prepared.bands)}
    for split, row in split_summary.iterrows():
        metrics[f"data.{split}_chips"] = int(row["chips"])
        metrics[f"data.{split}_positive_fraction"] = float(row["positive_fraction"])
    if len(leakage):
        metrics["data.min_cross_split_km"] = float(leakage["min_distance_km"].min())
    if "noisy" in catalog:
        metrics["data.noisy_chips"] = int(catalog["noisy"].sum())
    write_stage_metrics(run_dir, "audit_data", metrics)
    result.metrics = metrics
    return result

"""Stage 1: prepare the data (store, splits, normalisation) and audit it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from workbench.audit import (
    agreement_scatter,
    allowed_label_values,
    band_histogram_figure,
    check_data,
    nodata_by_group,
    nodata_figure,
    positive_by_group,
    positive_share_figure,
    prefilter_dropped_fraction,
    save_map_html,
    scan_store,
    split_map,
)
from workbench.data.agreement import prefilter_table
from workbench.data.prepare import ensure_store, prepare_data
from workbench.data.split import has_coordinates, leakage_report
from workbench.data.store import read_store_meta
from workbench.data.validate import check_label_values, positive_pixel_warnings, preflight
from workbench.figures import class_balance_bar, split_map_static
from workbench.io import write_parquet_atomic
from workbench.params import Params
from workbench.run import DATA_AUDIT, RunLayout
from workbench.stages.base import StageResult, save_stage_figure, write_stage_metrics

if TYPE_CHECKING:
    from workbench.data.prepare import PreparedData


NO_COORDINATES_NOTE = (
    "the chips have no coordinates (lat/lon), so there is no map of the splits and no leakage distance between "
    "them; the split came from split.method and keeps whole scenes, files or row bands apart only when the "
    "method does (catalog, source or rows, not random)"
)


def run_data_audit(params: Params, run_dir: Path, check_batches: int = 8, progress: bool = True) -> StageResult:
    """Prepare the data (store, splits, normalisation) and audit it (see `audit_store`).

    `check_batches` training batches go through the loader check (a pre-flight check before any training).
    """

    run_dir = Path(run_dir)
    RunLayout(run_dir).check_params(params)
    cleanup = [
        line for run in sorted(run_dir.parent.iterdir()) if run.is_dir() for line in RunLayout(run).sweep_leftovers()
    ]
    checked = preflight(params, ensure_store(params.data))  # names in the parameters vs the store, before compute
    prepared = prepare_data(params.data, run_dir, seed=params.seed)
    catalog = prepared.catalog
    result = StageResult()
    result.tables["preflight"] = pd.DataFrame(
        [("warning", text) for text in [*checked.warnings, *positive_pixel_warnings(catalog)]]
        + [("note", text) for text in cleanup],
        columns=["kind", "message"],
    )
    split_summary = (
        catalog.groupby("split")
        .agg(chips=("chip_id", "size"), positive_fraction=("positive_fraction", "mean"))
        .reindex(["train", "val", "test", "buffer"])
        .dropna(how="all")
    )
    region_summary = catalog.pivot_table(
        index="region", columns="split", values="positive_fraction", aggfunc="mean"
    ).round(4)
    located = has_coordinates(catalog)
    if located:
        leakage = leakage_report(catalog[catalog["split"] != "buffer"])
    else:  # no map and no distances: say so instead of failing
        leakage = pd.DataFrame(columns=["split_a", "split_b", "n_a", "n_b", "min_distance_km"])
    result.tables.update(split_summary=split_summary, region_summary=region_summary, leakage=leakage)
    balance = class_balance_bar(catalog, positive_threshold=params.data.sampler.positive_threshold)
    save_stage_figure(balance, run_dir, "class_balance", result)
    if located:
        save_stage_figure(
            split_map_static(catalog["lat"].to_numpy(), catalog["lon"].to_numpy(), catalog["split"].to_numpy()),
            run_dir,
            "split_map",
            result,
        )
    metrics: dict[str, Any] = {
        "data.n_chips": len(catalog),
        "data.bands": len(prepared.bands),
        "data.has_coordinates": located,
        "data.split_method": params.data.split.method,
    }
    for split, row in split_summary.iterrows():
        metrics[f"data.{split}_chips"] = int(row["chips"])
        metrics[f"data.{split}_positive_fraction"] = float(row["positive_fraction"])
    if len(leakage):
        metrics["data.min_cross_split_km"] = float(leakage["min_distance_km"].min())
    if "noisy" in catalog:
        metrics["data.noisy_chips"] = int(catalog["noisy"].sum())
    metrics.update(audit_store(params, prepared, run_dir, result, check_batches=check_batches, progress=progress))
    preflight_rows = result.tables.pop("preflight")
    result.tables["audit_messages"] = pd.concat([preflight_rows, result.tables["audit_messages"]], ignore_index=True)
    metrics["data.preflight_warnings"] = int((preflight_rows["kind"] == "warning").sum())
    for text in preflight_rows.loc[preflight_rows["kind"] == "warning", "message"]:
        warnings.warn(text, stacklevel=2)
    write_stage_metrics(run_dir, DATA_AUDIT, metrics)
    result.metrics = metrics
    # the audit's report is written; labels outside the classes stop the run here, before training
    check_label_values(prepared.store, pd.read_parquet(RunLayout(run_dir).data_audit_chips), params.model.num_classes)
    return result


def audit_store(
    params: Params,
    prepared: PreparedData,
    run_dir: Path,
    result: StageResult,
    check_batches: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Band statistics, nodata, class balance, water-index agreement and the loader check of a prepared run.

    Adds tables and figures to `result`, writes `diagnostics/data_audit_chips.parquet` (one row per chip)
    and `figures/split_map.html`, and returns the data.* metrics it computed.
    """

    cfg = params.data
    store_bands = [band["name"] for band in read_store_meta(prepared.store)["bands"]]
    scan = scan_store(
        prepared.store,
        prepared.catalog,
        store_bands,
        review=params.review,
        green=cfg.green_band,
        swir=cfg.swir_band,
        allowed_labels=allowed_label_values(params.model.num_classes),
        progress=progress,
    )
    chips = scan.chips
    write_parquet_atomic(RunLayout(run_dir).data_audit_chips, chips)
    nodata = nodata_by_group(chips)
    positive = positive_by_group(chips, threshold=cfg.sampler.positive_threshold)
    result.tables.update(band_stats=scan.band_stats, nodata=nodata, positive_by_split_region=positive)
    save_stage_figure(
        band_histogram_figure(scan.sample, store_bands, scan.band_stats), run_dir, "band_histograms", result
    )
    save_stage_figure(nodata_figure(chips, nodata), run_dir, "nodata", result)
    save_stage_figure(positive_share_figure(positive), run_dir, "positive_by_region", result)
    notes = list(scan.notes)
    metrics: dict[str, Any] = {
        "data.nodata_fraction": float(1.0 - chips["n_valid"].sum() / max(int(chips["n_pixels"].sum()), 1)),
        "data.unexpected_label_pixels": int(chips["unexpected_label_pixels"].sum()),
    }
    if scan.agreement:
        result.tables["prefilter"] = prefilter_table(chips)
        metrics["data.prefilter_dropped_fraction"] = prefilter_dropped_fraction(chips)
        scatter = agreement_scatter(chips, water_threshold=params.review.water_index_threshold)
        save_stage_figure(scatter, run_dir, "agreement_scatter", result)
    if not has_coordinates(prepared.catalog):
        notes.append(NO_COORDINATES_NOTE)
    else:
        try:
            save_map_html(
                split_map(prepared.catalog, backend="folium"), RunLayout(run_dir).figure("split_map", ".html")
            )
        except ImportError as exc:
            notes.append(f"interactive split map not written: {exc}")
    report = check_data(params, prepared, n_batches=check_batches, progress=progress)
    result.tables["check_data"] = report.batches
    result.tables["check_bands"] = report.bands
    messages = [("problem", text) for text in report.problems] + [("warning", text) for text in report.warnings]
    messages += [("note", text) for text in notes]
    result.tables["audit_messages"] = pd.DataFrame(messages, columns=["kind", "message"])
    metrics.update(
        {
            "data.check_ok": bool(report.ok),
            "data.check_problems": len(report.problems),
            "data.check_warnings": len(report.warnings),
        }
    )
    return metrics

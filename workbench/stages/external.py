"""Scoring a trained model on another chip store (cross-sensor or cross-dataset evaluation) as a run of its own.

`evaluate_external(model_or_run, store)` loads the model bundle (a `model/` folder or a run directory),
matches its bands to the store's by name (`workbench.data.bands`: Landsat Blue..SWIR2 <-> Sentinel-2
B02..B12 and the ukis-csmask names), normalises with the model's own train-split statistics, predicts every
labelled chip of the store and scores it at 0.5 and with the model's calibration (temperature and
threshold from calibration.json): pooled metrics, ECE / Brier before and after temperature scaling, the
per-chip table and the worst chips. A softmax model (num_classes >= 2) is scored by the argmax of its raw and
of its calibrated probabilities (per-class metrics, mIoU, overall accuracy and the confusion table; the
store's labels must be the model's class ids). The run lives beside the source run's experiment, and its run.json
names the source run, the store and the band map.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.io import write_json_atomic, write_parquet_atomic
from workbench.params import ExternalStore
from workbench.run import RunLayout, new_run_id
from workbench.stages.external_report import WORST_CHIP_FIGURES, write_external_figures

EXTERNAL_SPLIT = "test"


class ExternalStoreError(ValueError):
    """The store cannot be scored with this model (other chip size, no labels); the message says why."""


def external_store(entry: Path | ExternalStore, root: Path | None = None) -> Path:
    """The store of one `evaluate.external` entry, ingested first when the entry names raw data."""
    from workbench.data.ingest import ensure_ingested
    from workbench.data.prepare import resolve_path

    if isinstance(entry, ExternalStore):
        return ensure_ingested(entry.ingest, resolve_path(entry.store, root), root)
    return resolve_path(Path(entry), root)


def resolve_model_dir(model_or_run: str | Path) -> tuple[Path, Path | None]:
    """(model directory, source run directory or None) for a model folder or a run directory."""
    path = Path(model_or_run)
    if (path / "model").is_dir():
        return path / "model", path
    if path.is_dir() and (path / "model.pt").is_file():
        run = path.parent if (path.parent / "run.json").is_file() else None
        return path, run
    raise FileNotFoundError(f"{path} is neither a run directory (with model/) nor a model folder (with model.pt)")


def evaluate_external(
    model_or_run: str | Path,
    store: str | Path,
    band_map: dict[str, str] | None = None,
    reports: str | Path = "reports",
    batch_size: int = 16,
    tta: str = "none",
    progress: bool = False,
    n_worst: int = WORST_CHIP_FIGURES,
    normalize: str = "model",
) -> tuple[Path, dict[str, Any]]:
    """Score the model on every chip of `store`; returns the new run directory and its metrics.

    Besides metrics and tables the run gets the evaluation figures and a four-panel of each of the `n_worst`
    chips with the lowest calibrated IoU (`workbench.stages.external_report`). `normalize="store"` computes the
    model's normalisation method afresh over this store's chips (for data in other units, e.g. digital numbers
    against a model trained on reflectance); the default uses the source run's train-split statistics.
    """
    from workbench.data.bands import match_bands
    from workbench.data.dataset import ChipDataset
    from workbench.data.store import read_catalog, read_store_meta
    from workbench.evaluate.chips import per_chip_table, pooled_metrics
    from workbench.evaluate.scoring import calibration_quality
    from workbench.infer.chips import load_predictions, write_predictions
    from workbench.models.bundle import load_bundle

    model_dir, source_run = resolve_model_dir(model_or_run)
    bundle = load_bundle(model_dir)
    store = Path(store).resolve()
    meta = read_store_meta(store)
    store_bands = [band["name"] for band in meta["bands"]]
    chosen = match_bands(bundle.bands, store_bands, band_map)
    source_size = _source_chip_size(source_run)
    size = int(meta["chip_size"][0])
    if source_size is not None and size != source_size:
        raise ExternalStoreError(
            f"store {store} holds {size} px chips but the model was trained on {source_size} px chips; re-ingest "
            f"it with --chip-size {source_size} so objects appear at the scale the model learned"
        )
    catalog = read_catalog(store)
    catalog["split"] = EXTERNAL_SPLIT
    info = (
        json.loads((source_run / "run.json").read_text()) if source_run and (source_run / "run.json").is_file() else {}
    )
    experiment = str(info.get("experiment", "external"))
    layout = RunLayout.at(Path(reports).resolve(), experiment, f"{new_run_id()}-external-{store.name}")
    layout.root.mkdir(parents=True, exist_ok=False)
    layout.data.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(layout.catalog, catalog)
    normalizer = dataclasses.replace(bundle.normalization, bands=list(chosen))
    if normalize == "store":
        normalizer = _store_stats(store, catalog, list(chosen), normalizer)
    elif normalize != "model":
        raise ValueError(f"normalize must be 'model' or 'store', got {normalize!r}")
    normalizer.save(layout.normalization_stats)
    if source_run is not None and (source_run / "params.yaml").is_file():
        shutil.copyfile(source_run / "params.yaml", layout.root / "source_params.yaml")
    dataset = ChipDataset(store, np.arange(len(catalog)), bands=chosen, normalizer=normalizer)
    write_predictions(layout.root, EXTERNAL_SPLIT, bundle.model.eval(), dataset, batch_size, tta=tta)
    predictions = load_predictions(layout.root, EXTERNAL_SPLIT)
    metrics: dict[str, Any] = {}
    tables = {}
    if bundle.num_classes >= 2:
        calibrated, metrics = _score_multiclass(bundle, store, catalog, predictions, chosen, layout)
    for name, temperature, threshold in (
        ()
        if bundle.num_classes >= 2
        else (
            ("raw", 1.0, 0.5),
            ("calibrated", bundle.temperature, bundle.threshold),
        )
    ):
        table = per_chip_table(store, catalog, predictions, threshold=threshold, temperature=temperature, bands=chosen)
        tables[name] = table
        metrics.update({f"{EXTERNAL_SPLIT}.{name}.{k}": v for k, v in pooled_metrics(table).items()})
    logits: Any = None
    targets: Any = None
    reliability = None
    if bundle.num_classes == 1:
        calibrated = tables["calibrated"]
        logits, targets = _pixel_sample(store, predictions)
        if targets.size:
            quality, reliability = calibration_quality(logits, targets, bundle.temperature)
            metrics.update({f"calibration.{k}": v for k, v in quality.items()})
        metrics["calibration.temperature"] = bundle.temperature
        metrics["calibration.threshold"] = bundle.threshold
    write_parquet_atomic(layout.per_chip(EXTERNAL_SPLIT), calibrated)
    worst = calibrated.sort_values("iou" if bundle.num_classes == 1 else "accuracy").head(10)
    write_parquet_atomic(layout.diagnostic("external_worst_chips.parquet"), worst)
    figures = {}
    if bundle.num_classes == 1:  # the softmax run keeps its confusion and class tables; figures are binary
        figures = write_external_figures(
            layout,
            store,
            tables,
            predictions,
            reliability,
            logits,
            targets,
            bundle.temperature,
            bundle.threshold,
            dict(zip(bundle.bands, chosen)),
            n_worst=n_worst,
        )
    write_json_atomic(layout.metrics, metrics)
    write_json_atomic(
        layout.info,
        {
            "experiment": experiment,
            "run_id": layout.root.name,
            "kind": "external_evaluation",
            "status": "complete",
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_run": None if source_run is None else str(source_run.resolve()),
            "model_dir": str(model_dir.resolve()),
            "store": str(store),
            "bands": dict(zip(bundle.bands, chosen)),
            "normalize": normalize,
            "figures": {name: str(path.relative_to(layout.root)) for name, path in figures.items()},
            "notebooks": {},
        },
    )
    return layout.root, metrics


def _store_stats(store: Path, catalog: pd.DataFrame, bands: list[str], like: Any) -> Any:
    """The normalisation method of `like` (the model's), computed over every chip of `store`."""
    from workbench.data.normalize import compute_stats
    from workbench.data.store import open_store

    percentiles = tuple(like.percentiles) if like.percentiles else (1.0, 99.0)
    return compute_stats(
        open_store(store, catalog=catalog, dask=False),
        np.arange(len(catalog)),
        bands=bands,
        method=like.method,
        percentiles=percentiles,
        progress=False,
    )


def _score_multiclass(
    bundle: Any, store: Path, catalog: pd.DataFrame, predictions: Any, bands: list[str], layout: RunLayout
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A softmax model on the store: argmax of the raw and of the calibrated probabilities (`predict_classes`
    through `workbench.evaluate.multiclass`), per-class metrics and confusion tables. The store's labels
    must be the model's class ids (ingest it with the class map the model was trained with)."""
    from workbench.evaluate.multiclass import chip_confusions, split_scores
    from workbench.io import write_text_atomic
    from workbench.params import resolve_classes

    names = [spec.name for spec in resolve_classes(bundle.model_params)]
    metrics: dict[str, Any] = {}
    per_chip = pd.DataFrame()
    for name, calibration in (("raw", None), ("calibrated", bundle.calibration or None)):
        per_chip, matrices = chip_confusions(store, catalog, predictions, names, calibration, bands=bands)
        scores, tables = split_scores(per_chip, matrices, names)
        scores["absent_classes"] = ",".join(scores["absent_classes"])
        metrics.update({f"{EXTERNAL_SPLIT}.{name}.{k}": v for k, v in scores.items()})
        if name == "calibrated":
            write_text_atomic(layout.confusion(EXTERNAL_SPLIT), tables["confusion"].to_csv(index=False))
            write_text_atomic(layout.class_metrics(EXTERNAL_SPLIT), tables["class_metrics"].to_csv(index=False))
    temperature = (bundle.calibration or {}).get("temperature", 1.0)
    if isinstance(temperature, list):
        metrics.update({f"calibration.temperature.{n}": float(t) for n, t in zip(names, temperature, strict=True)})
    else:
        metrics["calibration.temperature"] = float(temperature)
    return per_chip, metrics


def _source_chip_size(source_run: Path | None) -> int | None:
    if source_run is None:
        return None
    catalog = RunLayout(source_run).catalog
    params = source_run / "params.yaml"
    if not (catalog.is_file() and params.is_file()):
        return None
    from workbench.data.prepare import resolve_path
    from workbench.data.store import read_store_meta
    from workbench.params import load_params

    try:
        store = resolve_path(load_params(params).data.store)
        return int(read_store_meta(store)["chip_size"][0])
    except (FileNotFoundError, ValueError):
        return None


def _pixel_sample(store: Path, predictions: Any, limit: int = 500_000) -> tuple[np.ndarray, np.ndarray]:
    """Logits and 0/1 targets of the usable pixels (valid, labelled), at most `limit` of them."""
    from workbench.evaluate.scoring import iter_label_logits

    logits, targets = [], []
    count = 0
    for _, label, valid, logit in iter_label_logits(store, predictions):
        label = np.asarray(label)
        usable = (label != 255) if valid is None else ((label != 255) & np.asarray(valid, dtype=bool))
        logits.append(np.asarray(logit, dtype=np.float32).reshape(label.shape)[usable])
        targets.append((label[usable] > 0).astype(np.float32))
        count += int(usable.sum())
        if count >= limit:
            break
    if not logits:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(logits)[:limit], np.concatenate(targets)[:limit]


def worst_chips(run_dir: Path) -> pd.DataFrame:
    """The ten chips of an external evaluation with the lowest IoU."""
    return pd.read_parquet(RunLayout(run_dir).diagnostic("external_worst_chips.parquet"))

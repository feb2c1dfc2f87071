"""Stage 4: rank chips by label suspicion and draw four-panel figures of the top-ranked ones."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np

from workbench.arrays import sigmoid
from workbench.data.agreement import prefilter_table
from workbench.data.dataset import ChipDataset
from workbench.data.ledger import Ledger, LedgerError, ledger_path
from workbench.data.prepare import load_prepared
from workbench.data.store import ChipReader, read_store_meta
from workbench.evaluate.chips import iter_split_chips
from workbench.figures import chip_title, four_panel, four_panel_filename
from workbench.infer.chips import load_predictions
from workbench.io import read_json, write_parquet_atomic, write_text_atomic
from workbench.params import Params
from workbench.review import ReviewChip, resolve_top_k, review_table, top_k_scores
from workbench.review.annotators import annotator_masks_from_files, annotator_table
from workbench.review.geometry import footprint_note, store_pixel_size
from workbench.review.maps import chip_footprints, noise_image, png_data_url, review_map_html
from workbench.review.ranking import order_columns
from workbench.run import REVIEW, TRAINING, RunLayout
from workbench.stages.base import StageResult, save_stage_figure, write_stage_metrics
from workbench.stages.review_classes import run_class_review
from workbench.train.crossfit import oof_name, use_out_of_fold


def review_predictions(params: Params, run_dir: Path, split: str, catalog: Any = None) -> str:
    """Name of the predictions that score `split`: out-of-fold ones for train when they are on (see
    `workbench.train.crossfit.use_out_of_fold`; explicitly on and missing is an error)."""

    if split != "train":
        return split
    predictions = RunLayout(run_dir).predictions(oof_name(split))
    if params.review.out_of_fold is None:
        on = catalog is not None and use_out_of_fold(params, catalog)
        return oof_name(split) if on and predictions.exists() else split
    if not params.review.out_of_fold:
        return split
    if not predictions.exists():
        raise FileNotFoundError(
            f"review.out_of_fold is on but {predictions} is missing; "
            f"run the training stage ({TRAINING.notebook}) with the same parameters first"
        )
    return oof_name(split)


def _store_votes(store: Path) -> tuple[Any, int]:
    """A reader of the store's `votes` plane and the number of annotators (None, 0 without one)."""

    meta = read_store_meta(store)
    if "votes" not in meta.get("planes", []):
        return None, 0
    return ChipReader(store, "votes"), int(meta.get("attrs", {}).get("n_annotators", 0))


def annotator_review(store: Path) -> Any:
    """The per-annotator table of a store ingested from several annotators' polygons, or None.

    Each annotator's file (store attribute `annotators`) is rasterised on the grid of the store's image
    (attribute `images`, the vector reader's source) and compared with the leave-one-out consensus.
    """

    attrs = read_store_meta(store).get("attrs", {})
    files, images = attrs.get("annotators"), attrs.get("images")
    if not files or not images or len(files) < 3 or not all(Path(f).exists() for f in [*files, images[0]]):
        return None
    return annotator_table(annotator_masks_from_files(images[0], files))


def run_review(params: Params, run_dir: Path) -> StageResult:
    """Rank chips by label suspicion, score the ranking against injected noise, draw figures and the review map."""

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    layout.check_params(params)
    cfg = params.review
    prepared = load_prepared(run_dir, params.data, decisions=params.review.decisions, ledger=params.review.ledger)
    calibration_file = layout.calibration
    calibration = read_json(calibration_file) if calibration_file.is_file() else {}
    temperature = float(calibration.get("temperature", 1.0))
    threshold = float(calibration.get("threshold", params.evaluate.threshold))
    catalog = prepared.catalog
    splits = [split for split in cfg.splits if (catalog["review_split"] == split).any()]
    sources = {split: review_predictions(params, run_dir, split, catalog) for split in splits}
    if params.model.num_classes >= 2:  # a softmax model: per-class review (workbench.stages.review_classes)
        return run_class_review(params, run_dir, sources)
    votes_reader, n_annotators = _store_votes(prepared.store)

    def chips() -> Any:
        for split in splits:
            for index, image, label, valid, logit in iter_split_chips(
                prepared.store, load_predictions(run_dir, sources[split]), prepared.bands, prepared.corrections
            ):
                row = {**{str(k): v for k, v in catalog.iloc[index].items()}, "store_index": index}
                row["scored_by"] = sources[split]
                row["split"] = split  # a chip dropped by the ledger is still reviewed in its original split
                yield ReviewChip(
                    row=row,
                    image=image,
                    band_names=prepared.bands,
                    label=label,
                    valid=valid,
                    prob=sigmoid(logit / temperature, np.float32),
                    votes=None if votes_reader is None else votes_reader.read_batch(np.array([index]))[0],
                    n_annotators=n_annotators,
                )

    table = order_columns(
        review_table(
            chips(), cfg, threshold=threshold, green=params.data.green_band, swir=params.data.swir_band, progress=False
        )
    )
    write_parquet_atomic(layout.review_ranking, table)
    result = StageResult(tables={"ranking": table, "prefilter": prefilter_table(table)})
    metrics: dict[str, Any] = {
        "review.n_chips": len(table),
        "review.out_of_fold": "train_oof" in sources.values(),
        "review.index": cfg.index,
    }
    annotators = annotator_review(prepared.store) if votes_reader is not None else None
    if annotators is not None:
        layout.diagnostics.mkdir(parents=True, exist_ok=True)
        write_text_atomic(layout.review_annotators, annotators.to_csv(index=False))
        result.tables["annotators"] = annotators
    try:
        ledger = Ledger.for_store(prepared.store, cfg.ledger)
        result.tables["decisions"] = ledger.table()
        result.tables["conflicts"] = ledger.conflicts()
        metrics["review.ledger"] = str(ledger_path(prepared.store, cfg.ledger))
        metrics["review.n_decisions"] = len(result.tables["decisions"])
    except LedgerError as error:
        metrics["review.ledger_error"] = str(error)
    if "noisy" in table:
        k = resolve_top_k(table, cfg)
        scores = top_k_scores(table, k)
        metrics.update(
            {"review.k": k, "review.top_k_precision": scores["precision"], "review.top_k_recall": scores["recall"]}
        )
    # only the top-ranked chips are read again, for their figures and map layers
    predictions = {split: load_predictions(run_dir, sources[split]) for split in splits}
    overlays: dict[str, str] = {}
    figure_urls: dict[str, str] = {}
    top = table.nsmallest(max(cfg.n_figures, min(len(table), 50)), "rank")
    for _, row in top.iterrows():
        index, split_predictions = int(row["store_index"]), predictions[str(row["split"])]
        position = int(np.flatnonzero(split_predictions["chip_index"].values == index)[0])
        image, label, valid = ChipDataset(prepared.store, [index], bands=prepared.bands).read_raw(0)
        prob = sigmoid(
            np.asarray(split_predictions["logit"][position].values, dtype=np.float32) / temperature, np.float32
        )
        overlays[str(row["chip_id"])] = png_data_url(noise_image(label, prob, valid, threshold))
        if int(row["rank"]) > cfg.n_figures:
            continue
        title = chip_title(row["chip_id"], row["region"], int(row["year"]), row["lat"], row["lon"], row["score"])
        fig = four_panel(
            image,
            prepared.bands,
            label,
            prob,
            valid,
            title,
            water_threshold=cfg.water_index_threshold,
            threshold=threshold,
            green=params.data.green_band,
            swir=params.data.swir_band,
            rgb=params.data.rgb_bands,
            index=cfg.index,
            nir=cfg.nir_band,
            votes=None if votes_reader is None else votes_reader.read_batch(np.array([index]))[0],
            n_annotators=n_annotators,
        )
        name = Path(four_panel_filename(int(row["year"]), float(row["lat"]), float(row["lon"]))).stem
        save_stage_figure(fig, run_dir, f"review/{int(row['rank']):02d}_{name}", result)
        saved = result.figures[f"review/{int(row['rank']):02d}_{name}"]
        figure_urls[str(row["chip_id"])] = "data:image/png;base64," + base64.b64encode(saved.read_bytes()).decode()
    chip_size = (
        int(ChipDataset(prepared.store, [0], bands=prepared.bands).read_raw(0)[1].shape[-1]) if len(catalog) else 0
    )
    footprints = chip_footprints(table, chip_size, store_pixel_size(prepared.store))
    layout.figures.mkdir(parents=True, exist_ok=True)
    note = footprint_note(table)
    write_text_atomic(
        layout.review_map,
        review_map_html(
            table, footprints, overlays, figure_urls, title=f"{params.experiment} review", footprint_note=note
        ),
    )
    metrics["review.map"] = str(layout.review_map)
    write_stage_metrics(run_dir, REVIEW, metrics)
    result.metrics = metrics
    return result

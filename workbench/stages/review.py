"""Stage 4: rank chips by label suspicion and draw four-panel figures of the top-ranked ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workbench.io import read_json
from workbench.params import Params
from workbench.run import REVIEW, TRAINING, RunLayout
from workbench.stages.base import StageResult, save_stage_figure, write_stage_metrics


def review_predictions(params: Params, run_dir: Path, split: str) -> str:
    """Name of the predictions that score `split`: out-of-fold ones for train when `review.out_of_fold` is on."""
    from workbench.train.crossfit import oof_name

    if not (params.review.out_of_fold and split == "train"):
        return split
    predictions = RunLayout(run_dir).predictions(oof_name(split))
    if not predictions.exists():
        raise FileNotFoundError(
            f"review.out_of_fold is on but {predictions} is missing; "
            f"run the training stage ({TRAINING.notebook}) with the same parameters first"
        )
    return oof_name(split)


def run_review(params: Params, run_dir: Path) -> StageResult:
    """Rank chips by label suspicion, score the ranking against injected noise, draw four-panel figures."""
    from workbench.arrays import sigmoid
    from workbench.data.agreement import prefilter_table
    from workbench.data.dataset import ChipDataset
    from workbench.data.prepare import load_prepared
    from workbench.evaluate.chips import iter_split_chips
    from workbench.figures import chip_title, four_panel, four_panel_filename
    from workbench.infer.chips import load_predictions
    from workbench.io import write_parquet_atomic
    from workbench.review import ReviewChip, resolve_top_k, review_table, top_k_scores

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    layout.check_params(params)
    cfg = params.review
    prepared = load_prepared(run_dir, params.data)
    calibration_file = layout.calibration
    calibration = read_json(calibration_file) if calibration_file.is_file() else {}
    temperature = float(calibration.get("temperature", 1.0))
    threshold = float(calibration.get("threshold", params.evaluate.threshold))
    catalog = prepared.catalog
    splits = [split for split in cfg.splits if (catalog["split"] == split).any()]
    sources = {split: review_predictions(params, run_dir, split) for split in splits}

    def chips() -> Any:
        for split in splits:
            for index, image, label, valid, logit in iter_split_chips(
                prepared.store, load_predictions(run_dir, sources[split]), prepared.bands
            ):
                yield ReviewChip(
                    row={**{str(k): v for k, v in catalog.iloc[index].items()}, "store_index": index},
                    image=image,
                    band_names=prepared.bands,
                    label=label,
                    valid=valid,
                    prob=sigmoid(logit / temperature, np.float32),
                )

    table = review_table(
        chips(), cfg, threshold=threshold, green=params.data.green_band, swir=params.data.swir_band, progress=False
    )
    write_parquet_atomic(layout.diagnostic("review.parquet"), table)
    result = StageResult(tables={"ranking": table.head(25), "prefilter": prefilter_table(table)})
    metrics: dict[str, Any] = {"review.n_chips": len(table), "review.out_of_fold": "train_oof" in sources.values()}
    if "noisy" in table:
        k = resolve_top_k(table, cfg)
        scores = top_k_scores(table, k)
        metrics.update(
            {"review.k": k, "review.top_k_precision": scores["precision"], "review.top_k_recall": scores["recall"]}
        )
    # only the top-ranked chips are read again, for their figures
    predictions = {split: load_predictions(run_dir, sources[split]) for split in splits}
    for _, row in table.nsmallest(cfg.n_figures, "rank").iterrows():
        index, split_predictions = int(row["store_index"]), predictions[str(row["split"])]
        position = int(np.flatnonzero(split_predictions["chip_index"].values == index)[0])
        image, label, valid = ChipDataset(prepared.store, [index], bands=prepared.bands).read_raw(0)
        prob = sigmoid(
            np.asarray(split_predictions["logit"][position].values, dtype=np.float32) / temperature, np.float32
        )
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
        )
        name = Path(four_panel_filename(int(row["year"]), float(row["lat"]), float(row["lon"]))).stem
        save_stage_figure(fig, run_dir, f"review/{int(row['rank']):02d}_{name}", result)
    write_stage_metrics(run_dir, REVIEW, metrics)
    result.metrics = metrics
    return result

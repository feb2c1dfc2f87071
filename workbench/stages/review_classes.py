"""Stage 4 for a softmax model: rank chips by label suspicion per class and draw class-coloured four-panels.

The binary review (`workbench.stages.review.run_review`) hands over here when `model.num_classes >= 2`.
Probabilities and the decided class map come from `workbench.evaluate.calibration.class_probabilities`
and `predict_classes` with the run's `calibration.json`; the table from
`workbench.review.ranking.class_review_table`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.dataset import ChipDataset
from workbench.data.prepare import load_prepared
from workbench.evaluate.calibration import class_probabilities, predict_classes
from workbench.evaluate.chips import iter_split_chips
from workbench.figures import chip_title, class_four_panel, four_panel_filename
from workbench.infer.chips import load_predictions
from workbench.io import read_json, write_parquet_atomic
from workbench.params import Params
from workbench.review.ranking import class_review_table, order_columns, resolve_top_k, top_k_scores
from workbench.review.signals import ReviewChip
from workbench.run import REVIEW, RunLayout
from workbench.stages.base import StageResult, save_stage_figure, write_stage_metrics
from workbench.stages.classes import class_names_colors


def run_class_review(params: Params, run_dir: Path, sources: dict[str, str]) -> StageResult:
    """Rank the chips of a softmax model's review splits (`sources`: split -> predictions name) by suspicion.

    Writes the ranking (`diagnostics/review_ranking.parquet`) with one `disagree.<class>` column per class,
    the review metrics (top-k precision / recall against injected noise when the store knows it) and the
    class-coloured four-panels of the `review.n_figures` most suspicious chips.
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    cfg = params.review
    names, colors = class_names_colors(params)
    prepared = load_prepared(run_dir, params.data, decisions=cfg.decisions, ledger=cfg.ledger)
    calibration = read_json(layout.calibration) if layout.calibration.is_file() else None
    catalog = prepared.catalog
    predictions = {split: load_predictions(run_dir, name) for split, name in sources.items()}

    def decided(logit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return class_probabilities(logit, calibration), predict_classes(logit, calibration, names)

    def chips() -> Iterator[ReviewChip]:
        for split, split_predictions in predictions.items():
            for index, image, label, valid, logit in iter_split_chips(
                prepared.store, split_predictions, prepared.bands, prepared.corrections
            ):
                row = {**{str(k): v for k, v in catalog.iloc[index].items()}, "store_index": index}
                row["scored_by"] = sources[split]
                row["split"] = split
                probs, predicted = decided(np.asarray(logit))
                yield ReviewChip(
                    image=image,
                    band_names=prepared.bands,
                    label=label,
                    valid=valid,
                    row=row,
                    class_probs=probs.astype(np.float32),
                    predicted=predicted,
                )

    table = order_columns(class_review_table(chips(), names, cfg, progress=False))
    write_parquet_atomic(layout.review_ranking, table)
    result = StageResult(tables={"ranking": table})
    metrics: dict[str, Any] = {
        "review.n_chips": len(table),
        "review.out_of_fold": "train_oof" in sources.values(),
        "review.index": "none",
        "review.classes": ",".join(names),
    }
    if "noisy" in table and len(table):
        k = resolve_top_k(table, cfg)
        scores = top_k_scores(table, k)
        metrics.update(
            {"review.k": k, "review.top_k_precision": scores["precision"], "review.top_k_recall": scores["recall"]}
        )
    for _, row in table[table["rank"] <= cfg.n_figures].iterrows():
        split_predictions = predictions[str(row["split"])]
        index = int(row["store_index"])
        position = int(np.flatnonzero(split_predictions["chip_index"].values == index)[0])
        logit = np.asarray(split_predictions["logit"][position].values)
        probs, predicted = decided(logit)
        image, label, valid = ChipDataset(prepared.store, [index], bands=prepared.bands).read_raw(0)
        title = chip_title(row["chip_id"], row["region"], int(row["year"]), row["lat"], row["lon"], row["score"])
        fig = class_four_panel(
            image,
            prepared.bands,
            label,
            predicted,
            valid,
            title,
            names,
            colors,
            confidence=probs.max(axis=0),
            rgb=params.data.rgb_bands,
        )
        name = Path(four_panel_filename(int(row["year"]), float(row["lat"]), float(row["lon"]))).stem
        save_stage_figure(fig, run_dir, f"review/{int(row['rank']):02d}_{name}", result)
    write_stage_metrics(run_dir, REVIEW, metrics)
    result.metrics = metrics
    return result

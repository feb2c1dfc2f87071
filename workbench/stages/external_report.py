"""Figures of a cross-dataset evaluation run: the calibration report's figures and the worst chips.

`write_external_figures` draws, under the evaluation run's `figures/` folder (file names from `RunLayout`):
reliability diagrams before / after the model's temperature, the precision-recall curve at that temperature,
the per-chip IoU distribution (raw and calibrated) and one four-panel (RGB | index or probability | label |
prediction at the calibrated threshold) for each of the `n_worst` chips with the lowest calibrated IoU. The
RGB bands and the index come from the source run's frozen parameters (`source_params.yaml`), translated to the
store's band names through the band map, so the panels show what the source run's review would show.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.run import RunLayout

WORST_CHIP_FIGURES = 6
WORST_FOLDER = "external_worst"


def worst_chip_rows(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The `n` chips with the lowest IoU (chips without any positive pixel, IoU NaN, left out), lowest first."""
    return table.dropna(subset=["iou"]).sort_values(["iou", "store_index"], kind="stable").head(n)


def worst_figure_name(rank: int, chip_id: str) -> str:
    """`external_worst/<rank>_<chip id>` (rank from 1, lowest IoU first), a `RunLayout.figure` name."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(chip_id))
    return f"{WORST_FOLDER}/{rank:02d}_{safe}"


def _panel_settings(source_params: Path | None, band_map: Mapping[str, str], store_bands: list[str]) -> dict[str, Any]:
    """RGB bands, index and its bands from the source run's parameters, in the store's band names."""
    settings: dict[str, Any] = {"rgb": tuple(store_bands[:3]), "index": "none", "green": "B03", "swir": "B11"}
    settings["nir"] = "B08"
    settings["water_threshold"] = 0.0
    if source_params is None or not source_params.is_file():
        return settings
    from workbench.params import load_params

    params = load_params(source_params)

    def store_name(name: str) -> str:
        return band_map.get(name, name)

    rgb = tuple(store_name(name) for name in params.data.rgb_bands)
    if all(name in store_bands for name in rgb):
        settings["rgb"] = rgb
    settings.update(
        index=params.review.index,
        green=store_name(params.data.green_band),
        swir=store_name(params.data.swir_band),
        nir=store_name(params.review.nir_band),
        water_threshold=params.review.water_index_threshold,
    )
    return settings


def write_external_figures(
    layout: RunLayout,
    store: Path,
    tables: Mapping[str, pd.DataFrame],
    predictions: Any,
    reliability: Mapping[str, pd.DataFrame] | None,
    logits: np.ndarray,
    targets: np.ndarray,
    temperature: float,
    threshold: float,
    band_map: Mapping[str, str],
    n_worst: int = WORST_CHIP_FIGURES,
) -> dict[str, Path]:
    """Write the evaluation figures (see the module docstring); returns {figure name: path}."""
    from workbench.data.dataset import ChipDataset
    from workbench.data.store import read_store_meta
    from workbench.evaluate.metrics import ThresholdHistogram
    from workbench.evaluate.scoring import pr_curve_record
    from workbench.figures.base import FigureInputError, save_figure
    from workbench.figures.calibration import (
        plot_per_chip_distribution,
        plot_pr_curves_with_baseline,
        plot_reliability_grid,
    )
    from workbench.figures.panels import four_panel

    written: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        written[name] = save_figure(fig, layout.figure(name))

    if reliability:
        save(plot_reliability_grid({"external": reliability}), "reliability")
    if targets.size:
        prob = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64) / temperature))
        hist = ThresholdHistogram(bins=1000).update(prob[None, None], np.asarray(targets, np.uint8)[None, None])
        curve = {f"external (T = {temperature:.2f})": pr_curve_record(hist)}
        save(plot_pr_curves_with_baseline(curve, "Precision-recall, calibrated"), "pr_curves")
    calibrated = tables["calibrated"]
    worst = worst_chip_rows(calibrated, n_worst)
    save(
        plot_per_chip_distribution(
            {name: table["iou"] for name, table in tables.items()}, "iou", marked=worst["iou"].to_numpy()
        ),
        "per_chip_iou",
    )
    if worst.empty:
        return written
    store_bands = [band["name"] for band in read_store_meta(store)["bands"]]
    source_params = layout.root / "source_params.yaml"
    settings = _panel_settings(source_params if source_params.is_file() else None, band_map, store_bands)
    positions = {int(index): position for position, index in enumerate(predictions["chip_index"].values)}
    reader = ChipDataset(store, np.asarray(worst["store_index"], dtype=np.int64), bands=store_bands)
    records = worst.to_dict(orient="records")
    for rank, (position, row) in enumerate(zip(range(len(worst)), records, strict=True), start=1):
        image, label, valid = reader.read_raw(position)
        logit = np.asarray(predictions["logit"][positions[int(row["store_index"])]].values, dtype=np.float32)
        prob = 1.0 / (1.0 + np.exp(-logit.reshape(label.shape) / temperature))
        title = f"{row['chip_id']} · worst {rank} of {len(calibrated)} · IoU {float(row['iou']):.3f}"
        kwargs = dict(settings)
        try:
            fig = four_panel(image, store_bands, label, prob, valid, title, threshold=threshold, **kwargs)
        except FigureInputError:  # the index needs bands this store lacks: show the model's probability
            kwargs["index"] = "none"
            fig = four_panel(image, store_bands, label, prob, valid, title, threshold=threshold, **kwargs)
        save(fig, worst_figure_name(rank, str(row["chip_id"])))
    return written

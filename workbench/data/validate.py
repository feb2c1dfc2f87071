"""Checks a run makes before any compute: the parameters against the store, and the store itself.

`preflight` runs at the start of the data-audit stage, before the splits, statistics or any
training: every split, band and class named in the parameters is checked against the store, so a
typo fails in seconds with the key, the value and what the store has, not after training.
`check_label_values` stops a run whose labels hold values outside the model's classes, and
`positive_pixel_warnings` says which splits have no positive pixel (their IoU, F1 and recall are
undefined and reported as NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from workbench.arrays import IGNORE_INDEX
from workbench.params import Params

SPLITS = ("train", "val", "test")  # what the block and region splits assign (besides "buffer")


class PreflightError(ValueError):
    """The parameters name something the store does not have; one line per problem with the fix."""


class LabelValueError(ValueError):
    """The labels hold values outside the model's classes and the ignore value."""


@dataclass
class PreflightReport:
    """What the checks found: warnings that do not stop the run (problems raise PreflightError)."""

    bands: list[str]
    splits: list[str]
    warnings: list[str] = field(default_factory=list)


def available_splits(params: Params, catalog: pd.DataFrame) -> list[str]:
    """The splits a run of `params` can have: train/val/test, or the catalog's own for split.method=catalog."""
    if params.data.split.method == "catalog":
        if "split" not in catalog.columns:
            return []
        found = {str(value).strip().lower() for value in catalog["split"].dropna() if str(value).strip()}
        if "train" in found:  # a missing val or test split is carved from train (`split.carve_missing_splits`)
            cfg = params.data.split
            if cfg.val_percent > 0:
                found.add("val")
            if 100 - cfg.train_percent - cfg.val_percent > 0:
                found.add("test")
        return sorted(found)
    return list(SPLITS)


def _band_problems(params: Params, store_bands: Sequence[str]) -> tuple[list[str], list[str]]:
    cfg = params.data
    names = list(store_bands)
    have = f"the store has {names}"
    problems: list[str] = []
    warnings: list[str] = []
    if cfg.bands is not None:
        missing = [band for band in cfg.bands if band not in names]
        if missing:
            problems.append(f"data.bands lists {missing}, which the store does not have; {have}")
        if len(set(cfg.bands)) != len(cfg.bands):
            problems.append(f"data.bands repeats a band: {cfg.bands}")
    missing_rgb = [band for band in cfg.rgb_bands if band not in names]
    if missing_rgb:
        problems.append(
            f"data.rgb_bands {list(cfg.rgb_bands)}: {missing_rgb} not in the store (the figures need them); {have}"
        )
    for key in ("green_band", "swir_band"):
        value = getattr(cfg, key)
        if value not in names:
            warnings.append(f"data.{key}={value!r} is not a store band: the water-index (MNDWI) checks are skipped")
    fused = [band for group in params.model.fusion_groups for band in group]
    missing_fused = [band for band in fused if band not in (cfg.bands or names)]
    if missing_fused:
        problems.append(f"model.fusion_groups name {missing_fused}, which are not among the model's bands; {have}")
    return problems, warnings


def _split_problems(params: Params, splits: Sequence[str]) -> list[str]:
    problems = []
    allowed = f"the run has the splits {list(splits)}"
    if params.calibrate.split not in splits:
        problems.append(f"calibrate.split={params.calibrate.split!r} is not a split of this run; {allowed}")
    unknown = [split for split in params.review.splits if split not in splits]
    if unknown:
        problems.append(f"review.splits names {unknown}, which are not splits of this run; {allowed}")
    if params.data.split.method == "catalog":
        for needed in SPLITS:
            if needed not in splits:
                problems.append(
                    f"data.split.method=catalog but the catalog has no {needed!r} chip; it has {list(splits)}"
                )
    if params.data.split.method == "region":
        regions = params.data.split.holdout_regions
        if not regions:
            problems.append("data.split.method=region needs data.split.holdout_regions (the test regions)")
    return problems


def preflight(params: Params, store: Path) -> PreflightReport:
    """Check the parameters against the store before any compute; raise PreflightError listing every problem.

    Checks: store.json's band table against the Zarr band coordinate; `data.bands`, `data.rgb_bands`,
    `model.fusion_groups` against the store's bands; `calibrate.split`, `review.splits` (and the
    catalog's splits for `split.method=catalog`) against the run's splits; `holdout_regions` against the
    catalog's regions; the store's label values against the model's classes (`label_value_problems`: one
    pass over the label and valid arrays, uint8 and bool, before any image is read).
    """
    from workbench.data.store import check_band_order, read_catalog

    store = Path(store)
    bands = check_band_order(store)
    catalog = read_catalog(store)
    problems, warnings = _band_problems(params, bands)
    splits = available_splits(params, catalog)
    problems += _split_problems(params, splits)
    problems += label_value_problems(store, params.model.num_classes, catalog)
    if params.data.split.method == "region" and "region" in catalog.columns:
        regions = sorted({str(value) for value in catalog["region"]})
        unknown = [name for name in params.data.split.holdout_regions if name not in regions]
        if unknown:
            problems.append(f"data.split.holdout_regions names {unknown}, not regions of the store; it has {regions}")
    if problems:
        raise PreflightError(f"the parameters do not fit the chip store {store}:\n  " + "\n  ".join(problems))
    return PreflightReport(bands=bands, splits=splits, warnings=warnings)


def outside_label_values(
    store: Path, num_classes: int, catalog: pd.DataFrame | None = None, examples: int = 5
) -> dict[int, tuple[int, int, list[str]]]:
    """Label values of valid pixels outside 0..K-1 and the ignore value: {value: (pixels, chips, first chip ids)}.

    Reads every chip's label and valid mask once (`ChipReader`); `catalog` (store order) names the chips.
    """
    from workbench.data.store import ChipReader

    allowed = np.zeros(256, dtype=bool)
    allowed[sorted(allowed_labels(num_classes))] = True
    labels, valid = ChipReader(store, "label"), ChipReader(store, "valid")
    found: dict[int, tuple[int, int, list[str]]] = {}
    ids = catalog["chip_id"].astype(str).to_numpy() if catalog is not None and "chip_id" in catalog else None
    for position in range(int(labels.shape[0])):
        label = labels.read(position)
        counts = np.bincount(label[valid.read(position).astype(bool)].ravel(), minlength=256)
        for value in np.flatnonzero((counts > 0) & ~allowed[: counts.size]).tolist():
            pixels, chips, names = found.get(int(value), (0, 0, []))
            if len(names) < examples:
                names = [*names, str(ids[position]) if ids is not None else f"chip {position}"]
            found[int(value)] = (pixels + int(counts[value]), chips + 1, names)
    return found


def label_value_problems(store: Path, num_classes: int, catalog: pd.DataFrame | None = None) -> list[str]:
    """One preflight problem per label value of the store that is neither a class of the model nor ignored."""
    path = Path(store) / "chips.zarr" / "label"
    problems = []
    for value, (pixels, chips, names) in sorted(outside_label_values(store, num_classes, catalog).items()):
        more = ", ..." if chips > len(names) else ""
        problems.append(
            f"{path} holds label value {value} ({pixels} valid px in {chips} chip(s): {', '.join(names)}{more}), "
            f"which is no class of model.num_classes={num_classes} (classes 0..{max(num_classes, 2) - 1}, "
            f"{IGNORE_INDEX} = ignored); re-ingest with a class map that sends it to a class or to 'ignore' "
            "(data.ingest class_map), or raise model.num_classes"
        )
    return problems


def positive_pixel_warnings(catalog: pd.DataFrame) -> list[str]:
    """One warning per split whose chips hold no positive pixel (positive-class metrics are undefined there)."""
    if "split" not in catalog.columns or "positive_fraction" not in catalog.columns:
        return []
    warnings = []
    for split, fractions in catalog.groupby("split")["positive_fraction"]:
        if split == "buffer":
            continue
        if not (fractions.to_numpy(float) > 0).any():
            warnings.append(
                f"split {split!r} has no positive pixel in its {len(fractions)} chip(s): IoU, F1 and recall are "
                "undefined there and are reported as NaN"
                + ("; the model cannot learn the positive class" if split == "train" else "")
            )
    return warnings


def allowed_labels(num_classes: int) -> set[int]:
    """Label values a store may hold for a model of `num_classes`: 0..K-1 (0 and 1 when binary) and the ignore index."""
    return set(range(max(int(num_classes), 2))) | {IGNORE_INDEX}


def check_label_values(store: Path, chips: pd.DataFrame, num_classes: int) -> None:
    """Raise LabelValueError when valid pixels carry labels outside the classes; name the values, counts and fix.

    `chips` is the data audit's per-chip table (`unexpected_label_pixels` per chip, in store order with
    `chip_id`); only the chips it flags are read again to name the values.
    """
    from workbench.data.store import ChipReader

    if "unexpected_label_pixels" not in chips.columns:
        return
    flagged = np.flatnonzero(chips["unexpected_label_pixels"].to_numpy() > 0)
    if flagged.size == 0:
        return
    allowed = sorted(allowed_labels(num_classes))
    labels, valid = ChipReader(store, "label"), ChipReader(store, "valid")
    counts: dict[int, int] = {}
    for position in flagged:
        label = labels.read(int(position))
        mask = valid.read(int(position)).astype(bool) & ~np.isin(label, allowed)
        values, n = np.unique(label[mask], return_counts=True)
        for value, count in zip(values.tolist(), n.tolist(), strict=True):
            counts[int(value)] = counts.get(int(value), 0) + int(count)
    total = int(chips["unexpected_label_pixels"].sum())
    examples = ", ".join(str(chip) for chip in chips["chip_id"].to_numpy()[flagged[:5]])
    described = ", ".join(f"{value}: {count} px" for value, count in sorted(counts.items()))
    classes = f"0..{max(num_classes, 2) - 1}"
    raise LabelValueError(
        f"{total} valid pixels in {flagged.size} chip(s) of {store} carry label values outside the classes "
        f"{classes} and the ignore value {IGNORE_INDEX} of model.num_classes={num_classes} ({described}; chips "
        f"{examples}{', ...' if flagged.size > 5 else ''}). They would be trained as wrong classes. Re-ingest with "
        f"a class map that sends them to a class (workbench.data.sources.map_classes), mark them {IGNORE_INDEX} "
        "(ignored), or raise model.num_classes"
    )

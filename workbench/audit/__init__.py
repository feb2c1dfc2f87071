"""Data audit: what is in a chip store before any model sees it, and whether the training loader feeds it right.

* `stats`: `BandStatistics` / `scan_store` stream the store chip by chip (bounded memory) into per-band
  statistics over valid pixels and one row per chip (nodata share, label share, water-index agreement);
  `nodata_by_group` / `positive_by_group` summarise those rows per split and region.
* `figures`: `band_histogram_figure`, `nodata_figure`, `positive_share_figure`, `agreement_scatter`.
* `maps`: `split_map`, an interactive map of chip centres (folium for HTML reports, leafmap in JupyterLab).
* `explorer`: band composites of single chips and `chip_explorer`, an ipywidgets browser over a store.
* `check`: `check_batches` / `check_data` iterate the real training DataLoader (sampler, augmentation,
  normalisation) and report shapes, dtypes, non-finite values, label values and batch class balance.

This package re-exports the headless names only: importing it (or any submodule but `explorer`) imports
none of ipywidgets, ipyleaflet, leafmap or folium. Import the explorer from `workbench.audit.explorer`.
"""

from workbench.audit.check import (
    BATCH_COLUMNS,
    EXPECTED_DTYPES,
    DataCheckReport,
    band_warnings,
    check_batch,
    check_batches,
    check_data,
)
from workbench.audit.figures import (
    agreement_scatter,
    band_histogram_figure,
    nodata_figure,
    positive_share_figure,
    split_colour,
)
from workbench.audit.maps import save_map_html, split_map
from workbench.audit.stats import (
    AGREEMENT_KEYS,
    ALL,
    BAND_STAT_COLUMNS,
    AuditInputError,
    BandStatistics,
    StoreScan,
    allowed_label_values,
    chip_summary,
    has_bands,
    nodata_by_group,
    positive_by_group,
    prefilter_dropped_fraction,
    scan_store,
)

__all__ = [
    "AGREEMENT_KEYS",
    "ALL",
    "BAND_STAT_COLUMNS",
    "BATCH_COLUMNS",
    "EXPECTED_DTYPES",
    "AuditInputError",
    "BandStatistics",
    "DataCheckReport",
    "StoreScan",
    "agreement_scatter",
    "allowed_label_values",
    "band_histogram_figure",
    "band_warnings",
    "check_batch",
    "check_batches",
    "check_data",
    "chip_summary",
    "has_bands",
    "nodata_by_group",
    "nodata_figure",
    "positive_by_group",
    "positive_share_figure",
    "prefilter_dropped_fraction",
    "save_map_html",
    "scan_store",
    "split_colour",
    "split_map",
]

"""Figures for reports and notebooks, one submodule per subject.

* `base`: resolution, colours, `FigureInputError`, `save_figure` (atomic PNG), `rgb_composite`;
* `panels`: the label-noise four-panel of one chip, its title and file name;
* `data`: band histograms, class balance per split, a static map of chip centres;
* `training`: training curves, the validation prediction gallery and its choice of chips;
* `calibration`: reliability diagrams and precision-recall curves;
* `classes`: multiclass figures (confusion matrix, per-class reliability, the class-coloured four-panel).

Every public name is re-exported here.
"""

from workbench.figures.base import (
    DPI,
    IGNORE_GREY,
    INVALID_GREY,
    SPLIT_COLOURS,
    WATER_BLUE,
    FigureInputError,
    rgb_composite,
    save_figure,
)
from workbench.figures.calibration import (
    plot_per_chip_distribution,
    plot_pr_curves,
    plot_pr_curves_with_baseline,
    plot_reliability,
    plot_reliability_grid,
)
from workbench.figures.classes import (
    class_four_panel,
    class_legend,
    class_legend_handles,
    class_reliability_tables,
    class_rgb,
    confusion_figure,
    plot_class_reliability,
)
from workbench.figures.data import band_histograms, class_balance_bar, split_map_static
from workbench.figures.panels import chip_title, four_panel, four_panel_filename
from workbench.figures.training import pick_gallery_chips, prediction_gallery, training_curves

__all__ = [
    "DPI",
    "IGNORE_GREY",
    "INVALID_GREY",
    "SPLIT_COLOURS",
    "WATER_BLUE",
    "FigureInputError",
    "band_histograms",
    "chip_title",
    "class_balance_bar",
    "class_four_panel",
    "class_legend",
    "class_legend_handles",
    "class_reliability_tables",
    "class_rgb",
    "confusion_figure",
    "four_panel",
    "four_panel_filename",
    "pick_gallery_chips",
    "plot_class_reliability",
    "plot_per_chip_distribution",
    "plot_pr_curves",
    "plot_pr_curves_with_baseline",
    "plot_reliability",
    "plot_reliability_grid",
    "prediction_gallery",
    "rgb_composite",
    "save_figure",
    "split_map_static",
    "training_curves",
]

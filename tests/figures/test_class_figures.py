"""Multiclass figures: confusion matrix texts, class colours in the rendered panels, per-class reliability."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix

from workbench.arrays import IGNORE_INDEX
from workbench.figures import (
    INVALID_GREY,
    FigureInputError,
    class_four_panel,
    class_legend,
    class_reliability_tables,
    class_rgb,
    confusion_figure,
    plot_class_reliability,
)

NAMES = ["other", "lake", "snow_ice"]
COLORS = ["#2ca02c", "#1f77b4", "#e377c2"]
BANDS = ["B02", "B03", "B04", "B11"]


def _rendered_pixel(fig: Figure, ax_index: int, row: float, col: float) -> np.ndarray:
    """RGB (0..1) of the rendered figure at data coordinates (row, col) of one image axes."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    buffer = np.asarray(canvas.buffer_rgba())[..., :3] / 255.0
    x, y = fig.axes[ax_index].transData.transform((col, row))
    return buffer[round(float(buffer.shape[0] - y)), round(float(x))]


def test_confusion_figure_writes_the_counts_and_row_shares() -> None:
    rng = np.random.default_rng(0)
    truth = rng.choice([0, 1], size=500, p=[0.7, 0.3])  # class 2 never labelled: an empty row
    pred = np.where(rng.uniform(size=500) < 0.8, truth, rng.integers(0, 3, size=500))
    counts = confusion_matrix(truth, pred, labels=[0, 1, 2])
    fig = confusion_figure(counts, NAMES, title="test")
    left, right = fig.axes[:2]
    assert [t.get_text() for t in left.texts] == [f"{v:,}" for v in counts.reshape(-1)]
    shares = confusion_matrix(truth, pred, labels=[0, 1, 2], normalize="true")
    written = [t.get_text() for t in right.texts]
    assert written[:6] == [f"{v:.2f}" for v in shares[:2].reshape(-1)]
    assert written[6:] == ["–", "–", "–"]  # no labelled pixel of class 2: not 0
    assert [t.get_text() for t in left.get_yticklabels()] == NAMES
    with pytest.raises(FigureInputError, match=r"expected \(2, 2\)"):
        confusion_figure(counts, NAMES[:2])


def test_class_rgb_paints_class_colours_and_refuses_unknown_values() -> None:
    label = np.array([[0, 1], [2, IGNORE_INDEX]], dtype=np.uint8)
    valid = np.array([[True, True], [True, False]])
    out = class_rgb(label, COLORS, valid)
    assert np.allclose(out[0, 0], to_rgb(COLORS[0])) and np.allclose(out[0, 1], to_rgb(COLORS[1]))
    assert np.allclose(out[1, 0], to_rgb(COLORS[2])) and np.allclose(out[1, 1], to_rgb(INVALID_GREY))
    with pytest.raises(FigureInputError, match=r"\[7\]"):
        class_rgb(np.array([[7]]), COLORS)


def test_four_panel_draws_label_and_prediction_in_class_colours_with_a_legend() -> None:
    size = 24
    label = np.zeros((size, size), dtype=np.uint8)
    label[:, 8:16] = 1
    label[:, 16:] = 2
    predicted = label.copy()
    predicted[:12, 8:16] = 2  # the top of the lake predicted as snow
    image = np.random.default_rng(1).uniform(100, 3000, size=(len(BANDS), size, size)).astype(np.float32)
    valid = np.ones((size, size), dtype=bool)
    fig = class_four_panel(
        image, BANDS, label, predicted, valid, "chip", NAMES, COLORS, confidence=np.full((size, size), 0.7)
    )
    for k, col in enumerate((4, 12, 20)):
        assert np.allclose(_rendered_pixel(fig, 2, 18, col), to_rgb(COLORS[k]), atol=2 / 255), NAMES[k]
    assert np.allclose(_rendered_pixel(fig, 3, 4, 12), to_rgb(COLORS[2]), atol=2 / 255)  # predicted snow
    assert np.allclose(_rendered_pixel(fig, 3, 18, 12), to_rgb(COLORS[1]), atol=2 / 255)  # predicted lake
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["0 other", "1 lake", "2 snow_ice", "no label", "nodata"]
    assert "lake 33%" in fig.axes[2].get_title() and "snow_ice 50%" in fig.axes[3].get_title()
    assert len(class_legend(NAMES, COLORS).legends[0].get_texts()) == 5


def test_class_reliability_tables_match_sklearn_one_vs_rest() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 3, 16, 16)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    label = np.array([[rng.choice(3, p=probs[n, :, y, x]) for x in range(16)] for n in range(6) for y in range(16)])
    label = label.reshape(6, 16, 16).astype(np.uint8)
    label[0, :4] = IGNORE_INDEX
    tables = class_reliability_tables(probs, label, NAMES, bins=10)
    keep = label != IGNORE_INDEX
    for k, name in enumerate(NAMES):
        frequency, confidence = calibration_curve((label[keep] == k), probs[:, k][keep], n_bins=10)
        filled = tables[name][tables[name]["count"] > 0]
        assert np.allclose(filled["frequency"], frequency) and np.allclose(filled["confidence"], confidence)
        assert tables[name]["count"].sum() == keep.sum()
    fig = plot_class_reliability({name: {"before": t, "after": t} for name, t in tables.items()}, COLORS)
    for ax, color in zip(fig.axes, COLORS):
        assert to_rgb(ax.lines[-1].get_color()) == to_rgb(color)
        assert ax.get_title() in NAMES

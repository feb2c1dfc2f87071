"""Figures: four-panel audit figure, file names, RGB stretch, overview plots, training curves, PNG output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from workbench.arrays import IGNORE_INDEX
from workbench.figures import (
    INVALID_GREY,
    FigureInputError,
    band_histograms,
    chip_title,
    class_balance_bar,
    four_panel,
    four_panel_filename,
    rgb_composite,
    save_figure,
    split_map_static,
    training_curves,
)

BANDS = ["B02", "B03", "B04", "B08", "B11"]
LAND = np.array([700, 900, 1000, 2500, 2200], dtype=np.float32)  # MNDWI < 0
WATER = np.array([900, 1100, 700, 300, 150], dtype=np.float32)  # MNDWI = 0.76
MARGIN = np.array([800, 1000, 900, 1500, 800], dtype=np.float32)  # MNDWI = 0.11


@pytest.fixture
def chip() -> dict[str, np.ndarray]:
    """10 x 10 chip: a 24-px lake, a 6-px wet margin, a label covering half the lake, a nodata last row."""
    lake = np.zeros((10, 10), dtype=bool)
    lake[2:6, 2:8] = True
    margin = np.zeros((10, 10), dtype=bool)
    margin[6, 2:8] = True
    image = np.empty((5, 10, 10), dtype=np.float32)
    image[:] = LAND[:, None, None]
    image[:, lake] = WATER[:, None]
    image[:, margin] = MARGIN[:, None]
    label = np.zeros((10, 10), dtype=np.uint8)
    label[2:6, 2:5] = 1
    valid = np.ones((10, 10), dtype=bool)
    valid[9] = False
    prob = np.where(lake, 0.9, 0.1)
    prob[7, 0:3] = 0.6  # three false positives
    return {"image": image, "label": label, "valid": valid, "prob": prob}


def test_four_panel_titles_carry_the_fractions(chip: dict[str, np.ndarray]) -> None:
    title = chip_title("chip_0007", "ile_alatau", 2023, 42.9912, 76.7123, score=1.234)
    fig = four_panel(chip["image"], BANDS, chip["label"], chip["prob"], chip["valid"], title)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    # 90 valid pixels: water = lake 24 + margin 6 = 30 (33.3 %), label 12 (13.3 %), prediction 24 + 3 = 27 (30.0 %)
    assert "MNDWI" in titles[1] and "33.3%" in titles[1]
    assert "Label" in titles[2] and "13.3%" in titles[2]
    assert "Prediction" in titles[3] and "30.0%" in titles[3]
    assert "RGB" in titles[0]
    suptitle = fig.get_suptitle()
    for part in ("chip_0007", "ile_alatau", "2023", "42.9912", "76.7123", "1.234"):
        assert part in suptitle


def test_four_panel_water_threshold_and_invalid_pixels(chip: dict[str, np.ndarray]) -> None:
    fig = four_panel(chip["image"], BANDS, chip["label"], None, chip["valid"], "t", water_threshold=0.3)
    titles = [ax.get_title() for ax in fig.axes]
    assert "26.7%" in titles[1]  # the margin (MNDWI 0.11) is no longer water: 24 / 90
    assert titles[3] == "Prediction: none"
    for ax in fig.axes:
        top = np.asarray(ax.get_images()[-1].get_array())
        np.testing.assert_allclose(top[9, 4], to_rgba(INVALID_GREY))  # nodata row painted grey
        assert top[0, 0, 3] == 0  # valid pixels left visible


def test_four_panel_label_ignore_pixels_are_not_counted(chip: dict[str, np.ndarray]) -> None:
    label = chip["label"].copy()
    label[0, :] = IGNORE_INDEX  # 10 unlabelled land pixels: 80 scored pixels remain
    fig = four_panel(chip["image"], BANDS, label, chip["prob"], chip["valid"], "t")
    assert "15.0%" in fig.axes[2].get_title()  # 12 / 80


def test_four_panel_rejects_mismatched_shapes(chip: dict[str, np.ndarray]) -> None:
    with pytest.raises(FigureInputError, match="label"):
        four_panel(chip["image"], BANDS, chip["label"][:5], chip["prob"], chip["valid"], "t")


def test_four_panel_filename_format() -> None:
    assert four_panel_filename(2023, 42.9912, 76.7123) == "label_noise_2023_42p9912_76p7123.png"
    assert four_panel_filename(2021, 42.92, 76.7) == "label_noise_2021_42p9200_76p7000.png"
    assert four_panel_filename(2017, -13.51234, -71.25) == "label_noise_2017_m13p5123_m71p2500.png"


def test_rgb_composite_stretches_valid_pixels_into_unit_range() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(200, 3000, size=(5, 20, 20)).astype(np.float32)
    valid = np.ones((20, 20), dtype=bool)
    valid[:3] = False
    nodata = image.copy()
    nodata[:, ~valid] = 65535  # nodata must not stretch the valid pixels
    composite = rgb_composite(nodata, BANDS, valid=valid)
    assert composite.shape == (20, 20, 3)
    assert composite.min() >= 0.0 and composite.max() <= 1.0
    assert (composite[~valid] == 0).all()
    red = image[BANDS.index("B04")][valid]
    low, high = np.percentile(red, [2, 98])
    np.testing.assert_allclose(composite[..., 0][valid], np.clip((red - low) / (high - low), 0, 1), atol=1e-6)
    assert np.isclose(composite[..., 0][valid], 0).mean() == pytest.approx(0.02, abs=0.01)
    assert np.isclose(composite[..., 0][valid], 1).mean() == pytest.approx(0.02, abs=0.01)


def test_rgb_composite_names_a_missing_band() -> None:
    with pytest.raises(FigureInputError, match="B04"):
        rgb_composite(np.zeros((2, 4, 4)), ["B02", "B03"])


def test_save_figure_writes_a_png_at_110_dpi(tmp_path: Path) -> None:
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "out" / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (110, 220)
    assert sorted(p.name for p in path.parent.iterdir()) == ["curve.png"]  # no temporary file left
    with pytest.raises(ValueError, match=r"\.png"):
        save_figure(fig, tmp_path / "curve.jpg")


def xy(line: Line2D) -> np.ndarray:
    return np.array([np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)])


def bar_heights(fig: Figure) -> list[float]:
    return [patch.get_height() for patch in fig.axes[0].patches if isinstance(patch, Rectangle)]


def test_training_curves_take_the_last_value_of_each_epoch(tmp_path: Path) -> None:
    rows = [
        {"epoch": 0, "step": 1, "train/loss_step": 0.95},
        {"epoch": 0, "step": 3, "val/loss": 0.80, "val/iou": 0.40},
        {"epoch": 0, "step": 3, "train/loss": 0.90},
        {"epoch": 1, "step": 5, "train/loss_step": 0.70},
        {"epoch": 1, "step": 7, "val/loss": 0.60, "val/iou": 0.55},
        {"epoch": 1, "step": 7, "val/loss": 0.58},  # a later value in the same epoch wins
        {"epoch": 1, "step": 7, "train/loss": 0.65},
        {"epoch": 2, "step": 11, "train/loss": 0.50},  # validation not run this epoch
    ]
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    fig = training_curves(path)
    ax_loss, ax_iou = fig.axes
    lines = {str(line.get_label()): line for line in ax_loss.get_lines()}
    assert set(lines) == {"train/loss", "val/loss"}
    np.testing.assert_allclose(xy(lines["train/loss"])[0], [0, 1, 2])
    np.testing.assert_allclose(xy(lines["train/loss"])[1], [0.90, 0.65, 0.50])
    np.testing.assert_allclose(xy(lines["val/loss"]), np.array([[0, 1], [0.80, 0.58]]))
    (iou,) = ax_iou.get_lines()
    np.testing.assert_allclose(xy(iou), np.array([[0, 1], [0.40, 0.55]]))


def test_training_curves_name_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        training_curves(tmp_path / "nowhere.csv")


def test_split_map_static_draws_one_series_per_split() -> None:
    lat = [43.0, 43.1, 43.2, 42.9, 42.8]
    lon = [76.7, 76.8, 76.9, 77.0, 77.1]
    split = ["train", "train", "val", "test", "train"]
    fig = split_map_static(lat, lon, split)
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    assert {text.get_text() for text in legend.get_texts()} == {"train (3)", "val (1)", "test (1)"}
    offsets = [np.asarray(collection.get_offsets(), dtype=float) for collection in ax.collections]
    assert sorted(len(points) for points in offsets) == [1, 1, 3]
    np.testing.assert_allclose(offsets[0], [[76.7, 43.0], [76.8, 43.1], [77.1, 42.8]])
    with pytest.raises(FigureInputError, match="equally long"):
        split_map_static(lat, lon[:-1], split)


def test_class_balance_bar_counts_positive_and_negative_chips() -> None:
    catalog = pd.DataFrame(
        {
            "split": ["train", "train", "train", "val", "val", "test"],
            "positive_fraction": [0.0, 0.002, 0.3, 0.001, 0.05, 0.0],
        }
    )
    heights = bar_heights(class_balance_bar(catalog))
    # splits in order train, val, test: positives (>= 0.002) 2, 1, 0; negatives 1, 1, 1
    assert heights == [2, 1, 0, 1, 1, 1]


def test_band_histograms_one_panel_per_band_over_valid_pixels() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(3, 5, 8, 8))
    valid = np.ones((3, 8, 8), dtype=bool)
    valid[0, :4] = False  # 32 invalid pixels
    fig = band_histograms(image, BANDS, valid, bins=10)
    assert [ax.get_title() for ax in fig.axes] == BANDS
    for ax in fig.axes:
        assert sum(patch.get_height() for patch in ax.patches if isinstance(patch, Rectangle)) == 3 * 64 - 32

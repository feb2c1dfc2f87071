"""Data audit: band statistics, per-chip summaries, group tables, composites, explorer, map and loader check."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from workbench.arrays import IGNORE_INDEX
from workbench.audit import (
    ALL,
    AuditInputError,
    BandStatistics,
    agreement_scatter,
    allowed_label_values,
    band_histogram_figure,
    band_warnings,
    check_batches,
    chip_summary,
    nodata_by_group,
    positive_by_group,
    prefilter_dropped_fraction,
    save_map_html,
    scan_store,
    split_map,
)
from workbench.audit.explorer import (
    CUSTOM,
    CompositeError,
    available_composites,
    chip_explorer,
    composite,
    composite_channel,
    hillshade,
    label_rgb,
)
from workbench.data.agreement import chip_agreement
from workbench.data.store import BandSpec, Chip, StoreWriter, read_catalog
from workbench.figures import INVALID_GREY, WATER_BLUE
from workbench.params import ReviewParams

BANDS = ["B02", "B03", "B04", "B08", "B8A", "B11", "B12", "VV", "VH", "DEM"]
LAND = np.array([700, 900, 1000, 2500, 2400, 2200, 1800, -8, -15, 3600], dtype=np.float32)  # MNDWI < 0
WATER = np.array([900, 1100, 700, 300, 250, 150, 100, -22, -28, 3500], dtype=np.float32)  # MNDWI = 0.76
SIZE = 8
SPLITS = ["train", "train", "train", "train", "train", "val", "val", "test", "test"]
REGIONS = ["a", "a", "b", "b", "b", "a", "b", "a", "b"]


def make_chip(number: int) -> dict[str, np.ndarray]:
    """A chip with a lake in the top-left `number`-pixel-wide square, noise, and nodata rows for odd chips."""
    rng = np.random.default_rng(number)
    lake = np.zeros((SIZE, SIZE), dtype=bool)
    lake[:number, :number] = True
    image = np.where(lake[None], WATER[:, None, None], LAND[:, None, None]).astype(np.float32)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    label = lake.astype(np.uint8)
    valid = np.ones((SIZE, SIZE), dtype=bool)
    if number % 2:
        valid[-number:, :] = False
    return {"image": image, "label": label, "valid": valid}


@pytest.fixture(scope="module")
def chips() -> list[dict[str, np.ndarray]]:
    return [make_chip(number) for number in range(len(SPLITS))]


def write_store(path: Path, chips: list[dict[str, np.ndarray]], bands: list[str] = BANDS) -> Path:
    modality = {"VV": "S1GRD", "VH": "S1GRD", "DEM": "DEM"}
    specs = [BandSpec(name, modality.get(name, "S2L2A"), optical=name.startswith("B")) for name in bands]
    positions = [BANDS.index(name) for name in bands]
    with StoreWriter(path, specs, source="test") as writer:
        for number, chip in enumerate(chips):
            writer.append(
                Chip(
                    f"chip{number}",
                    chip["image"][positions],
                    chip["label"],
                    chip["valid"],
                    lat=43.0 + 0.3 * number,
                    lon=77.0 + 0.1 * number,
                    region=REGIONS[number],
                    year=2021,
                    split=SPLITS[number],
                )
            )
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, chips: list[dict[str, np.ndarray]]) -> Path:
    return write_store(tmp_path_factory.mktemp("audit") / "store", chips)


def valid_pixels(chips: list[dict[str, np.ndarray]]) -> np.ndarray:
    """(n, C) matrix of all valid pixels, by plain numpy."""
    return np.concatenate([chip["image"][:, chip["valid"]].T for chip in chips]).astype(np.float64)


# --------------------------------------------------------------------------- band statistics


def test_band_statistics_match_numpy_over_valid_pixels(chips: list[dict[str, np.ndarray]]) -> None:
    stats = BandStatistics(BANDS, capacity=10_000)
    for chip in chips:
        stats.update(chip["image"], chip["valid"])
    table = stats.table().set_index("band")
    pixels = valid_pixels(chips)
    n_pixels = len(chips) * SIZE * SIZE
    np.testing.assert_allclose(table["min"], pixels.min(axis=0))
    np.testing.assert_allclose(table["max"], pixels.max(axis=0))
    np.testing.assert_allclose(table["mean"], pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(table["std"], pixels.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(table["p1"], np.percentile(pixels, 1, axis=0))
    np.testing.assert_allclose(table["median"], np.median(pixels, axis=0))
    np.testing.assert_allclose(table["p99"], np.percentile(pixels, 99, axis=0))
    invalid = sum(int((~chip["valid"]).sum()) for chip in chips)
    assert invalid > 0
    np.testing.assert_allclose(table["nodata_fraction"], invalid / n_pixels)
    assert (table["n_valid"] == len(pixels)).all()
    assert stats.sample.shape == pixels.shape


def test_band_statistics_zero_fraction_and_shape_errors() -> None:
    image = np.ones((2, 2, 2), dtype=np.float32)
    image[0, 0, 0] = 0.0  # a zero inside the valid mask
    image[1, 1, 1] = 0.0  # a zero outside it does not count
    valid = np.array([[True, True], [True, False]])
    table = BandStatistics(["x", "y"]).update(image, valid).table().set_index("band")
    assert table.loc["x", "zero_fraction"] == pytest.approx(1 / 3)
    assert table.loc["y", "zero_fraction"] == 0.0
    assert table.loc["x", "nodata_fraction"] == pytest.approx(0.25)
    with pytest.raises(AuditInputError, match="3 bands"):
        BandStatistics(["a", "b", "c"]).update(image, valid)


# --------------------------------------------------------------------------- per-chip summary and scan


def test_chip_summary_counts_by_hand() -> None:
    chip = make_chip(4)  # 16 lake pixels in a 4x4 square
    chip["valid"][4:, :] = False  # the lower half is nodata (all outside the lake)
    label = chip["label"].copy()
    label[0, 7] = IGNORE_INDEX
    label[1, 7] = 7  # not a class of a binary model
    row = chip_summary(chip["image"], BANDS, label, chip["valid"], ReviewParams(), "B03", "B11")
    assert row["n_pixels"] == 64 and row["n_valid"] == 32
    assert row["nodata_fraction"] == pytest.approx(0.5)
    assert row["n_scored"] == 31  # 32 valid minus the ignored pixel
    assert row["n_positive"] == 17  # the lake plus the pixel labelled 7 (> 0 counts as foreground)
    assert row["label_fraction"] == pytest.approx(17 / 31)
    assert row["unexpected_label_pixels"] == 1
    expected = chip_agreement(chip["image"], BANDS, label, chip["valid"], cfg=ReviewParams())
    for key in ("water_fraction", "iou_label_water", "prefilter_keep", "prefilter_reason"):
        assert row[key] == expected[key]
    assert row["water_fraction"] == pytest.approx(16 / 31)  # only the lake has MNDWI > 0


def test_chip_summary_without_swir_has_no_agreement() -> None:
    chip = make_chip(2)
    bands = [name for name in BANDS if name != "B11"]
    image = chip["image"][[BANDS.index(name) for name in bands]]
    row = chip_summary(image, bands, chip["label"], chip["valid"], green="B03", swir="B11")
    assert "water_fraction" not in row and "prefilter_keep" not in row
    assert row["label_fraction"] == pytest.approx(4 / 64)


def test_scan_store_reads_every_chip(store: Path, chips: list[dict[str, np.ndarray]]) -> None:
    catalog = read_catalog(store)
    scan = scan_store(store, catalog, BANDS, ReviewParams(), progress=False)
    assert scan.agreement and not scan.notes
    assert list(scan.chips["chip_id"]) == [f"chip{n}" for n in range(len(chips))]
    assert list(scan.chips["split"]) == SPLITS
    expected_nodata = [1.0 - chip["valid"].mean() for chip in chips]
    np.testing.assert_allclose(scan.chips["nodata_fraction"], expected_nodata)
    np.testing.assert_allclose(scan.band_stats["mean"], valid_pixels(chips).mean(axis=0), rtol=1e-6)
    # catalog columns are kept: the store's own positive fraction agrees with the scan's
    np.testing.assert_allclose(scan.chips["positive_fraction"], scan.chips["label_fraction"])
    with pytest.raises(AuditInputError, match="catalog lists 3 chips"):
        scan_store(store, catalog.head(3), BANDS, progress=False)


def test_scan_store_notes_missing_water_bands(tmp_path: Path, chips: list[dict[str, np.ndarray]]) -> None:
    bands = ["B04", "B03", "B02", "B08"]
    path = write_store(tmp_path / "rgbn", chips[:3], bands)
    scan = scan_store(path, read_catalog(path), bands, progress=False)
    assert not scan.agreement
    assert "B11" in scan.notes[0]
    assert "water_fraction" not in scan.chips
    assert math.isnan(prefilter_dropped_fraction(scan.chips))


# --------------------------------------------------------------------------- group tables


@pytest.fixture
def chip_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "split": ["train", "train", "train", "val"],
            "region": ["a", "a", "b", "a"],
            "n_pixels": [100, 100, 100, 100],
            "n_valid": [100, 50, 90, 100],
            "nodata_fraction": [0.0, 0.5, 0.1, 0.0],
            "n_scored": [100, 50, 90, 80],
            "n_positive": [10, 0, 9, 1],
            "label_fraction": [0.1, 0.0, 0.1, 1 / 80],
            "prefilter_keep": [True, False, True, True],
        }
    )


def test_nodata_by_group_pools_pixels_and_adds_totals(chip_table: pd.DataFrame) -> None:
    table = nodata_by_group(chip_table).set_index(["split", "region"])
    assert table.loc[("train", "a"), "chips"] == 2
    assert table.loc[("train", "a"), "nodata_fraction"] == pytest.approx(50 / 200)
    assert table.loc[("train", ALL), "nodata_fraction"] == pytest.approx(60 / 300)
    assert table.loc[("train", ALL), "chips_with_nodata"] == 2
    assert table.loc[("train", ALL), "chips_over_half_nodata"] == 0  # 0.5 is not over half
    assert table.loc[(ALL, ALL), "chips"] == 4
    assert table.loc[(ALL, ALL), "nodata_fraction"] == pytest.approx(60 / 400)
    assert table.loc[(ALL, ALL), "max_chip_nodata"] == 0.5


def test_positive_by_group_by_hand(chip_table: pd.DataFrame) -> None:
    table = positive_by_group(chip_table, threshold=0.05).set_index(["split", "region"])
    assert table.loc[("train", "a"), "positive_chips"] == 1
    assert table.loc[("train", "a"), "positive_chip_share"] == pytest.approx(0.5)
    assert table.loc[("train", ALL), "positive_pixel_fraction"] == pytest.approx(19 / 240)
    assert table.loc[("val", "a"), "positive_chips"] == 0  # 1/80 is below 0.05
    assert table.loc[(ALL, ALL), "positive_pixel_fraction"] == pytest.approx(20 / 320)
    assert prefilter_dropped_fraction(chip_table) == pytest.approx(0.25)
    with pytest.raises(AuditInputError, match="region"):
        positive_by_group(chip_table.drop(columns="region"))


# --------------------------------------------------------------------------- figures


def test_agreement_scatter_marks_prefilter_drops() -> None:
    table = pd.DataFrame(
        {
            "label_fraction": [0.1, 0.2, 0.0],
            "water_fraction": [0.1, 0.6, 0.3],
            "split": ["train", "train", "val"],
            "prefilter_keep": [True, False, False],
        }
    )
    ax = agreement_scatter(table).axes[0]
    labels = [collection.get_label() for collection in ax.collections]
    assert labels == ["train (1)", "train (pre-filter drop) (1)", "val (pre-filter drop) (1)"]
    np.testing.assert_allclose(ax.collections[1].get_offsets(), [[0.2, 0.6]])
    with pytest.raises(ValueError, match="water_fraction"):
        agreement_scatter(table.drop(columns="water_fraction"))


def test_band_histogram_figure_draws_one_panel_per_band_with_percentile_lines() -> None:
    sample = np.column_stack([np.arange(100.0), np.arange(100.0) * 2])
    stats = pd.DataFrame({"band": ["x", "y"], "p1": [1.0, 2.0], "p99": [98.0, 196.0]})
    fig = band_histogram_figure(sample, ["x", "y"], stats, ncols=5)
    assert [ax.get_title() for ax in fig.axes] == ["x", "y"]
    assert [line.get_xdata()[0] for line in fig.axes[1].lines] == [2.0, 196.0]
    assert sum(patch.get_height() for patch in fig.axes[0].patches) == 100
    with pytest.raises(ValueError, match="3"):
        band_histogram_figure(sample, ["x", "y", "z"])


# --------------------------------------------------------------------------- composites


def test_hillshade_follows_the_sun() -> None:
    flat = hillshade(np.zeros((5, 5)), altitude=45.0)
    np.testing.assert_allclose(flat, math.sin(math.radians(45.0)))
    # a 45° slope facing the sun at 315° (north-west) and 45° altitude faces it squarely: illumination 1
    rows, cols = np.mgrid[0:5, 0:5].astype(float)
    step = 10.0 / math.sqrt(2)  # per 10 m pixel, so the gradient has magnitude 1 (45°)
    facing = rows * step + cols * step  # rises to the south (rows) and east (cols): faces north-west
    np.testing.assert_allclose(hillshade(facing, 10.0, 315.0, 45.0)[1:-1, 1:-1], 1.0, atol=1e-9)
    away = -facing  # faces south-east, away from the sun: normal at 90° to the sun
    np.testing.assert_allclose(hillshade(away, 10.0, 315.0, 45.0), 0.0, atol=1e-9)


def test_composite_channels_by_name_ratio_and_difference() -> None:
    image = np.stack([np.full((2, 2), 4.0), np.full((2, 2), 2.0), np.zeros((2, 2))])
    names = ["VV", "VH", "Z"]
    np.testing.assert_allclose(composite_channel(image, names, "VV-VH"), 2.0)
    np.testing.assert_allclose(composite_channel(image, names, "VV/VH"), 2.0)
    np.testing.assert_allclose(composite_channel(image, names, "VV/Z"), 0.0)  # division by zero shows 0
    with pytest.raises(CompositeError, match="'B12'"):
        composite_channel(image, names, "B12")


def test_composite_stretches_each_channel_over_valid_pixels() -> None:
    ramp = np.arange(16, dtype=np.float64).reshape(4, 4)
    image = np.stack([ramp, 100 - ramp, np.full((4, 4), 7.0)])
    valid = np.ones((4, 4), dtype=bool)
    valid[0, 0] = False
    out = composite(image, ["r", "g", "b"], ("r", "g", "b"), valid, percentiles=(0.0, 100.0))
    assert out.shape == (4, 4, 3)
    np.testing.assert_allclose(out[..., 0][valid], (ramp[valid] - 1) / 14)  # valid values run 1..15
    np.testing.assert_allclose(out[..., 1][valid], (15 - ramp[valid]) / 14)  # values 85..99
    np.testing.assert_allclose(out[..., 2], 0.0)  # a constant band has no contrast
    np.testing.assert_allclose(out[0, 0], 0.0)  # nodata is black
    swapped = composite(image, ["r", "g", "b"], ("g", "r", "b"), valid, percentiles=(0.0, 100.0))
    np.testing.assert_allclose(swapped[..., 0], out[..., 1])
    with pytest.raises(CompositeError, match="1 or 3"):
        composite(image, ["r", "g", "b"], ("r", "g"), valid)


def test_hillshade_composite_is_grey_and_unstretched() -> None:
    image = np.zeros((1, 3, 3))
    out = composite(image, ["DEM"], ("hillshade(DEM)",))
    np.testing.assert_allclose(out, math.sin(math.radians(45.0)))


def test_available_composites_keep_only_computable_ones() -> None:
    found = available_composites(["B02", "B03", "B04", "B08", "DEM"])
    assert set(found) == {"true colour (B04/B03/B02)", "false colour (B08/B04/B03)", "DEM hillshade"}
    assert available_composites(["VV", "VH"], {"sar": ("VV", "VH", "VV-VH"), "bad": ("VV", "VH")}) == {
        "sar": ("VV", "VH", "VV-VH")
    }


def test_label_rgb_colours() -> None:
    label = np.array([[0, 1], [IGNORE_INDEX, 1]])
    valid = np.array([[True, True], [True, False]])
    out = label_rgb(label, valid)
    np.testing.assert_allclose(out[0, 1], to_rgb(WATER_BLUE))
    np.testing.assert_allclose(out[1, 1], to_rgb(INVALID_GREY))
    assert out[0, 0].max() < 0.2 and out[1, 0].min() > 0.7


# --------------------------------------------------------------------------- chip explorer


def _png(data: bytes) -> np.ndarray:
    import io

    return imread(io.BytesIO(data), format="png")


def test_chip_explorer_follows_its_controls(store: Path, chips: list[dict[str, np.ndarray]]) -> None:
    catalog = read_catalog(store)
    explorer = chip_explorer(store, catalog, BANDS)
    assert _png(explorer.image.value).ndim == 3
    assert explorer.chip.value == "chip0"
    assert list(explorer.choice.options) == [
        "true colour (B04/B03/B02)",
        "false colour (B08/B04/B03)",
        "SWIR (B12/B8A/B04)",
        "SAR (VV/VH/VV-VH dB ratio)",
        "DEM hillshade",
        CUSTOM,
    ]

    explorer.split.value = "val"
    assert list(explorer.chip.options) == ["chip5", "chip6"]
    assert explorer.chip.value == "chip5" and explorer.position.max == 1
    explorer.position.value = 1
    assert explorer.chip.value == "chip6"
    assert "chip6" in explorer.caption.value

    before = explorer.image.value
    explorer.choice.value = "SWIR (B12/B8A/B04)"
    assert explorer.image.value != before
    fig = explorer.figure()
    assert fig is not None
    shown = fig.axes[0].images[0].get_array()
    chip = chips[6]
    np.testing.assert_allclose(shown, composite(chip["image"], BANDS, ("B12", "B8A", "B04"), chip["valid"]))

    explorer.choice.value = CUSTOM
    assert not explorer.custom[0].disabled
    for control, name in zip(explorer.custom, ("VV", "VH", "DEM")):
        control.value = name
    assert explorer.bands() == ("VV", "VH", "DEM")
    fig = explorer.figure()
    assert fig is not None and fig.axes[0].get_title() == "VV / VH / DEM"
    explorer.chip.value = "chip5"
    assert explorer.position.value == 0


# --------------------------------------------------------------------------- split map


def test_folium_split_map_has_a_layer_per_split_and_saves_html(store: Path, tmp_path: Path) -> None:
    catalog = read_catalog(store)
    fmap = split_map(catalog, backend="folium", basemap=False)
    html = fmap.get_root().render()
    for split, count in pd.Series(SPLITS).value_counts().items():
        assert f"{split} ({count})" in html
    assert "chip3" in html
    path = save_map_html(fmap, tmp_path / "figures" / "split_map.html")
    assert path.read_text(encoding="utf-8").count("circle_marker") >= len(SPLITS)
    with pytest.raises(ValueError, match="HTML"):
        save_map_html(fmap, tmp_path / "map.png")
    with pytest.raises(ValueError, match="backend"):
        split_map(catalog, backend="kepler")
    with pytest.raises(AuditInputError, match="lat"):
        split_map(catalog.drop(columns="lat"))


@pytest.mark.slow
def test_leafmap_split_map_builds_without_a_display(store: Path) -> None:
    lmap = split_map(read_catalog(store), backend="leafmap")
    names = [layer.name for layer in lmap.layers]
    assert "train (5)" in names and "test (2)" in names


# --------------------------------------------------------------------------- loader check


def good_batch(index: list[int], size: int = 4, n_bands: int = 3) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(sum(index))
    label = torch.zeros(len(index), size, size, dtype=torch.int64)
    label[0, :2, :2] = 1
    label[-1, -1, -1] = IGNORE_INDEX
    return {
        "image": torch.randn(len(index), n_bands, size, size, generator=generator),
        "label": label,
        "valid": torch.ones(len(index), size, size, dtype=torch.bool),
        "target": (label == 1).float(),
        "index": torch.tensor(index),
    }


def test_check_batches_passes_good_batches_and_tabulates_balance() -> None:
    batches = [good_batch([0, 1]), good_batch([2, 3])]
    report = check_batches(batches, band_names=["a", "b", "c"], method="none")
    assert report.ok and not report.problems
    assert list(report.batches["batch"]) == [0, 1]
    # 4 positive of 31 scored pixels (one ignored); one of two chips is positive
    assert report.batches.loc[0, "positive_pixel_fraction"] == pytest.approx(4 / 31)
    assert report.batches.loc[0, "positive_chip_share"] == pytest.approx(0.5)
    assert report.batches.loc[0, "ignore_fraction"] == pytest.approx(1 / 32)
    assert list(report.bands["band"]) == ["a", "b", "c"]
    pooled = torch.cat([batch["image"] for batch in batches]).transpose(0, 1).reshape(3, -1).double()
    np.testing.assert_allclose(report.bands["mean"], pooled.mean(dim=1).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(report.bands["std"], pooled.std(dim=1, unbiased=False).numpy(), rtol=1e-6)


def test_check_batches_names_the_chip_with_a_nan() -> None:
    bad = good_batch([16, 17, 18])
    bad["image"][1, 0, 2, 2] = float("nan")
    ids = [f"id{n}" for n in range(20)]
    report = check_batches([good_batch([0, 1, 2]), bad], chip_ids=ids, method="none")
    assert not report.ok
    assert len(report.problems) == 1
    assert "batch 1" in report.problems[0] and "chip 17 (id17)" in report.problems[0]
    assert report.batches.loc[1, "n_nonfinite"] == 1


def test_check_batches_detects_wrong_labels_dtypes_shapes_and_targets() -> None:
    batch = good_batch([5, 6])
    batch["label"][1, 0, 0] = 3
    report = check_batches([batch], allowed_labels=allowed_label_values(1), method="none")
    assert not report.ok and "chip 6" in report.problems[0] and "[3]" in report.problems[0]
    assert check_batches([batch], allowed_labels=allowed_label_values(4), method="none").ok

    wrong_dtype = good_batch([0, 1])
    wrong_dtype["valid"] = wrong_dtype["valid"].float()
    assert any("valid has dtype" in text for text in check_batches([wrong_dtype]).problems)

    smaller = good_batch([2, 3], size=2)
    report = check_batches([good_batch([0, 1]), smaller], method="none")
    assert any("the first batch had" in text for text in report.problems)

    wrong_bands = check_batches([good_batch([0, 1])], band_names=["a", "b"], method="none")
    assert any("3 bands, expected 2" in text for text in wrong_bands.problems)

    soft = good_batch([0, 1])
    soft["target"][0, 0, 0] = 1.5
    assert any("target of chip 0" in text for text in check_batches([soft]).problems)

    def broken() -> Any:
        yield good_batch([0, 1])
        raise OSError("chunk file truncated")

    report = check_batches(broken(), method="none")
    assert not report.ok and "OSError: chunk file truncated" in report.problems[0]
    assert not check_batches([]).ok


def test_band_warnings_only_for_zscore() -> None:
    bands = pd.DataFrame({"band": ["a", "b", "c"], "mean": [0.1, 2.0, 0.0], "std": [1.0, 1.0, 5.0]})
    found = band_warnings(bands, "zscore")
    assert len(found) == 2 and "band b" in found[0] and "band c" in found[1]
    assert band_warnings(bands, "percentile") == []


# --------------------------------------------------------------------------- real loader and stage


def test_headless_modules_import_no_widget_or_map_library() -> None:
    """Only workbench.audit.explorer imports ipywidgets; maps import folium/leafmap when they build one."""
    code = (
        "import sys\n"
        "import workbench.audit, workbench.audit.check, workbench.audit.figures, workbench.audit.maps\n"
        "import workbench.audit.stats, workbench.data.agreement, workbench.review, workbench.stages\n"
        "loaded = [name for name in ('ipywidgets', 'ipyleaflet', 'leafmap', 'folium') if name in sys.modules]\n"
        "assert not loaded, loaded\n"
        "import workbench.audit.explorer\n"
        "assert 'ipywidgets' in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def store_params(store: Path) -> Any:
    from workbench.params import Params

    return Params.model_validate(
        {
            "experiment": "audit-test",
            "data": {
                "source": "store",
                "store": str(store),
                "split": {"method": "catalog"},
                "batch_size": 2,
                "augment": {"rot90": 0.5, "spectral_jitter": 0.5, "copy_paste": 0.5, "copy_paste_min_pixels": 1},
                "sampler": {"kind": "balanced"},
            },
        }
    )


def test_check_data_iterates_the_real_training_loader(store: Path, tmp_path: Path) -> None:
    from workbench.audit import check_data
    from workbench.data.prepare import prepare_data

    params = store_params(store)
    prepared = prepare_data(params.data, tmp_path / "run")
    report = check_data(params, prepared, n_batches=2, progress=False)
    assert report.ok, report.summary()
    assert list(report.batches["n_samples"]) == [2, 3]  # 5 train chips: the one-chip remainder is merged
    assert list(report.bands["band"]) == BANDS
    # z-scored with train statistics: train batches are centred near 0 with unit spread
    assert report.bands["mean"].abs().max() < 1.0


@pytest.mark.slow
def test_data_audit_stage_writes_tables_figures_and_a_passing_loader_check(store: Path, tmp_path: Path) -> None:
    from workbench.stages import run_data_audit

    result = run_data_audit(store_params(store), tmp_path / "run", check_batches=4, progress=False)
    metrics = result.metrics
    assert metrics["data.check_ok"] is True, result.tables["audit_messages"]
    assert metrics["data.n_chips"] == len(SPLITS)
    chips = pd.read_parquet(tmp_path / "run" / "diagnostics" / "data_audit_chips.parquet")
    assert list(chips["chip_id"]) == [f"chip{n}" for n in range(len(SPLITS))]
    expected_nodata = 1.0 - chips["n_valid"].sum() / (len(SPLITS) * SIZE * SIZE)
    assert metrics["data.nodata_fraction"] == pytest.approx(expected_nodata)
    assert metrics["data.prefilter_dropped_fraction"] == pytest.approx((~chips["prefilter_keep"]).mean())
    for name in ("band_stats", "nodata", "positive_by_split_region", "prefilter", "check_data", "check_bands"):
        assert len(result.tables[name]), name
    assert result.tables["check_data"]["n_samples"].sum() == SPLITS.count("train")  # one epoch: 3 batches
    for name in ("band_histograms", "class_balance", "split_map", "agreement_scatter", "nodata", "positive_by_region"):
        assert imread(result.figures[name]).ndim == 3
    assert (tmp_path / "run" / "figures" / "split_map.html").is_file()

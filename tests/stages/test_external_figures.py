"""Figures of a `workbench evaluate` run: calibration figures, per-chip distribution and the worst chips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.cli import main
from workbench.data.ingest import ingest
from workbench.data.normalize import NormalizationStats
from workbench.figures.calibration import plot_per_chip_distribution
from workbench.models.bundle import save_bundle, write_calibration
from workbench.models.factory import build_model
from workbench.params import ModelParams, load_params
from workbench.run import RunLayout
from workbench.stages.external import evaluate_external

LANDSAT = ["Blue", "Green", "Red", "NIR", "SWIR16", "SWIR22"]


def _scene(path: Path, size: int = 128, seed: int = 0) -> None:
    """An ukis-csmask-like scene: 6 bands, a cloud (4) rectangle of another size in each 32 px chip."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.0, 0.3, (size, size, 6)).astype(np.float32)
    mask = np.full((size, size), 3, np.uint8)
    for row in range(0, size, 32):
        for col in range(0, size, 32):
            h, w = rng.integers(4, 30, 2)
            mask[row : row + h, col : col + w] = 4
            image[row : row + h, col : col + w, :4] += 0.5  # clouds are bright in the visible and NIR
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, img=image, msk=mask[..., None])


@pytest.fixture
def evaluated(tmp_path: Path) -> tuple[Path, Path]:
    """(source run, its store): a Landsat-named model (random weights) with a review index and RGB bands."""
    _scene(tmp_path / "raw" / "a.npz", seed=1)
    _scene(tmp_path / "raw2" / "b.npz", seed=2)
    ingest("ukis-csmask", tmp_path / "raw" / "a.npz", tmp_path / "src", chip_size=32, progress=False)
    ingest("ukis-csmask", tmp_path / "raw2" / "b.npz", tmp_path / "other", chip_size=32, progress=False)
    overrides = [
        "experiment=clouds",
        f"data.store={tmp_path / 'src'}",
        "data.source=store",
        "data.rgb_bands=[Red, Green, Blue]",
        "data.green_band=Green",
        "data.swir_band=SWIR16",
    ]
    run = RunLayout(tmp_path / "reports" / "clouds" / "src")
    run.data.mkdir(parents=True)
    run.freeze_params(load_params(None, overrides))
    pd.read_parquet(tmp_path / "src" / "catalog.parquet").to_parquet(run.catalog)
    (run.root / "run.json").write_text(json.dumps({"experiment": "clouds", "status": "complete"}))
    torch.manual_seed(0)
    model_params = ModelParams(architecture="satunet", base_channels=8)
    model = build_model(model_params, 6, LANDSAT, ["L"] * 6).eval()
    stats = NormalizationStats(LANDSAT, "zscore", mean=[0.3] * 6, std=[0.2] * 6)
    save_bundle(run.model, model, model_params, LANDSAT, ["L"] * 6, stats)
    write_calibration(run.model, {"temperature": 1.5, "threshold": 0.45})
    return run.root, tmp_path / "other"


def test_worst_chip_figures_are_the_n_lowest_iou_chips_of_the_per_chip_table(evaluated, tmp_path: Path):
    source, store = evaluated
    run_dir, metrics = evaluate_external(source, store, reports=tmp_path / "reports", n_worst=3)
    layout = RunLayout(run_dir)
    table = pd.read_parquet(layout.per_chip("test"))
    assert len(table) == 16
    # independent expectation: IoU from the counts, NaN (no positive anywhere) last, three lowest
    iou = table["tp"] / (table["tp"] + table["fp"] + table["fn"]).replace(0, np.nan)
    order = np.argsort(np.where(iou.isna(), np.inf, iou.to_numpy()), kind="stable")[:3]
    expected = [f"{rank:02d}_{chip}.png" for rank, chip in enumerate(table["chip_id"].iloc[order], start=1)]
    shown = sorted(path.name for path in (layout.figures / "external_worst").glob("*.png"))
    assert shown == expected
    info = json.loads(layout.info.read_text())
    assert {"reliability", "pr_curves", "per_chip_iou"} <= set(info["figures"])
    for name in ("reliability", "pr_curves", "per_chip_iou"):
        assert layout.figure(name).stat().st_size > 10_000  # rendered, not empty canvases
    assert info["figures"][f"external_worst/{expected[0][:-4]}"] == f"figures/external_worst/{expected[0]}"
    assert metrics["test.calibrated.n_chips"] == 16


def test_evaluate_command_shows_the_figures_on_the_landing_page(evaluated, tmp_path: Path, capsys):
    source, store = evaluated
    reports = tmp_path / "reports"
    assert main(["evaluate", str(source), str(store), "--reports", str(reports), "--worst", "2"]) == 0
    run_dir = Path(capsys.readouterr().out.split("external evaluation: ")[1].split()[0])
    page = RunLayout(run_dir).landing.read_text()
    assert "figures/per_chip_iou.png" in page and "figures/reliability.png" in page
    assert page.count('src="figures/external_worst/') == 2  # the two worst chips, shown
    assert run_dir.name in (reports / "index.html").read_text()


def test_store_normalisation_rescales_a_store_in_other_units(evaluated, tmp_path: Path):
    """Digital numbers (x 10000) against a reflectance model: the store's own statistics undo the scale."""
    source, store = evaluated
    data = np.load(tmp_path / "raw2" / "b.npz")
    np.savez(tmp_path / "dn.npz", img=data["img"] * 10000.0, msk=data["msk"])
    ingest("ukis-csmask", tmp_path / "dn.npz", tmp_path / "dn", chip_size=32, progress=False)
    reports = tmp_path / "reports"
    _, own = evaluate_external(source, tmp_path / "dn", reports=reports, normalize="store", n_worst=0)
    _, reflectance = evaluate_external(source, store, reports=reports, normalize="store", n_worst=0)
    _, model = evaluate_external(source, tmp_path / "dn", reports=reports, n_worst=0)
    # zscore over the store is invariant to the scale, so the scores match the reflectance store's
    assert own["test.calibrated.iou"] == pytest.approx(reflectance["test.calibrated.iou"], abs=1e-6)
    assert model["test.calibrated.iou"] != pytest.approx(own["test.calibrated.iou"], abs=1e-3)


def test_per_chip_distribution_counts_and_marks():
    values = np.array([0.05, 0.1, 0.12, 0.5, 0.55, 0.9, np.nan])
    fig = plot_per_chip_distribution({"calibrated": values}, marked=values[:2], bins=10)
    ax = fig.axes[0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend[0] == "calibrated (n=6, median 0.310)"
    ticks = next(line for line in ax.get_lines() if line.get_label() == "worst chips shown")
    np.testing.assert_allclose(ticks.get_xdata(), [0.05, 0.1])
    heights = list(ax.patches)
    assert heights  # the step histogram is drawn
    counts, _ = np.histogram(values[np.isfinite(values)], bins=np.linspace(0, 1, 11))
    step = heights[0].get_xy()  # step outline: the top edge of bin i is at y = counts[i]
    tops = [y for (x, y) in step[1:-1:2]]
    np.testing.assert_array_equal(tops[: len(counts)], counts)

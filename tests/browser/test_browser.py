"""End to end in headless Chromium: a notebook in JupyterLab as a researcher uses it, and the offline reports.

One tiny demo run (48 chips of 32 px) is made by the pipeline (notebook 01 executed by papermill, HTML
report, map, index and landing page); JupyterLab is then opened on that run. A second tiny run is taken
through stages 01-03 in this process (seconds, no kernels) so that notebook 04 can be opened on it and its
review map driven. Screenshots are written to reports/browser/ for a look.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import tiny_demo_params
from harness import (
    block_remote_requests,
    chromium_executable,
    error_outputs,
    jupyter_lab,
    notebook_kind,
    open_notebook,
    run_all_cells,
    widget,
)

from workbench.data.ledger import Ledger, ledger_path
from workbench.params import dump_params
from workbench.pipeline import run_pipeline
from workbench.run import DATA_AUDIT, REVIEW, RunLayout, index_file
from workbench.stages import run_calibration, run_data_audit, run_training

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "reports" / "browser"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> RunLayout:
    """A demo run of 48 chips whose data audit (notebook 01) was executed by the pipeline."""
    base = tmp_path_factory.mktemp("browser")
    params_file = base / "tiny.yaml"
    dump_params(tiny_demo_params(base / "store"), params_file)
    result = run_pipeline(params_file, reports=base / "reports", notebooks=[DATA_AUDIT.notebook], progress=False)
    return RunLayout(result.run_dir)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> RunLayout:
    """A demo run of 48 chips through data audit, training and calibration: ready for notebook 04."""
    base = tmp_path_factory.mktemp("review")
    params = tiny_demo_params(base / "store", "review.n_figures=2")
    layout = RunLayout.at(base / "reports", params.experiment, "trained")
    layout.root.mkdir(parents=True)
    layout.freeze_params(params)
    run_data_audit(params, layout.root, progress=False)
    run_training(params, layout.root)
    run_calibration(params, layout.root)
    return layout


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_executable()
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield chromium
        chromium.close()


def test_notebook_01_runs_in_jupyterlab_and_the_explorer_follows_its_composite(
    tiny_run: RunLayout, browser: Any, tmp_path: Path
) -> None:
    root = tmp_path / "lab"
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("*.ipynb"))
    with jupyter_lab(root, run_dir=tiny_run.root, log=tmp_path / "lab.log") as url:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        try:
            open_notebook(page, url, "notebooks/01_data_audit.py")
            assert notebook_kind(page) == "notebook"  # the .py opened as a notebook on a plain open
            run_all_cells(page)
            assert error_outputs(page) == []
            composite = widget(page, "composite", ".widget-dropdown")
            composite.scroll_into_view_if_needed()
            image = page.locator(".widget-image").first
            page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            before = image.screenshot(path=str(SCREENSHOTS / "explorer-true-colour.png"))
            composite.locator("select").select_option(label="SWIR (B12/B8A/B04)")
            page.wait_for_function(
                "([img, src]) => img.src !== src && img.complete && img.naturalWidth > 0",
                arg=[image.element_handle(), image.get_attribute("src")],
            )
            after = image.screenshot(path=str(SCREENSHOTS / "explorer-swir.png"))
            assert after != before
            page.screenshot(path=str(SCREENSHOTS / "lab-01-data-audit.png"))
        finally:
            context.close()
    script = "notebooks/01_data_audit.py"
    assert (root / script).read_text() == (ROOT / script).read_text()  # running it changed nothing tracked


def test_reports_open_from_files_without_internet_and_render_maps_and_widgets(
    tiny_run: RunLayout, browser: Any
) -> None:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    attempted = block_remote_requests(context)
    page = context.new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    try:
        reports = tiny_run.root.parents[1]
        page.goto(index_file(reports).as_uri())
        rows = page.locator("#runs tbody tr")
        assert rows.count() == 1
        page.fill("#filter", "no-such-run")
        assert rows.first.is_hidden()
        page.fill("#filter", tiny_run.root.name)
        assert rows.first.is_visible()
        page.screenshot(path=str(SCREENSHOTS / "index.png"))
        page.locator("#runs tbody tr a", has_text=tiny_run.root.name).click()
        page.wait_for_load_state()
        assert page.url.endswith(f"{tiny_run.root.name}/index.html")
        figures = page.locator("img.figure")
        assert figures.count() >= 5
        assert page.evaluate("() => [...document.images].every((img) => img.complete && img.naturalWidth > 0)")

        page.goto(tiny_run.figure("split_map", ".html").as_uri())
        page.wait_for_function("() => window.L && document.querySelectorAll('path.leaflet-interactive').length > 0")
        n_points = page.locator("path.leaflet-interactive").count()
        assert n_points == len(pd.read_parquet(tiny_run.catalog))  # every chip centre is drawn
        page.screenshot(path=str(SCREENSHOTS / "split-map.png"))

        page.goto(tiny_run.notebook_html(DATA_AUDIT.notebook).as_uri())
        snapshots = page.locator(".widget-snapshot")
        assert snapshots.count() >= 3  # progress bars, the leafmap note, the chip explorer
        explorer = snapshots.filter(has=page.locator("img")).last
        explorer.scroll_into_view_if_needed()
        assert page.evaluate("() => [...document.images].every((img) => img.complete && img.naturalWidth > 0)")
        assert "composite: " in explorer.inner_text()
        explorer.screenshot(path=str(SCREENSHOTS / "report-explorer-snapshot.png"))
    finally:
        context.close()
    assert attempted == [], f"requests that would leave the machine: {attempted}"
    assert failed == []


def test_notebook_04_review_map_records_a_decision_for_the_top_chip_in_the_ledger(
    trained_run: RunLayout, browser: Any, tmp_path: Path
) -> None:
    params = trained_run.frozen_params()
    assert params is not None
    store = params.data.store
    ledger_file = ledger_path(store)
    assert not ledger_file.exists()  # no decision taken on this store yet
    root = tmp_path / "lab"
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("*.ipynb"))
    with jupyter_lab(root, run_dir=trained_run.root, log=tmp_path / "lab.log") as url:
        context = browser.new_context(viewport={"width": 1600, "height": 1200})  # the whole review map in view
        attempted = block_remote_requests(context)
        page = context.new_page()
        try:
            open_notebook(page, url, f"notebooks/{REVIEW.notebook}.py")
            run_all_cells(page)
            assert error_outputs(page) == []
            ranking = pd.read_parquet(trained_run.review_ranking)  # written by the notebook's run_review
            top = str(ranking.sort_values("rank")["chip_id"].iloc[0])

            review_map = page.locator(".workbench-review-map")
            review_map.evaluate("(element) => element.scrollIntoView({block: 'center'})")  # clear of the toolbar
            footprints = review_map.locator(".leaflet-overlay-pane path.leaflet-interactive")
            page.wait_for_function(
                "([map, n]) => map.querySelectorAll('.leaflet-overlay-pane path.leaflet-interactive').length === n"
                " && [...map.querySelectorAll('img.leaflet-image-layer')].some((img) => img.complete"
                " && img.naturalWidth > 0 && img.src.startsWith('data:image/png'))",
                arg=[review_map.element_handle(), len(ranking)],
            )
            assert footprints.count() == len(ranking)  # one footprint polygon per ranked chip
            # the map is centred on the top chip, its label-noise image large enough to read, inside the map
            frame = review_map.locator(".leaflet-container").bounding_box()
            noise = review_map.locator("img.leaflet-image-layer").first.bounding_box()
            assert frame is not None and noise is not None and noise["width"] > 40 and noise["height"] > 40
            assert frame["x"] < noise["x"] < noise["x"] + noise["width"] < frame["x"] + frame["width"]
            assert frame["y"] < noise["y"] < noise["y"] + noise["height"] < frame["y"] + frame["height"]
            panels = review_map.locator(".workbench-review-panels img")  # the chip's four-panel figure
            page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=panels.element_handle())
            assert "Figure size" not in review_map.inner_text()
            title = review_map.locator(".workbench-review-title")
            assert title.inner_text().startswith(f"{top} · rank 1 ")
            review_map.screenshot(path=str(SCREENSHOTS / "lab-04-review-map.png"))

            review_map.locator(".workbench-review-reviewer input").fill("browser test")
            review_map.locator(".workbench-review-decision-drop").click()
            status = review_map.locator(".workbench-review-status")
            status.get_by_text(f"saved: {top} → drop").wait_for()
            page.wait_for_function(  # the map moved on to the second chip of the ranking
                "(title) => title.textContent.includes(' · rank 2 ')", arg=title.element_handle()
            )
            review_map.screenshot(path=str(SCREENSHOTS / "lab-04-review-map-after-drop.png"))
            page.screenshot(path=str(SCREENSHOTS / "lab-04-label-noise-review.png"))
        finally:
            context.close()
    assert attempted == [], f"requests that would leave the machine: {attempted}"

    lines = ledger_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2  # the header naming the store, and exactly one decision
    entry = json.loads(lines[1])
    assert (entry["chip_id"], entry["decision"], entry["reviewer"]) == (top, "drop", "browser test")
    assert Ledger.for_store(store).dropped() == {top}  # what later runs will apply
    script = f"notebooks/{REVIEW.notebook}.py"
    assert (root / script).read_text() == (ROOT / script).read_text()

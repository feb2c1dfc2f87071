"""End to end in headless Chromium: a notebook in JupyterLab as a researcher uses it, and the offline reports.

One tiny demo run (48 chips of 32 px) is made by the pipeline (notebook 01 executed by papermill, HTML
report, map, index and landing page); JupyterLab is then opened on that run. Screenshots are written to
reports/browser/ for a look.
"""

from __future__ import annotations

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

from workbench.params import dump_params
from workbench.pipeline import run_pipeline
from workbench.run import DATA_AUDIT, RunLayout, index_file

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

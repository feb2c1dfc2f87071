"""Report pages: the run index, run landing pages, offline notebook HTML, offline maps, one figure per plot."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd

from workbench.io import write_json_atomic
from workbench.report_pages import (
    export_offline_html,
    reports_index_page,
    static_widget_outputs,
    write_reports_index,
)
from workbench.run import RunLayout

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
REMOTE = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def fake_run(reports: Path, run_id: str, started: str, iou: float, params_file: str = "params/demo.yaml") -> RunLayout:
    layout = RunLayout.at(reports, "demo", run_id)
    layout.figures.mkdir(parents=True)
    write_json_atomic(
        layout.info,
        {
            "experiment": "demo",
            "run_id": run_id,
            "started": started,
            "status": "complete",
            "params_file": params_file,
            "overrides": [],
            "git_commit": "abc",
            "git_dirty": True,
            "notebooks": {"01_data_audit": {"status": "ok", "seconds": 1.5}},
        },
    )
    write_json_atomic(layout.metrics, {"test.iou": iou, "review.top_k_recall": 0.9, "data.check_ok": True})
    layout.notebook_html("01_data_audit").write_text("<html></html>")
    layout.figure("split_map").write_bytes(PNG)
    layout.figure("split_map", ".html").write_text("<html></html>")
    return layout


def test_index_lists_runs_newest_first_with_stage_metrics_landing_links_and_seed_tables(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    old = fake_run(reports, "r-old", "2026-01-01T00:00:00", 0.5)
    new = fake_run(reports, "r-new", "2026-02-01T00:00:00", 0.875, params_file="<script>alert(1)</script>.yaml")
    (reports / "demo" / "seeds-1.csv").write_text("metric,mean,std\ntest.iou,0.8,0.01\n")
    index = write_reports_index(reports)
    page = index.read_text()
    assert page.index("r-new") < page.index("r-old")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="demo/r-new/index.html"' in page and 'href="demo/r-old/01_data_audit.html"' in page
    assert 'data-sort="0.875">0.8750<' in page  # numbers sort by value, show 4 decimals
    assert 'id="filter"' in page and "addEventListener" in page  # filter box and sortable columns
    assert "02 test IoU" in page and "04 top-k recall" in page and "01 loader ok" in page
    assert 'href="demo/seeds-1.csv"' in page and "<td>0.8</td>" in page
    assert not REMOTE.search(page)
    landing = new.landing.read_text()
    assert 'href="01_data_audit.html"' in landing and 'src="figures/split_map.png"' in landing
    assert 'href="figures/split_map.html"' in landing and "test.iou" in landing and "0.8750" in landing
    assert "uncommitted changes" in landing and "&lt;script&gt;" in landing and "<script>alert" not in landing
    assert old.landing.is_file()


def test_index_of_no_runs_says_so(tmp_path: Path) -> None:
    assert "0</span> of 0 run(s)" in reports_index_page(tmp_path)


def widget_notebook() -> nbformat.NotebookNode:
    ref = "IPY_MODEL_"
    state = {
        "box": {"model_name": "VBoxModel", "state": {"children": [ref + "drop", ref + "img", ref + "bar"]}},
        "drop": {
            "model_name": "DropdownModel",
            "state": {"description": "split", "_options_labels": ["all", "train"], "index": 1},
        },
        "img": {
            "model_name": "ImageModel",
            "state": {"format": "png"},
            "buffers": [{"path": ["value"], "encoding": "base64", "data": base64.b64encode(PNG).decode()}],
        },
        "bar": {"model_name": "FloatProgressModel", "state": {"value": 320, "max": 320}},
        "map": {"model_name": "LeafletMapModel", "state": {}},
    }
    view = "application/vnd.jupyter.widget-view+json"
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state, "version_major": 2}}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Report"),
        nbformat.v4.new_code_cell(
            "explorer",
            outputs=[
                nbformat.v4.new_output("display_data", data={view: {"model_id": "box"}, "text/plain": "VBox(...)"}),
                nbformat.v4.new_output("display_data", data={view: {"model_id": "map"}, "text/plain": "Map(...)"}),
            ],
        ),
    ]
    return nb


def test_widget_outputs_become_static_snapshots_of_what_they_showed() -> None:
    nb = widget_notebook()
    assert static_widget_outputs(nb) == 2
    first, second = (output["data"] for output in nb.cells[1].outputs)
    assert f"data:image/png;base64,{base64.b64encode(PNG).decode()}" in first["text/html"]
    assert "split: <b>train</b>" in first["text/html"] and 'value="320" max="320"' in first["text/html"]
    assert "text/plain" not in first and "open the notebook in JupyterLab" in second["text/html"]
    assert "widgets" not in nb.metadata


def test_offline_html_loads_nothing_from_the_internet(tmp_path: Path) -> None:
    path = tmp_path / "01_data_audit.ipynb"
    nbformat.write(widget_notebook(), path)
    page = export_offline_html(path).read_text()
    assert not REMOTE.search(page), REMOTE.search(page)
    assert "require.min.js" not in page and "mathjax" not in page.lower() and "html-manager" not in page
    assert "data:image/png;base64," in page and "Report" in page


def test_saved_split_map_inlines_leaflet_and_requests_no_tiles_until_asked(tmp_path: Path) -> None:
    from workbench.audit.maps import save_map_html, split_map

    catalog = pd.DataFrame(
        {"lat": [46.0, 46.1, 46.2], "lon": [7.0, 7.1, 7.2], "split": ["train", "val", "test"], "chip_id": list("abc")}
    )
    page = save_map_html(split_map(catalog), tmp_path / "map.html").read_text()
    assert not REMOTE.search(page.replace('href="https://leafletjs.com"', ""))  # the attribution is a link
    assert "L.circleMarker" in page and "window.L" in page  # Leaflet itself is in the page
    assert "L.tileLayer(" in page and not re.search(r"L\.tileLayer\([^;]*\)\s*\.addTo\(", page)  # listed, not shown


def test_calibration_figures_are_not_kept_by_pyplot() -> None:
    import matplotlib.pyplot as plt

    from workbench.figures.calibration import plot_pr_curves, plot_reliability

    plt.close("all")
    table = pd.DataFrame({"confidence": [0.2, 0.8], "frequency": [0.25, 0.75], "count": [10, 10]})
    plot_reliability({"before": table})
    plot_pr_curves({"model": (np.array([1.0, 0.5]), np.array([0.0, 1.0]))})
    assert plt.get_fignums() == []  # a notebook shows them where displayed, not again at the cell's end

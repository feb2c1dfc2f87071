"""The browsable report pages: `reports/index.html`, each run's landing page and offline notebook HTML.

`write_reports_index` rewrites `<reports>/index.html` (every run, sortable by any column and filtered by
a text box, the key metrics of each stage, a link to each run's landing page, the multi-seed summaries)
and each run's `index.html` (its notebooks as HTML, figures, metrics and records). `export_offline_html`
renders an executed notebook to HTML that needs no internet: no script is loaded from a CDN, and each
widget output is replaced by a static snapshot of what it showed (images, text, progress), since a saved
widget cannot run without its kernel anyway. Every run field is HTML-escaped: run records are data.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from workbench.io import write_text_atomic
from workbench.run import FIGURES_DIR, NOTEBOOKS, STAGES, RunLayout, index_file, run_records
from workbench.runstatus import COMPLETE

# the key metrics of each stage, as (stage notebook, metric key, column title)
STAGE_METRICS: list[tuple[str, str, str]] = [
    ("01_data_audit", "data.n_chips", "chips"),
    ("01_data_audit", "data.min_cross_split_km", "split gap km"),
    ("01_data_audit", "data.check_ok", "loader ok"),
    ("02_train", "train.epochs", "epochs"),
    ("02_train", "val.iou", "val IoU"),
    ("02_train", "test.iou", "test IoU"),
    ("03_calibrate", "calibration.temperature", "temperature"),
    ("03_calibrate", "calibration.threshold", "threshold"),
    ("04_label_noise_review", "review.top_k_precision", "top-k precision"),
    ("04_label_noise_review", "review.top_k_recall", "top-k recall"),
    ("", "wall_seconds", "wall s"),
]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
TEMPLATE_DIR = Path(__file__).resolve().parent / "report_template"
SEED_SUMMARY_GLOB = "seeds-*.csv"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; }
th { background: #eee; cursor: pointer; user-select: none; } th.sorted-asc::after { content: " \\25B2"; }
th.sorted-desc::after { content: " \\25BC"; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.failed { color: #b00; font-weight: bold; } .complete { color: #070; } .running { color: #a60; }
div.wide { overflow-x: auto; max-width: 100%; }
img.figure { max-width: 480px; border: 1px solid #ddd; margin: 4px; } input#filter { width: 28em; padding: 4px; }
"""

SORT_FILTER_SCRIPT = """
document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("runs");
  if (!table) return;
  const body = table.tBodies[0];
  const filter = document.getElementById("filter");
  filter.addEventListener("input", () => {
    const words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
    for (const row of body.rows) {
      const text = row.textContent.toLowerCase();
      row.hidden = !words.every((word) => text.includes(word));
    }
    document.getElementById("shown").textContent = [...body.rows].filter((r) => !r.hidden).length;
  });
  table.tHead.querySelectorAll("th").forEach((th, column) => {
    th.addEventListener("click", () => {
      const ascending = !th.classList.contains("sorted-asc");
      table.tHead.querySelectorAll("th").forEach((h) => h.classList.remove("sorted-asc", "sorted-desc"));
      th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
      const key = (row) => row.cells[column].dataset.sort ?? row.cells[column].textContent.trim();
      const rows = [...body.rows].sort((a, b) => {
        const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
        const both = x !== "" && y !== "" && !isNaN(nx) && !isNaN(ny);
        if (x === "" || y === "") return (x === "") - (y === "");
        const order = both ? nx - ny : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach((row) => body.appendChild(row));
    });
  });
});
"""


def esc(value: Any) -> str:
    """Any value as escaped HTML text (quotes too, so it is safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def href(path: Path | str) -> str:
    """A relative link target: each path segment percent-encoded, then escaped for the attribute."""
    return esc(quote(Path(path).as_posix()))


def fmt(value: Any) -> str:
    """A metric as text: 4 decimals below 100, 1 above; booleans and others as they are."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style>{js}</head><body>\n{body}\n</body></html>\n"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def run_landing_page(run_dir: Path) -> str:
    """The landing page of one run: status, provenance, its notebooks as HTML, figures and all metrics."""
    layout = RunLayout(run_dir)
    info, metrics = _read_json(layout.info), _read_json(layout.metrics)
    status = info.get("status", "?")
    parts = [
        f"<h1>{esc(info.get('experiment', ''))} · {esc(info.get('run_id', run_dir.name))}</h1>",
        f'<p>status <span class="{esc(status)}">{esc(status)}</span> · started {esc(info.get("started", ""))}'
        f" · finished {esc(info.get('finished', ''))} · commit {esc(info.get('git_commit', ''))}"
        f"{' (with uncommitted changes)' if info.get('git_dirty') else ''}</p>",
        f"<p>parameters: {esc(' '.join([str(info.get('params_file', '')), *map(str, info.get('overrides', []))]))}"
        f' · <a href="{href(layout.params.name)}">params.yaml</a>'
        f' · <a href="{href(layout.info.name)}">run.json</a></p>',
    ]
    if info.get("error"):
        parts.append(f'<p class="failed">{esc(info["error"])}</p>')
    rows = []
    for name in NOTEBOOKS:
        record = info.get("notebooks", {}).get(name, {})
        page = layout.notebook_html(name)
        link = f'<a href="{href(page.name)}">{esc(name)}</a>' if page.is_file() else esc(name)
        rows.append(
            f"<tr><td>{link}</td><td>{esc(record.get('status', 'not run'))}</td>"
            f"<td class='num'>{esc(fmt(record.get('seconds')))}</td></tr>"
        )
    parts.append("<h2>Notebooks</h2><table><tr><th>notebook</th><th>status</th><th>seconds</th></tr>")
    parts.append("".join(rows) + "</table>")
    figures = figure_files(layout.root)
    if figures:
        parts.append("<h2>Figures</h2>")
        for figure in figures:
            rel = figure.relative_to(layout.root)
            if figure.suffix == ".png":
                image = f'<img class="figure" src="{href(rel)}" alt="{esc(rel)}" title="{esc(rel)}">'
                parts.append(f'<a href="{href(rel)}">{image}</a>')
            elif figure.suffix == ".html":
                parts.append(f'<p><a href="{href(rel)}">{esc(rel)}</a> (interactive map)</p>')
    if metrics:
        parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>")
        parts.append(
            "".join(
                f"<tr><td>{esc(key)}</td><td class='num'>{esc(fmt(value))}</td></tr>" for key, value in metrics.items()
            )
        )
        parts.append("</table>")
    parts.append('<p><a href="../../index.html">all runs</a></p>')
    return _page(f"run {info.get('run_id', run_dir.name)}", "\n".join(parts))


def _history(info: dict[str, Any]) -> str:
    """The attempts of a run (created, resumed, re-ran) with how each ended, as one line."""
    end = info.get("end") or {}
    where = " · ".join(
        str(end[k]) for k in ("stage", "signal", "cause") if end.get(k) and end.get("status") != COMPLETE
    )
    events = info.get("history", [])
    steps = "; ".join(f"{e.get('action', '?')} {e.get('started', '')} → {e.get('status', '?')}" for e in events)
    return " | ".join(part for part in (where, steps if len(events) > 1 else "") if part)


def _index_row(run_dir: Path, reports: Path) -> str:
    layout = RunLayout(run_dir)
    info, metrics = _read_json(layout.info), _read_json(layout.metrics)
    status = str(info.get("status", "?"))
    landing = layout.landing.relative_to(reports)
    notebooks = " ".join(
        f'<a href="{href(layout.notebook_html(name).relative_to(reports))}">{esc(name[:2])}</a>'
        for name in NOTEBOOKS
        if layout.notebook_html(name).is_file()
    )
    cells = [
        f"<td>{esc(info.get('started', ''))}</td>",
        f"<td>{esc(info.get('experiment', ''))}</td>",
        f'<td><a href="{href(landing)}">{esc(info.get("run_id", run_dir.name))}</a></td>',
        f'<td><span class="{esc(status)}">{esc(status)}</span></td>',
        f"<td>{esc(' '.join([str(info.get('params_file', '')), *map(str, info.get('overrides', []))]))}</td>",
    ]
    for _, key, _ in STAGE_METRICS:
        value = metrics.get(key)
        sort = "" if value is None or isinstance(value, bool) else esc(value)
        cells.append(f'<td class="num" data-sort="{sort}">{esc(fmt(value))}</td>')
    cells.append(f"<td>{notebooks}</td>")
    cells.append(f"<td>{esc(_history(info))}</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def seed_summaries(reports: Path) -> list[Path]:
    """The multi-seed mean ± std tables (`<reports>/<experiment>/seeds-*.csv`), newest first."""
    return sorted(Path(reports).glob(f"*/{SEED_SUMMARY_GLOB}"), key=lambda p: p.name, reverse=True)


def reports_index_page(reports: Path) -> str:
    """`<reports>/index.html`: every run (newest first), sortable and filterable, and the seed summaries."""
    reports = Path(reports)
    runs = sorted(
        (p.parent for p in run_records(reports)), key=lambda d: str(_read_json(d / "run.json").get("started", ""))
    )
    runs.reverse()
    stage_of = {stage.notebook: stage.notebook[:2] for stage in STAGES}
    head = "".join(f"<th>{esc(title)}</th>" for title in ("date", "experiment", "run", "status", "parameters"))
    head += "".join(
        f'<th title="{esc(key)}">{esc((stage_of.get(stage, "") + " " + title).strip())}</th>'
        for stage, key, title in STAGE_METRICS
    )
    head += "<th>notebooks</th><th>history</th>"
    rows = "\n".join(_index_row(run, reports) for run in runs)
    summaries = seed_summaries(reports)
    seeds = ""
    if summaries:
        items = []
        for path in summaries:
            rel = path.relative_to(reports)
            with path.open(newline="", encoding="utf-8") as handle:
                table = list(csv.reader(handle))
            body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in table)
            items.append(f'<h3><a href="{href(rel)}">{esc(rel)}</a></h3><table>{body}</table>')
        seeds = "<h2>Multi-seed summaries</h2>" + "\n".join(items)
    body = f"""<h1>Workbench runs</h1>
<p><input id="filter" type="search" placeholder="filter: experiment, status, run id, parameters ..."> showing
<span id="shown">{len(runs)}</span> of {len(runs)} run(s). Click a column to sort. Metrics by stage: 01 data audit,
02 training (IoU at the default threshold), 03 calibration, 04 label-noise review; wall time in seconds.</p>
<div class="wide"><table id="runs"><thead><tr>{head}</tr></thead><tbody>
{rows}
</tbody></table></div>
{seeds}"""
    return _page("Workbench runs", body, SORT_FILTER_SCRIPT)


def write_reports_index(reports: str | Path) -> Path:
    """Rewrite every run's landing page and `<reports>/index.html`."""
    reports = Path(reports)
    for record in run_records(reports):
        write_text_atomic(RunLayout(record.parent).landing, run_landing_page(record.parent))
    return write_text_atomic(index_file(reports), reports_index_page(reports))


# --------------------------------------------------------------------------- offline notebook HTML


def _model_id(reference: Any) -> str | None:
    return reference[len("IPY_MODEL_") :] if isinstance(reference, str) and reference.startswith("IPY_MODEL_") else None


def widget_snapshot(model_id: str, state: Mapping[str, Any], depth: int = 0) -> str:
    """Static HTML of what a saved widget showed: its images, HTML and labels, progress bars and values."""
    entry = state.get(model_id)
    if entry is None or depth > 20:
        return ""
    name, values = entry.get("model_name", ""), entry.get("state", {})
    description = esc(values.get("description", ""))
    if name == "ImageModel":
        for buffer in entry.get("buffers", []):
            if buffer.get("path") == ["value"] and buffer.get("encoding") == "base64":
                data = base64.b64encode(base64.b64decode(buffer["data"])).decode()  # validated base64
                return f'<img src="data:image/{esc(values.get("format", "png"))};base64,{data}">'
        return ""
    if name in ("HTMLModel", "HTMLMathModel"):
        return f"<span>{values.get('value', '')}</span>"  # the widget's own HTML, shown as the widget showed it
    if name == "LabelModel":
        return f"<span>{esc(values.get('value', ''))}</span>"
    if name in ("FloatProgressModel", "IntProgressModel"):
        return f'<progress value="{esc(values.get("value", 0))}" max="{esc(values.get("max", 100))}"></progress>'
    if name in ("DropdownModel", "SelectModel", "RadioButtonsModel", "ToggleButtonsModel"):
        labels, index = values.get("_options_labels", []), values.get("index")
        chosen = labels[index] if isinstance(index, int) and 0 <= index < len(labels) else ""
        return f"<span class='widget-value'>{description}: <b>{esc(chosen)}</b></span>"
    if name in ("IntSliderModel", "FloatSliderModel", "IntTextModel", "FloatTextModel", "TextModel", "CheckboxModel"):
        return f"<span class='widget-value'>{description}: <b>{esc(values.get('value', ''))}</b></span>"
    children = [_model_id(child) for child in values.get("children", [])]
    if children:
        inner = [widget_snapshot(child, state, depth + 1) for child in children if child]
        direction = "row" if name in ("HBoxModel", "GridBoxModel") else "column"
        return f'<div style="display:flex;flex-direction:{direction};gap:6px;align-items:center">{"".join(inner)}</div>'
    if name.startswith("Leaflet") or "Map" in name:
        return "<i>interactive map: open the notebook in JupyterLab to use it (the static map above shows the same)</i>"
    return ""


def static_widget_outputs(notebook: Any) -> int:
    """Replace every widget output of an executed notebook by a static snapshot and drop the widget state.

    Returns how many outputs were replaced. Outputs whose widget left nothing to show keep their text.
    """
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    replaced = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW not in data:
                continue
            snapshot = widget_snapshot(str(data[WIDGET_VIEW].get("model_id", "")), state)
            del data[WIDGET_VIEW]
            if snapshot:
                data["text/html"] = (
                    '<div class="widget-snapshot" title="snapshot of an interactive widget">' + snapshot + "</div>"
                )
                data.pop("text/plain", None)
            replaced += 1
    notebook.metadata.pop("widgets", None)
    return replaced


def export_offline_html(notebook_path: Path) -> Path:
    """Render an executed notebook to `<name>.html` beside it, viewable without internet access."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(notebook_path, as_version=4)
    static_widget_outputs(notebook)
    exporter = HTMLExporter(extra_template_basedirs=[str(TEMPLATE_DIR)], template_name="offline")
    body, _ = exporter.from_notebook_node(notebook)
    return write_text_atomic(Path(notebook_path).with_suffix(".html"), body)


def figure_files(run_dir: Path) -> Iterable[Path]:
    """The figures of a run (PNG and HTML maps)."""
    folder = Path(run_dir) / FIGURES_DIR
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".html")) if folder.is_dir() else []

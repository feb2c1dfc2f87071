"""Drive JupyterLab and report pages in headless Chromium (Playwright on the system's chromium).

The helpers take a Playwright `Page`. `open_notebook` opens a notebook as a notebook (the double-click
default), `run_all_cells` runs it and returns when the last cell finished, `widget` finds an ipywidget by
its description (or a CSS class) and `click_widget` clicks it, so a test of another notebook's widgets
(a review map's decision buttons, say) is a few lines: open, run, click, read the file it wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from workbench.lab import ensure_kernel, free_port, lab_launch

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def chromium_executable() -> str:
    """The system's Chromium; skips the test (fails under CI) when there is none."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    reason = "no chromium executable: install Debian's `chromium` (make test does: apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def is_local(url: str) -> bool:
    """Whether a request stays on this machine (files, inline data, the local lab server)."""
    if url.startswith(LOCAL_SCHEMES):
        return True
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    return host.split(":")[0] in LOCAL_HOSTS or host.startswith("[::1]")


def block_remote_requests(context: Any) -> list[str]:
    """Abort every request that would leave the machine; returns the list of those attempted."""
    attempted: list[str] = []

    def handle(route: Any) -> None:
        url = route.request.url
        if is_local(url):
            route.continue_()
        else:
            attempted.append(url)
            route.abort()

    context.route("**/*", handle)
    return attempted


@contextmanager
def jupyter_lab(root: Path, run_dir: Path | None = None, log: Path | None = None) -> Iterator[str]:
    """JupyterLab serving `root` on a free localhost port with a token; yields the base URL with the token.

    Started exactly as `workbench lab` starts it (token in the environment, project configuration), with
    the app exposed to the page's scripts so tests can run JupyterLab commands.
    """
    ensure_kernel()  # as `workbench lab` does: a headerless script opens with this environment's kernel
    launch = lab_launch(run_dir, port=free_port(18900))
    # a workspace of its own: JupyterLab would otherwise reopen the tabs an earlier lab left open
    workspaces = Path(tempfile.mkdtemp(prefix="lab-workspaces-"))
    argv = [
        *launch.argv,
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.workspaces_dir={workspaces}",
    ]
    output = open(log or os.devnull, "w")  # noqa: SIM115
    process = subprocess.Popen(argv, env=launch.env, stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{launch.port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={launch.token}", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; see {log}") from None
                time.sleep(0.5)
        yield f"{base}/lab/tree/{{path}}?token={launch.token}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        output.close()
        shutil.rmtree(workspaces, ignore_errors=True)


def open_notebook(page: Any, url_template: str, path: str, timeout_s: float = 90) -> None:
    """Open `path` (relative to the lab's root) in JupyterLab and wait for its kernel to be idle."""
    page.goto(url_template.format(path=path))
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=timeout_s * 1000)
    page.locator(".jp-Notebook .jp-Cell").locator("visible=true").first.wait_for(timeout=timeout_s * 1000)
    page.wait_for_function(
        """() => {
            const widget = window.jupyterapp.shell.currentWidget;
            const kernel = widget && widget.sessionContext && widget.sessionContext.session
                && widget.sessionContext.session.kernel;
            return kernel && kernel.status === 'idle';
        }""",
        timeout=timeout_s * 1000,
    )


def notebook_kind(page: Any) -> str:
    """The kind of document shown in the current tab ('notebook' for a notebook, 'editor' for text)."""
    return str(
        page.evaluate(
            "() => { const w = window.jupyterapp.shell.currentWidget;"
            " return w && w.content && w.content.constructor && w.content.node.classList.contains('jp-Notebook')"
            " ? 'notebook' : 'editor'; }"
        )
    )


def run_all_cells(page: Any, timeout_s: float = 240) -> None:
    """Run every cell of the current notebook; returns when the last one finished."""
    page.set_default_timeout(timeout_s * 1000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        """() => {
            const notebook = window.jupyterapp.shell.currentWidget.content;
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const code = notebook.widgets.filter((cell) => cell.model.type === 'code');
            return kernel.status === 'idle' && code.every((cell) => cell.model.executionCount !== null
                && !cell.node.querySelector('.jp-InputPrompt').textContent.includes('*'));
        }""",
        timeout=timeout_s * 1000,
    )


def error_outputs(page: Any) -> list[str]:
    """Text of every error output of the current notebook."""
    return list(page.locator("[data-mime-type='application/vnd.jupyter.error']").all_inner_texts())


def widget(page: Any, description: str | None = None, css: str = ".jupyter-widgets") -> Any:
    """The ipywidget whose description label reads `description` (or the first matching `css`)."""
    found = page.locator(css)
    if description is not None:
        found = found.filter(has=page.locator("label.widget-label", has_text=description))
    return found.first


def click_widget(page: Any, description: str | None = None, css: str = ".jupyter-widgets") -> None:
    """Click a button whose text is `description`, else the widget `widget` finds (its button if it has one)."""
    if description is not None:
        buttons = page.locator("button.jupyter-button", has_text=description)
        if buttons.count():
            buttons.first.click()
            return
    target = widget(page, description, css)
    button = target.locator("button")
    (button.first if button.count() else target).click()

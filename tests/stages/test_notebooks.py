"""The paired notebooks: percent scripts with one `parameters` cell that papermill can inject into."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import jupytext
import pytest

from workbench.pipeline import to_notebook
from workbench.run import NOTEBOOKS

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def test_pairing_config_pairs_ipynb_with_percent_scripts() -> None:
    config = tomllib.loads((NOTEBOOK_DIR / "jupytext.toml").read_text())
    assert set(config["formats"].split(",")) == {"ipynb", "py:percent"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_one_parameters_cell_with_the_injected_names(name: str) -> None:
    notebook = to_notebook(NOTEBOOK_DIR / f"{name}.py")
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assigned = {
        target.id
        for node in ast.parse(tagged[0].source).body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in ([node.target] if isinstance(node, ast.AnnAssign) else node.targets)
        if isinstance(target, ast.Name)
    }
    assert assigned == {"params_file", "overrides", "run_dir"}
    assert notebook.cells[0].cell_type == "markdown"  # narration first


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_percent_script_round_trips(name: str) -> None:
    text = (NOTEBOOK_DIR / f"{name}.py").read_text()
    notebook = jupytext.reads(text, fmt="py:percent")
    again = jupytext.writes(notebook, fmt="py:percent")
    cells = jupytext.reads(again, fmt="py:percent").cells
    assert [(c.cell_type, c.source, c.metadata) for c in cells] == [
        (c.cell_type, c.source, c.metadata) for c in notebook.cells
    ]

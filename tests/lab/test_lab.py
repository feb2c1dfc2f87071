"""`workbench lab`, the project's Jupyter settings, jupytext pairing and opening a run in a notebook."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import tiny_demo_params

from workbench import lab, notebook
from workbench.notebook import RunNotReady, check_paired_source, open_run
from workbench.params import dump_params
from workbench.run import RUN_DIR_VARIABLE, RunLayout, git_dirty, project_root

ROOT = Path(__file__).resolve().parents[2]


def test_token_travels_in_the_environment_and_the_printed_address_carries_it() -> None:
    port = lab.free_port(18888)
    launch = lab.lab_launch(port=port, environ={"JUPYTER_TOKEN": "s3cret-token", "PATH": "/usr/bin"})
    assert launch.token == "s3cret-token" and launch.env["JUPYTER_TOKEN"] == "s3cret-token"
    assert not any("s3cret" in arg for arg in launch.argv)  # the process list never shows it
    assert launch.url == f"http://127.0.0.1:{port}/lab/tree/notebooks/01_data_audit.py?token=s3cret-token"
    assert "--ServerApp.ip=127.0.0.1" in launch.argv
    assert launch.env["JUPYTER_CONFIG_PATH"].split(":")[0] == str(ROOT / "jupyter")
    generated = lab.lab_launch(port=port, environ={})
    assert len(generated.token) == 48 and generated.token in generated.url
    assert generated.token != lab.lab_launch(port=port, environ={}).token


def test_busy_port_and_non_runs_are_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with pytest.raises(lab.LabError, match=f"port {busy} .* in use"):
            lab.lab_launch(port=busy, environ={})
    port = lab.free_port(18888)
    with pytest.raises(lab.LabError, match="does not exist"):
        lab.lab_launch(tmp_path / "nope", port=port, environ={})
    (tmp_path / "half").mkdir()
    with pytest.raises(lab.LabError, match="not a run directory"):
        lab.lab_launch(tmp_path / "half", port=port, environ={})
    run = RunLayout(tmp_path / "run")
    run.root.mkdir()
    dump_params(tiny_demo_params(tmp_path / "store"), run.params)
    launch = lab.lab_launch(run.root, port=port, environ={RUN_DIR_VARIABLE: "/elsewhere"})
    assert launch.env[RUN_DIR_VARIABLE] == str(run.root.resolve()) and launch.run_dir == run.root.resolve()


def test_project_config_opens_python_scripts_as_notebooks_on_localhost() -> None:
    overrides = json.loads((ROOT / "jupyter" / "labconfig" / "default_setting_overrides.json").read_text())
    assert overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]["python"] == "Jupytext Notebook"
    from traitlets.config import Config

    config = Config()
    config_file = ROOT / "jupyter" / "jupyter_server_config.py"
    namespace = {"get_config": lambda: config, "__file__": str(config_file)}
    exec(config_file.read_text(), namespace)
    assert config.ServerApp.ip == "127.0.0.1" and config.ServerApp.root_dir == str(ROOT)
    assert config.ServerApp.port_retries == 0


def test_kernel_spec_names_this_python_and_is_written_once(tmp_path: Path) -> None:
    spec = lab.ensure_kernel(tmp_path)
    kernel = json.loads((spec / "kernel.json").read_text())
    assert Path(kernel["argv"][0]).samefile(sys.executable) and kernel["language"] == "python"
    assert spec.name == "python3"
    stamp = (spec / "kernel.json").stat().st_mtime_ns
    assert lab.ensure_kernel(tmp_path) == spec and (spec / "kernel.json").stat().st_mtime_ns == stamp
    (spec / "kernel.json").write_text(json.dumps({**kernel, "argv": ["python", "-m", "ipykernel_launcher"]}))
    lab.ensure_kernel(tmp_path)  # the stock spec (bare `python`) is replaced: jupytext matches by path
    assert Path(json.loads((spec / "kernel.json").read_text())["argv"][0]).samefile(sys.executable)


def test_saving_a_notebook_in_jupyterlab_leaves_the_tracked_script_unchanged(tmp_path: Path) -> None:
    """The jupytext contents manager JupyterLab saves through, with the project's pairing file."""
    from jupytext import TextFileContentsManager

    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("*.ipynb"))
    script = tmp_path / "notebooks" / "01_data_audit.py"
    before = script.read_bytes()
    manager = TextFileContentsManager(root_dir=str(tmp_path))
    model = manager.get("notebooks/01_data_audit.py", type="notebook", content=True)
    nb = model["content"]
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.9"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["execution_count"] = 3
            cell["outputs"] = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
            cell["metadata"]["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
    manager.save({"type": "notebook", "content": nb}, "notebooks/01_data_audit.py")
    assert script.read_bytes() == before
    paired = nbformat.read(tmp_path / "notebooks" / "01_data_audit.ipynb", as_version=4)
    assert any(cell.get("outputs") for cell in paired.cells)  # outputs live in the ignored .ipynb only
    tagged = [c for c in paired.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1  # papermill's parameters tag survives the round trip


def test_stale_ipynb_is_named_with_the_cells_that_differ(tmp_path: Path) -> None:
    import jupytext

    script = tmp_path / "02_train.py"
    shutil.copy(ROOT / "notebooks" / "02_train.py", script)
    paired = tmp_path / "02_train.ipynb"
    nb = jupytext.read(script)
    nbformat.write(nb, paired)
    assert check_paired_source(paired) == []
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    code[1].source += "\nprint('explored')"
    nbformat.write(nb, paired)
    assert check_paired_source(paired) == [2]


@pytest.fixture
def finished_audit_run(tmp_path: Path) -> RunLayout:
    """A run directory with frozen parameters whose relative store lives under `tmp_path`."""
    params = tiny_demo_params(Path("stores/demo"), "data.source=store")
    layout = RunLayout(tmp_path / "reports" / "demo" / "r1")
    layout.root.mkdir(parents=True)
    layout.freeze_params(params)
    layout.info.write_text(json.dumps({"cwd": str(tmp_path), "status": "complete"}))
    return layout


def test_open_run_takes_relative_store_paths_from_where_the_run_started(
    finished_audit_run: RunLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT / "notebooks")  # where JupyterLab starts a notebook's kernel
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    with pytest.raises(RunNotReady, match=r"chip store .*stores/demo .*workbench ingest FORMAT"):
        open_run("../params/demo.yaml", [], str(finished_audit_run.root), stage="01_data_audit")
    (tmp_path / "stores" / "demo").mkdir(parents=True)
    params, path = open_run("../params/demo.yaml", [], str(finished_audit_run.root), stage="01_data_audit")
    assert Path.cwd() == tmp_path and path == finished_audit_run.root.resolve()
    assert (Path.cwd() / params.data.store).is_dir()
    with pytest.raises(RunNotReady, match=r"02_train needs data/catalog.parquet, which 01_data_audit writes"):
        open_run("../params/demo.yaml", [], str(finished_audit_run.root), stage="02_train")


def test_open_run_uses_the_run_of_workbench_lab_and_refuses_missing_or_half_written_runs(
    finished_audit_run: RunLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # open_run moves to the run's base folder; restored after the test
    (tmp_path / "stores" / "demo").mkdir(parents=True)
    monkeypatch.setenv(RUN_DIR_VARIABLE, str(finished_audit_run.root))
    monkeypatch.setenv("JPY_SESSION_NAME", str(ROOT / "notebooks" / "01_data_audit.py"))
    _, path = open_run("../params/demo.yaml", [], "")
    assert path == finished_audit_run.root.resolve()
    monkeypatch.setenv("JPY_SESSION_NAME", str(ROOT / "notebooks" / "03_calibrate.py"))
    with pytest.raises(RunNotReady, match=r"03_calibrate needs data/catalog\.parquet"):  # the stage from the session
        open_run("../params/demo.yaml", [], "")
    monkeypatch.delenv(RUN_DIR_VARIABLE)
    with pytest.raises(RunNotReady, match="does not exist"):
        open_run("../params/demo.yaml", [], str(tmp_path / "typo"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "run.json").write_text("{}")
    with pytest.raises(RunNotReady, match=r"no params\.yaml"):
        open_run("../params/demo.yaml", [], str(half))


def test_run_errors_show_as_one_line_in_ipython() -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    shell = InteractiveShell.instance()
    try:
        shell.run_cell("from workbench.notebook import _show_short_errors; _show_short_errors()")
        with capture_output() as captured:
            result = shell.run_cell("from workbench.notebook import open_run; open_run('x.yaml', [], '/no/such/run')")
        assert isinstance(result.error_in_exec, RunNotReady)
        text = captured.stdout + captured.stderr
        assert "run directory /no/such/run does not exist" in text and "Traceback" not in text
    finally:
        InteractiveShell.clear_instance()


def test_git_dirty_sees_a_changed_tracked_notebook(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "nb.py").write_text("x = 1\n")
    git("add", "nb.py")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x")
    assert git_dirty(tmp_path) is False
    (tmp_path / "other.txt").write_text("untracked\n")
    assert git_dirty(tmp_path) is False
    (tmp_path / "nb.py").write_text("x = 1\ny = 2\n")
    assert git_dirty(tmp_path) is True
    assert git_dirty(tmp_path / "missing") is None
    assert notebook.project_root() == project_root()

"""Abnormal ends of `workbench run` are recorded: signals, a killed CLI, a dead or hung kernel, racing index writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workbench import pipeline
from workbench.io import read_json, write_json_atomic
from workbench.runstatus import process_record

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "params" / "demo.yaml"


def tiny_args(tmp_path: Path) -> list[str]:
    sets = [
        f"data.store={tmp_path / 'store'}",
        "data.synthetic.n_chips=48",
        "data.synthetic.chip_size=32",
        "data.batch_size=8",
        "model.architecture=satunet",
        "model.base_channels=8",
        "train.max_epochs=1",
        "train.progress_bar=false",
    ]
    return [arg for value in sets for arg in ("--set", value)]


def start_run(tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`python -m workbench run` of the tiny demo as a child process (its own output in tmp_path/cli.log)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(tmp_path / "cli.log", "wb")  # noqa: SIM115 - closed with the process
    command = [sys.executable, "-m", "workbench", "run", str(DEMO), *tiny_args(tmp_path), "--quiet"]
    command += ["--reports", str(tmp_path / "reports"), *extra]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_json(tmp_path: Path) -> Path:
    runs = list((tmp_path / "reports" / "demo").glob("*/run.json"))
    return runs[0] if runs else tmp_path / "none"


def wait_for_kernel(tmp_path: Path, cli: subprocess.Popen[bytes], stage: str, timeout: float = 300) -> psutil.Process:
    """Block until `stage` is running in a kernel started by `cli`; return the kernel process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert cli.poll() is None, (tmp_path / "cli.log").read_text()
        path = run_json(tmp_path)
        info = read_json(path) if path.is_file() else {}
        kernels = [p for p in psutil.Process(cli.pid).children() if "ipykernel" in " ".join(p.cmdline())]
        if info.get("stage") == stage and kernels and cells_started(path.parent / f"{stage}.ipynb") >= 2:
            return kernels[0]
        time.sleep(0.2)
    raise AssertionError(f"no kernel ran {stage} within {timeout} s")


def cells_started(notebook: Path) -> int:
    """Cells papermill has started in the output notebook so far (0 before it exists)."""
    try:
        cells = json.loads(notebook.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(1 for cell in cells if cell.get("metadata", {}).get("papermill", {}).get("start_time"))


def end_of(cli: subprocess.Popen[bytes], kernel: psutil.Process) -> int:
    code = cli.wait(timeout=120)
    psutil.wait_procs([kernel], timeout=60)
    return code


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_kernel_records_interrupted_and_exits_with_the_convention(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    cli = start_run(tmp_path)
    kernel = wait_for_kernel(tmp_path, cli, "01_data_audit")
    cli.send_signal(sig)
    assert end_of(cli, kernel) == code
    assert not kernel.is_running()  # the kernel was shut down with the run
    info = read_json(run_json(tmp_path))
    assert info["status"] == "interrupted"
    assert info["end"] == {"status": "interrupted", "stage": "01_data_audit", "signal": sig.name}
    assert info["notebooks"]["01_data_audit"]["status"] == "interrupted"
    assert "02_train" not in info["notebooks"]
    index = (tmp_path / "reports" / "index.html").read_text()
    assert '<span class="interrupted">interrupted</span>' in index and sig.name in index
    assert sig.name in (tmp_path / "cli.log").read_text()


@pytest.mark.slow
def test_a_killed_cli_is_marked_killed_when_the_index_is_next_written(tmp_path: Path) -> None:
    cli = start_run(tmp_path)
    kernel = wait_for_kernel(tmp_path, cli, "01_data_audit")
    cli.kill()  # kill -9: nothing can be recorded by the process itself
    cli.wait(timeout=60)
    kernel.kill()  # the orphaned kernel would otherwise go on (ipykernel notices its parent only later)
    psutil.wait_procs([kernel], timeout=60)
    path = run_json(tmp_path)
    assert read_json(path)["status"] == "running"  # what kill -9 leaves behind
    pipeline.write_index(tmp_path / "reports")
    info = read_json(path)
    assert info["status"] == "killed"
    assert info["end"]["stage"] == "01_data_audit" and str(cli.pid) in info["end"]["cause"]
    assert info["notebooks"]["01_data_audit"]["status"] == "killed"
    assert '<span class="killed">killed</span>' in (tmp_path / "reports" / "index.html").read_text()


@pytest.mark.slow
def test_a_dead_kernel_ends_the_stage_with_the_cause(tmp_path: Path) -> None:
    cli = start_run(tmp_path, "--notebooks", "01", "02")
    kernel = wait_for_kernel(tmp_path, cli, "01_data_audit")
    kernel.send_signal(signal.SIGKILL)  # what the out-of-memory killer does
    assert cli.wait(timeout=180) == 1
    info = read_json(run_json(tmp_path))
    assert info["status"] == "failed"
    assert info["end"]["stage"] == "01_data_audit" and "kernel died" in info["end"]["cause"]
    assert "out-of-memory" in info["end"]["cause"]
    assert isinstance(info["end"]["cell"], int)  # the cell the kernel died in
    assert "02_train" not in info["notebooks"]
    log = (tmp_path / "cli.log").read_text()
    assert "notebook 01_data_audit stopped in cell" in log and "kernel died" in log


@pytest.mark.slow
def test_a_hanging_cell_is_stopped_by_the_cell_timeout(tmp_path: Path) -> None:
    cli = start_run(tmp_path, "--notebooks", "01", "--cell-timeout", "1")  # importing torch and lightning takes longer
    assert cli.wait(timeout=300) == 1
    info = read_json(run_json(tmp_path))
    assert info["status"] == "failed" and info["cell_timeout"] == 1
    assert info["end"]["stage"] == "01_data_audit" and "cell timeout of 1 s" in info["end"]["cause"]
    assert (run_json(tmp_path).parent / "01_data_audit.ipynb").is_file()  # the partial notebook is kept


def write_run_and_index(reports: str, run_id: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    write_json_atomic(
        Path(reports) / "demo" / run_id / "run.json",
        {"experiment": "demo", "run_id": run_id, "status": "complete", "started": run_id},
    )
    barrier.wait()
    for _ in range(3):
        pipeline.write_index(Path(reports))


def test_a_cell_timeout_below_one_second_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole number of seconds"):
        pipeline.run_pipeline(DEMO, [], tmp_path, cell_timeout=0)
    assert not (tmp_path / "demo").exists()


def test_runs_writing_the_index_at_once_lose_no_run(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    n = 6
    barrier = context.Barrier(n)
    workers = [context.Process(target=write_run_and_index, args=(str(tmp_path), f"run-{i}", barrier)) for i in range(n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    index = (tmp_path / "index.html").read_text()
    assert all(f">run-{i}<" in index for i in range(n))
    assert index.count("<tr>") == n + 1  # one row per run plus the header


def test_a_running_run_whose_process_is_alive_is_left_running(tmp_path: Path) -> None:
    alive = {"experiment": "demo", "run_id": "alive", "status": "running", "process": process_record()}
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = {"experiment": "demo", "run_id": "gone", "status": "running", "process": process_record(sleeper.pid)}
    sleeper.kill()
    sleeper.wait()
    reused = {
        "experiment": "demo",
        "run_id": "reused",
        "status": "running",
        "process": {**process_record(), "started": 1.0},
    }
    other_host = {"experiment": "demo", "run_id": "elsewhere", "status": "running", "process": {"pid": 1, "host": "x"}}
    for record in (alive, gone, reused, other_host):
        write_json_atomic(tmp_path / "demo" / str(record["run_id"]) / "run.json", record)
    pipeline.write_index(tmp_path)
    status = {
        name: read_json(tmp_path / "demo" / name / "run.json")["status"]
        for name in ("alive", "gone", "reused", "elsewhere")
    }
    assert status == {"alive": "running", "gone": "killed", "reused": "killed", "elsewhere": "running"}


def test_the_cell_a_kernel_died_in_is_numbered_even_before_the_kernel_numbered_it(tmp_path: Path) -> None:
    import nbformat

    def started(cell: nbformat.NotebookNode, count: int | None) -> nbformat.NotebookNode:
        cell.metadata["papermill"] = {"start_time": "2026-01-01T00:00:00"}
        if cell.cell_type == "code":
            cell.execution_count = count
        return cell

    v4 = nbformat.v4
    cells = [started(v4.new_markdown_cell("# title"), None), started(v4.new_code_cell("a = 1"), 1)]
    cells += [started(v4.new_code_cell("b = 2"), None), v4.new_code_cell("c = 3")]  # died in the third cell
    path = tmp_path / "nb.ipynb"
    nbformat.write(v4.new_notebook(cells=cells), path)
    assert pipeline.failing_cell(path) == (2, 2)
    cells[2].execution_count = 2
    cells[3] = started(cells[3], 3)
    nbformat.write(v4.new_notebook(cells=cells), path)
    assert pipeline.failing_cell(path) == (3, 3)  # numbered by the kernel: kept
    nbformat.write(v4.new_notebook(cells=[cells[0]]), path)
    assert pipeline.failing_cell(path) == (0, None)  # a markdown cell has no number
    assert pipeline.failing_cell(tmp_path / "missing.ipynb") == (None, None)

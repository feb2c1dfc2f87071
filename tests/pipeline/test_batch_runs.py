"""Batch runs through `workbench run` and papermill: multi-process training, launchers, resume and stage re-runs.

Every run here is the tiny demo (48 chips of 32 px, a narrow SatUNet, three epochs) with stages 01-02,
except the re-run of stage 03 on an existing run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workbench.io import read_json

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "params" / "demo.yaml"
COMPARED = ("train.last_val_loss", "train.last_val_loss_bce", "train.last_val_pr_auc", "val.accuracy", "test.accuracy")
# Two processes with half the batch each take the same steps over the same chips as one process and
# average the same gradients, but each normalises its half-batch (BatchNorm) and takes the Dice term
# per half-batch, so they agree to these tolerances (absolute), not bit for bit. Measured on the tiny
# run: validation loss 1.4558 vs 1.4536, validation BCE 0.52550 vs 0.52553, equal accuracies.
DDP_TOLERANCE = {
    "train.last_val_loss": 0.02,
    "train.last_val_loss_bce": 0.005,
    "val.accuracy": 0.01,
    "test.accuracy": 0.01,
}


def workbench(*args: str, reports: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run `python -m workbench ARGS` to the end and return its output (failing the test on an error)."""
    run = subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        cwd=reports.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def tiny_sets(store: Path, *extra: str) -> list[str]:
    sets = [
        f"data.store={store}",
        "data.synthetic.n_chips=48",
        "data.synthetic.chip_size=32",
        "model.architecture=satunet",
        "model.base_channels=8",
        "train.max_epochs=3",
        "train.progress_bar=false",
        "train.deterministic=true",
        "train.checkpoint_every_n_steps=2",
        *extra,
    ]
    return [arg for value in sets for arg in ("--set", value)]


def run_args(store: Path, reports: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(DEMO),
        *tiny_sets(store, *extra),
        "--reports",
        str(reports),
        "--notebooks",
        "01",
        "02",
        "--quiet",
    ]


def only_run(reports: Path) -> Path:
    runs = sorted(path.parent for path in (reports / "demo").glob("*/run.json"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch") / "store"


@pytest.fixture(scope="module")
def single(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted single-process run (batch 8), trained in the kernel."""
    reports = tmp_path_factory.mktemp("single") / "reports"
    workbench(*run_args(store, reports, "data.batch_size=8"), reports=reports)
    return only_run(reports)


@pytest.fixture(scope="module")
def two_process(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run as two gloo processes of batch 4, started from the kernel as `workbench train`."""
    reports = tmp_path_factory.mktemp("ddp") / "reports"
    workbench(*run_args(store, reports, "data.batch_size=4", "train.devices=2", "train.strategy=ddp"), reports=reports)
    return only_run(reports)


@pytest.mark.slow
def test_two_processes_through_papermill_agree_with_one(single: Path, two_process: Path) -> None:
    one, two = read_json(single / "metrics.json"), read_json(two_process / "metrics.json")
    assert read_json(two_process / "run.json")["status"] == "complete"
    assert one["train.steps"] == two["train.steps"] == 9  # 22 train chips: 3 steps of 8 (or of 2 x 4) per epoch
    for key, tolerance in DDP_TOLERANCE.items():
        assert two[key] == pytest.approx(one[key], abs=tolerance), key
    assert two["train.last_val_loss"] != one["train.last_val_loss"]  # it really ran another way
    notebook = (two_process / "02_train.ipynb").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in notebook  # streamed into the notebook
    assert "distributed_backend=gloo" in notebook
    assert (two_process / "model" / "model.pt").is_file() and (two_process / "predictions" / "test.zarr").is_dir()


@pytest.mark.slow
def test_two_torchrun_ranks_share_one_run_directory(store: Path, two_process: Path, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    args = run_args(store, reports, "data.batch_size=4", "train.devices=2", "train.strategy=ddp")
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "workbench", *args]
    run = subprocess.run(
        [sys.executable, *command],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = only_run(reports)  # both ranks resolved the launcher's run id: one directory
    assert run_dir.name.startswith("torchrun-")
    assert "rank finished" in run.stdout and "run complete" in run.stdout  # rank 1 trained, rank 0 reported
    info = read_json(run_dir / "run.json")
    assert info["status"] == "complete" and info["run_id"] == run_dir.name
    assert (reports / "index.html").read_text().count(run_dir.name) >= 1
    ours, theirs = read_json(run_dir / "metrics.json"), read_json(two_process / "metrics.json")
    for key in COMPARED:  # the same two-rank training whichever launcher started it
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_uninterrupted_metrics(store: Path, single: Path, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    cli = subprocess.Popen(
        [sys.executable, "-m", "workbench", *run_args(store, reports, "data.batch_size=8")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    last = None
    while time.monotonic() < deadline and cli.poll() is None:
        found = list((reports / "demo").glob("*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.1)
    assert last is not None, "training never wrote a checkpoint"
    tree = [psutil.Process(cli.pid), *psutil.Process(cli.pid).children(recursive=True)]
    for process in tree:  # the machine goes away: CLI, kernel and training together
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=60)
    run_dir = only_run(reports)
    assert not (run_dir / "metrics" / "train.json").exists()  # training did not finish

    out = workbench("run", "--resume", str(run_dir), "--quiet", reports=reports)
    assert "run complete" in out
    info = read_json(run_dir / "run.json")
    assert info["status"] == "complete"
    assert [event["action"] for event in info["history"]] == ["created", "resumed"]
    assert [event["status"] for event in info["history"]] == ["killed", "complete"]
    assert info["history"][1]["notebooks"] == ["02_train"]  # stage 01 had finished
    assert read_json(run_dir / "model" / "run_info.json")["resumed_from"].endswith("last.ckpt")
    resumed, uninterrupted = read_json(run_dir / "metrics.json"), read_json(single / "metrics.json")
    for key in (*COMPARED, "val.iou", "test.iou", "train.steps"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_later_stages_rerun_on_an_existing_run(single: Path) -> None:
    reports = single.parent.parent
    before = read_json(single / "metrics.json")
    out = workbench("run", "--run-dir", str(single), "--from", "03", "--notebooks", "03", "--quiet", reports=reports)
    assert "run complete" in out
    info = read_json(single / "run.json")
    assert [event["action"] for event in info["history"]] == ["created", "re-ran from 03_calibrate"]
    assert info["notebooks"]["03_calibrate"]["status"] == "ok" and info["status"] == "complete"
    after = read_json(single / "metrics.json")
    assert after["calibration.temperature"] > 0 and after["test.iou"] == before["test.iou"]
    index = (reports / "index.html").read_text()
    assert index.count(f">{single.name}</a>") == 1  # one row, with its history
    assert "re-ran from 03_calibrate" in index


def fake_existing_run(tmp_path: Path, notebooks: dict[str, str], status: str) -> Path:
    from workbench.io import write_json_atomic
    from workbench.params import load_params
    from workbench.run import RunLayout

    layout = RunLayout.at(tmp_path / "reports", "demo", "r1")
    layout.root.mkdir(parents=True)
    layout.freeze_params(load_params(DEMO))
    info = {
        "run_id": "r1",
        "status": status,
        "notebooks": {k: {"status": v} for k, v in notebooks.items()},
        "requested": list(notebooks),
    }
    write_json_atomic(layout.info, info)
    return layout.root


def test_continuing_a_run_refuses_what_cannot_be_done(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench import pipeline
    from workbench.cli import main

    run_dir = fake_existing_run(tmp_path, {"01_data_audit": "ok", "02_train": "failed"}, "failed")
    with pytest.raises(ValueError, match="has not finished 02_train, which 03_calibrate needs"):
        pipeline.continue_run(run_dir, start="03")
    done = fake_existing_run(tmp_path / "b", {name: "ok" for name in ("01_data_audit", "02_train")}, "complete")
    with pytest.raises(ValueError, match="finished every stage it asked for; use --from"):
        pipeline.continue_run(done)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        pipeline.continue_run(tmp_path)
    assert main(["run", "--resume", str(run_dir), "--set", "seed=1"]) == 2
    assert "keeps its parameters" in capsys.readouterr().err
    assert main(["run", "--run-dir", str(run_dir)]) == 2
    assert "--from" in capsys.readouterr().err
    assert main(["run", str(DEMO), "--from", "03"]) == 2
    assert "--run-dir" in capsys.readouterr().err

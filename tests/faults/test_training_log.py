"""The training log (`logs/metrics.csv`) under faults: a torn file is read with its torn row dropped and
reported, and a crash or a kill during a save leaves the previous complete log under the final name."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench.io import TEMP_MARK, InsufficientSpaceError, sweep_leftovers
from workbench.train.csvlog import AtomicCSVLogger, AtomicExperimentWriter
from workbench.train.log import TrainingLogWarning, epoch_table, read_log_lines

ROOT = Path(__file__).resolve().parents[2]

COMPLETE = "epoch,step,train/loss,val/loss\n0,0,1.0,\n0,1,0.8,\n0,1,,0.9\n1,2,0.6,\n1,3,0.4,\n"


def test_a_torn_last_row_is_dropped_and_reported_not_misparsed(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    # the writer stopped in the middle of "1,3,,0.75\n": the value would read as 0.7 and count as epoch 1's val loss
    path.write_text(COMPLETE + "1,3,,0.7")
    with pytest.warns(TrainingLogWarning, match=r"metrics\.csv:7: dropped a torn last row .*'1,3,,0\.7'"):
        table = epoch_table(path)
    assert table.index.tolist() == [0, 1]
    np.testing.assert_allclose(table["train/loss"], [0.9, 0.5])  # means of (1.0, 0.8) and (0.6, 0.4)
    assert table.loc[0, "val/loss"] == 0.9 and np.isnan(table.loc[1, "val/loss"])  # not 0.7


def test_a_row_with_the_wrong_field_count_is_dropped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(COMPLETE.replace("0,1,0.8,\n", "0,1,0.8\n"))  # one field short: pandas would read NaN silently
    lines, problems = read_log_lines(path)
    assert len(lines) == 5 and problems == [f"{path}:3: dropped a row of 3 fields (the header has 4)"]
    with pytest.warns(TrainingLogWarning):
        assert epoch_table(path).loc[0, "train/loss"] == 1.0


def test_a_torn_header_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,st")
    with pytest.raises(ValueError, match=r"metrics\.csv has no complete header line .*re-run the training stage"):
        epoch_table(path)


def test_a_complete_log_reads_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(COMPLETE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = epoch_table(path)
    pd.testing.assert_frame_equal(table, pd.read_csv(path).groupby(["epoch", "step"]).last().groupby("epoch").mean())


def logged(log_dir: Path, rows: list[dict[str, float]], keep_existing: bool = False) -> AtomicExperimentWriter:
    writer = AtomicExperimentWriter(str(log_dir), keep_existing=keep_existing)
    for row in rows:
        step = int(row.pop("step"))
        writer.log_metrics(row, step)
    writer.save()
    return writer


def test_each_save_writes_the_whole_log_and_a_new_column_rewrites_the_header(tmp_path: Path) -> None:
    writer = logged(tmp_path, [{"epoch": 0, "step": 0, "train/loss": 1.0}])
    writer.log_metrics({"epoch": 0, "val/loss": 0.9}, 0)  # a new column
    writer.save()
    frame = pd.read_csv(writer.path)
    assert list(frame.columns) == ["epoch", "step", "train/loss", "val/loss"]
    assert frame["train/loss"].tolist()[0] == 1.0 and frame["val/loss"].tolist()[1] == 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


def test_a_crash_during_a_save_keeps_the_previous_complete_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = logged(tmp_path, [{"epoch": 0, "step": 0, "train/loss": 1.0}, {"epoch": 0, "step": 1, "train/loss": 0.8}])
    before = writer.path.read_bytes()
    writer.log_metrics({"epoch": 1, "train/loss": 0.6}, 2)

    def crash(fd: int) -> None:  # the new log is in the temporary file, not yet on disk: the machine dies
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("workbench.io.os.fsync", crash)
    with pytest.raises(InsufficientSpaceError, match=r"filled up while writing metrics\.csv"):
        writer.save()
    assert writer.path.read_bytes() == before  # the previous log, whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert epoch_table(writer.path)["train/loss"].tolist() == [0.9]


def test_a_resumed_run_keeps_the_rows_already_logged_less_a_torn_one(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(COMPLETE + "1,3,,0.7")  # torn by an older writer
    writer = logged(tmp_path, [{"epoch": 2, "step": 4, "train/loss": 0.2, "val/iou": 0.5}], keep_existing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torn row is gone from the rewritten file
        table = epoch_table(writer.path)
    assert table.index.tolist() == [0, 1, 2]
    np.testing.assert_allclose(table["train/loss"], [0.9, 0.5, 0.2])
    assert table.loc[2, "val/iou"] == 0.5 and np.isnan(table.loc[0, "val/iou"])

    fresh = logged(tmp_path, [{"epoch": 0, "step": 0, "train/loss": 3.0}])  # a fresh run starts a new log
    assert pd.read_csv(fresh.path)["train/loss"].tolist() == [3.0]


def test_the_trainer_logs_through_the_atomic_csv_logger(tmp_path: Path) -> None:
    from conftest import tiny_demo_params

    from workbench.train.fit import build_loggers

    logger = build_loggers(tiny_demo_params(tmp_path / "store"), tmp_path, resumed=True)[0]
    assert isinstance(logger, AtomicCSVLogger) and logger.keep_existing
    assert isinstance(logger.experiment, AtomicExperimentWriter)
    assert Path(logger.experiment.path) == tmp_path / "logs" / "metrics.csv"


CHILD = textwrap.dedent(
    """
    import sys, time
    from workbench import io as wio
    from workbench.train.csvlog import AtomicExperimentWriter

    writer = AtomicExperimentWriter(sys.argv[1])
    writer.log_metrics({"epoch": 0, "train/loss": 1.0}, 0)
    writer.save()
    real_fsync = wio.os.fsync

    def hang(fd):  # the second save's data is in its temporary file: stop there until killed
        print("HALF", flush=True)
        time.sleep(60)

    wio.os.fsync = hang
    writer.log_metrics({"epoch": 1, "train/loss": 0.5}, 1)
    writer.save()
    """
)


@pytest.mark.slow  # the child process imports Lightning
def test_kill_9_during_a_log_save_leaves_the_previous_log(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "HALF"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert pd.read_csv(tmp_path / "metrics.csv").to_dict("records") == [{"epoch": 0, "step": 0, "train/loss": 1.0}]
    leftovers = [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
    assert len(leftovers) == 1 and f"-{child.pid}-" in leftovers[0].name
    assert sweep_leftovers(tmp_path).removed == leftovers


def test_the_log_is_saved_with_every_checkpoint(tmp_path: Path) -> None:
    logger = AtomicCSVLogger(save_dir=str(tmp_path), name="logs", version="", flush_logs_every_n_steps=1000)
    logger.log_metrics({"epoch": 0, "train/loss": 1.0}, step=0)
    assert not (tmp_path / "logs" / "metrics.csv").exists()  # held in memory until a flush ...
    logger.after_save_checkpoint(None)  # ... or a checkpoint: a kill after it loses no row before it
    assert pd.read_csv(tmp_path / "logs" / "metrics.csv").to_dict("records") == [
        {"epoch": 0, "step": 0, "train/loss": 1.0}
    ]

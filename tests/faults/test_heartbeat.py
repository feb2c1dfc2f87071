"""Killed-run detection across hosts: a run on another host (reports on a shared file system) is judged by its
heartbeat, and marked `killed` when the index is next written once it has been silent for longer than the
timeout; a run with a recent heartbeat is left running."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from workbench import pipeline
from workbench.io import read_json, write_json_atomic
from workbench.periodic import Ticker
from workbench.runstatus import HEARTBEAT_TIMEOUT_S, heartbeat, last_sign_of_life, mark_dead_runs, run_alive

HOST = "gpu-vm-7"  # not this machine
assert socket.gethostname() != HOST


def remote_run(reports: Path, run_id: str, started_ago: float, beat_ago: float | None, **beat: Any) -> Path:
    """A `running` run whose process runs on HOST, started `started_ago` s ago, last heartbeat `beat_ago` s ago."""
    record = {"pid": 4242, "started": time.time() - started_ago, "host": HOST}
    run_dir = reports / "demo" / run_id
    info = {
        "experiment": "demo",
        "run_id": run_id,
        "status": "running",
        "stage": "02_train",
        "process": record,
        "notebooks": {"01_data_audit": {"status": "ok"}, "02_train": {"status": "running"}},
        "history": [{"action": "created", "status": "running"}],
    }
    write_json_atomic(run_dir / "run.json", info)
    if beat_ago is not None:
        write_json_atomic(run_dir / "heartbeat.json", {**record, "beat": time.time() - beat_ago, **beat})
    return run_dir


def status(run_dir: Path) -> str:
    return str(read_json(run_dir / "run.json")["status"])


def test_a_remote_run_with_an_old_heartbeat_is_marked_killed_when_the_index_is_written(tmp_path: Path) -> None:
    run_dir = remote_run(tmp_path, "lost", started_ago=7200, beat_ago=1200)
    pipeline.write_index(tmp_path)
    info = read_json(run_dir / "run.json")
    assert info["status"] == "killed" and info["end"]["status"] == "killed" and info["end"]["stage"] == "02_train"
    cause = info["end"]["cause"]
    assert "process 4242 on gpu-vm-7 showed no sign of life for 1,2" in cause  # 1,200 s (a second may pass)
    assert "the timeout is 600 s; its last heartbeat at" in cause and socket.gethostname() in cause
    assert info["notebooks"]["02_train"]["status"] == "killed" and info["history"][-1]["status"] == "killed"
    assert '<span class="killed">killed</span>' in (tmp_path / "index.html").read_text()


def test_a_remote_run_with_a_recent_heartbeat_stays_running(tmp_path: Path) -> None:
    run_dir = remote_run(tmp_path, "busy", started_ago=7200, beat_ago=5)
    assert mark_dead_runs(tmp_path) == []
    assert status(run_dir) == "running"
    assert run_alive(read_json(run_dir / "run.json"), run_dir) is True


def test_the_timeout_is_a_parameter(tmp_path: Path) -> None:
    run_dir = remote_run(tmp_path, "slow", started_ago=7200, beat_ago=100)
    assert mark_dead_runs(tmp_path) == [] and HEARTBEAT_TIMEOUT_S > 100
    assert mark_dead_runs(tmp_path, heartbeat_timeout_s=60) == [run_dir / "run.json"]
    assert "the timeout is 60 s" in read_json(run_dir / "run.json")["end"]["cause"]


def test_a_heartbeat_of_another_process_does_not_count(tmp_path: Path) -> None:
    # a fresh heartbeat left by another attempt (other pid) does not keep an old silent process alive
    stale = remote_run(tmp_path, "stale", started_ago=7200, beat_ago=5, pid=99)
    record = read_json(stale / "run.json")["process"]
    assert last_sign_of_life(record, stale / "heartbeat.json")[1] == "its start"
    # a process that started a minute ago has not had time to beat yet: left running
    young = remote_run(tmp_path, "young", started_ago=60, beat_ago=None)
    # no start time and no heartbeat (an older run.json): nothing to judge by, left running
    unknown = remote_run(tmp_path, "unknown", started_ago=0, beat_ago=None)
    info = read_json(unknown / "run.json")
    del info["process"]["started"]
    write_json_atomic(unknown / "run.json", info)
    assert mark_dead_runs(tmp_path) == [stale / "run.json"]
    assert "its start at" in read_json(stale / "run.json")["end"]["cause"]
    assert (status(young), status(unknown)) == ("running", "running")


def test_a_run_alive_on_another_host_cannot_be_resumed_here(tmp_path: Path) -> None:
    run_dir = remote_run(tmp_path, "busy", started_ago=7200, beat_ago=5)
    (run_dir / "params.yaml").write_text("experiment: demo\n")
    with pytest.raises(ValueError, match=r"still running \(process 4242 on gpu-vm-7\)"):
        pipeline.continue_run(run_dir)


def test_the_heartbeat_records_this_process_and_beats_until_the_block_ends(tmp_path: Path) -> None:
    path = tmp_path / "run" / "heartbeat.json"
    beats: list[float] = []
    with heartbeat(path, interval_s=0.01) as record:
        first = read_json(path)  # the first beat is written at once
        assert first["pid"] == os.getpid() and first["host"] == socket.gethostname() and record["pid"] == os.getpid()
        with Ticker(lambda: beats.append(read_json(path)["beat"]), 0.01):
            deadline = time.monotonic() + 60  # a bound against hanging, not a speed check
            while len(set(beats)) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(set(beats)) >= 3  # the file is rewritten while the block runs
        ending = time.time()
    assert read_json(path)["beat"] >= ending  # and once more when it ends
    info = {"status": "running", "process": {**record, "host": HOST}}  # as another host would see it
    write_json_atomic(path, {**read_json(path), "host": HOST})
    assert run_alive(info, path.parent) is True
    assert run_alive(info, path.parent, timeout_s=-1.0) is False


def test_a_ticker_calls_its_action_until_stopped_and_once_more(tmp_path: Path) -> None:
    calls: list[int] = []
    ticker = Ticker(lambda: calls.append(len(calls)), 0.01, immediate=False).start()
    deadline = time.monotonic() + 60
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    ticker.stop()
    done = len(calls)
    time.sleep(0.05)
    assert len(calls) == done and calls == list(range(done))  # stopped: no call after the final one
    with pytest.raises(ValueError, match="positive interval"):
        Ticker(lambda: None, 0)

"""How a run ends, recorded: its status, the process that runs it, signals, and the index lock.

Every run ends with a status in `run.json` (and in the index): `complete`; `failed` with the stage,
the cell and the cause; `interrupted` with the signal (SIGINT or SIGTERM stop the kernel cleanly,
record the state and exit with 128 + the signal number); or `killed`, when the process that ran it
disappeared without recording anything (kill -9, the out-of-memory killer, a lost VM). A killed run
cannot record that itself, so `run.json` keeps the id, start time and host of the process running
it, and `mark_dead_runs` (called whenever the index is written) marks every `running` run whose
process is gone. Index rewrites hold an exclusive lock, so two runs finishing at once lose nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from workbench.io import read_json, write_json_atomic
from workbench.run import run_records

RUNNING, COMPLETE, FAILED, INTERRUPTED, KILLED = "running", "complete", "failed", "interrupted", "killed"
INDEX_LOCK = ".index.lock"


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a run was executing."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def process_record(pid: int | None = None) -> dict[str, Any]:
    """Id, start time and host of a process (this one by default): enough to tell later whether it still runs."""
    import os

    import psutil

    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "started": psutil.Process(pid).create_time(), "host": socket.gethostname()}


def process_alive(record: dict[str, Any] | None) -> bool | None:
    """Whether the recorded process still runs; None when that cannot be told (no record, another host)."""
    import psutil

    if not record or record.get("host") != socket.gethostname() or "pid" not in record:
        return None
    try:
        process = psutil.Process(int(record["pid"]))
        started = process.create_time()
        zombie = process.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return abs(started - float(record.get("started", started))) < 1.0 and not zombie  # a reused pid is another process


def mark_dead_runs(reports: Path) -> list[Path]:
    """Mark `killed` every `running` run under `reports` whose process is gone; return their run.json files."""
    marked = []
    for path in run_records(reports):
        try:
            info = read_json(path)
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("status") != RUNNING:
            continue
        record = info.get("process")
        if record is None or process_alive(record) is not False:
            continue
        stage = info.get("stage")
        info["status"] = KILLED
        info["finished"] = now()
        info["end"] = {
            "status": KILLED,
            "stage": stage,
            "cause": f"process {record['pid']} on {record['host']} ended without recording an end "
            "(kill -9, the out-of-memory killer or a lost machine); found when the index was next written",
        }
        if stage and isinstance(info.get("notebooks"), dict):
            info["notebooks"].setdefault(stage, {})["status"] = KILLED
        for event in info.get("history", [])[-1:]:
            if event.get("status") == RUNNING:
                event["status"] = KILLED
        write_json_atomic(path, info)
        marked.append(path)
    return marked


@contextlib.contextmanager
def index_lock(reports: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<reports>/.index.lock` while the index is rebuilt (POSIX advisory lock)."""
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    with open(reports / INDEX_LOCK, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into RunInterrupted while the block runs (main thread only).

    The exception unwinds papermill, which shuts the kernel down on its way out; a second signal
    during that clean-up is ignored so the run can still record its state.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:
            return  # already stopping
        received.append(signum)
        raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

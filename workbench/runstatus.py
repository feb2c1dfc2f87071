"""How a run ends, recorded: its status, the process that runs it, signals, and the index lock.

Every run ends with a status in `run.json` (and in the index): `complete`; `failed` with the stage,
the cell and the cause; `interrupted` with the signal (SIGINT or SIGTERM stop the kernel cleanly,
record the state and exit with 128 + the signal number); or `killed`, when the process that ran it
disappeared without recording anything (kill -9, the out-of-memory killer, a lost VM). A killed run
cannot record that itself, so `run.json` keeps the id, start time and host of the process running
it, and that process rewrites `heartbeat.json` in the run folder every HEARTBEAT_INTERVAL_S seconds
(`heartbeat`). `mark_dead_runs` (called whenever the index is written) marks every `running` run
whose process is gone: on the same host by its pid and start time, on another host (reports on a
shared file system) when neither a heartbeat nor the process start is more recent than
HEARTBEAT_TIMEOUT_S seconds. A run found dead that was only cut off (a network partition) records
its own end when it finishes, over the `killed`. Index rewrites hold an exclusive lock, so two runs
finishing at once lose nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from workbench.io import read_json, write_json_atomic
from workbench.periodic import Ticker
from workbench.run import RunLayout, run_records

RUNNING, COMPLETE, FAILED, INTERRUPTED, KILLED = "running", "complete", "failed", "interrupted", "killed"
INDEX_LOCK = ".index.lock"
HEARTBEAT_INTERVAL_S = 30.0  # how often a running run rewrites its heartbeat.json
HEARTBEAT_TIMEOUT_S = 600.0  # a run on another host silent for longer than this is marked killed


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


def _beat(path: Path, record: dict[str, Any]) -> None:
    """Write one heartbeat (the process record and the time); a failed write only makes the run look older."""
    with contextlib.suppress(OSError):  # a full disk must not stop the run over its heartbeat
        write_json_atomic(path, {**record, "beat": time.time(), "beat_utc": now()})


@contextlib.contextmanager
def heartbeat(path: Path, interval_s: float = HEARTBEAT_INTERVAL_S) -> Iterator[dict[str, Any]]:
    """Rewrite the heartbeat file `path` every `interval_s` seconds (and at start and end) while the block runs."""
    record = process_record()
    with Ticker(lambda: _beat(Path(path), record), interval_s, name="run-heartbeat"):
        yield record


def last_sign_of_life(record: dict[str, Any], heartbeat_file: Path) -> tuple[float | None, str]:
    """When the recorded process last showed it was alive (epoch seconds, its own clock), and how.

    The later of its start time and its last heartbeat in `heartbeat_file` (a heartbeat written by
    another process, for example an earlier attempt of the run, does not count).
    """
    started = record.get("started")
    when, how = (float(started), "its start") if isinstance(started, int | float) else (None, "")
    try:
        beat = read_json(heartbeat_file) if heartbeat_file.is_file() else None
    except (OSError, ValueError):
        beat = None
    if not isinstance(beat, dict) or any(beat.get(key) != record.get(key) for key in ("pid", "host", "started")):
        return when, how
    last = beat.get("beat")
    if isinstance(last, int | float) and (when is None or last > when):
        when, how = float(last), "its last heartbeat"
    return when, how


def run_alive(info: dict[str, Any], run_dir: Path, timeout_s: float = HEARTBEAT_TIMEOUT_S) -> bool | None:
    """Whether the process of a `running` run still runs: by pid on this host, by its heartbeat on another.

    None when that cannot be told (no process record, no time to judge by).
    """
    record = info.get("process")
    alive = process_alive(record)
    if alive is not None or not record:
        return alive
    when, _ = last_sign_of_life(record, RunLayout(run_dir).heartbeat)
    return None if when is None else time.time() - when <= timeout_s


def _death_cause(record: dict[str, Any], run_dir: Path, timeout_s: float) -> str:
    where = f"process {record.get('pid')} on {record.get('host')}"
    if record.get("host") == socket.gethostname():
        return f"{where} ended without recording an end"
    when, how = last_sign_of_life(record, RunLayout(run_dir).heartbeat)
    assert when is not None
    last = datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")
    return (
        f"{where} showed no sign of life for {time.time() - when:,.0f} s (the timeout is {timeout_s:,.0f} s; "
        f"{how} at {last}) and recorded no end"
    )


def mark_dead_runs(reports: Path, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> list[Path]:
    """Mark `killed` every `running` run under `reports` whose process is gone; return their run.json files.

    A process on this host is gone when its pid no longer runs (or is another process); one on another
    host when neither its start nor its last heartbeat is more recent than `heartbeat_timeout_s`.
    """
    marked = []
    for path in run_records(reports):
        try:
            info = read_json(path)
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("status") != RUNNING:
            continue
        record = info.get("process")
        if record is None or run_alive(info, path.parent, heartbeat_timeout_s) is not False:
            continue
        stage = info.get("stage")
        info["status"] = KILLED
        info["finished"] = now()
        info["end"] = {
            "status": KILLED,
            "stage": stage,
            "cause": f"{_death_cause(record, path.parent, heartbeat_timeout_s)} (kill -9, the out-of-memory killer "
            f"or a lost machine); found when the index was next written on {socket.gethostname()}",
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

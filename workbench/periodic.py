"""One background ticker: call a function every few seconds in a daemon thread while a block runs.

Memory sampling during inference (`workbench.infer.PeakMemory`), the machine-load monitor of the
benchmarks and the heartbeat of a running run (`workbench.runstatus.heartbeat`) all need the same
thing: a thread that wakes every `interval_s`, does something small, stops promptly when the block
ends and does it once more on the way out, so the last state is always recorded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType


class Ticker:
    """Call `action()` every `interval_s` seconds in a daemon thread between `start()` and `stop()`.

    With `immediate` the first call is made by `start()` itself, before it returns (so a heartbeat file
    exists once the block begins), otherwise the thread makes it after the first interval; `stop()`
    ends the thread and calls `action()` one last time. Use as a context manager.
    """

    def __init__(self, action: Callable[[], None], interval_s: float, immediate: bool = True, name: str = "") -> None:
        if not interval_s > 0:
            raise ValueError(f"a ticker needs a positive interval, got {interval_s!r} s")
        self.action = action
        self.interval_s = float(interval_s)
        self.immediate = immediate
        self.name = name or f"ticker-{getattr(action, '__name__', 'action')}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.action()

    def start(self) -> Ticker:
        """Start the thread (once)."""
        if self._thread is None:
            self._stop.clear()
            if self.immediate:
                self.action()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, wait for it, then call the action a last time."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.action()

    def __enter__(self) -> Ticker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

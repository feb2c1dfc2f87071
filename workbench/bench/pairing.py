"""Paired, interleaved timing: the one measurement method of every benchmark.

A comparison of A against B runs them in short pairs whose order alternates (A B, B A, A B, ...), so
a neighbour that slows the machine for a while slows both members of the pairs it overlaps, and the
first-or-second position favours neither side. Each pair gives one ratio A / B; the result reports
the per-pair ratios with their minimum, median and maximum, the machine's load while they ran, and
the headline ratio (the median of the per-pair ratios) only when the pairs agree.

Each run's CPU seconds (this process and its finished children, for the whole call) are recorded as
well; their per-pair ratio is a cross-check that neighbours disturb less than the wall time.

Refusal rule (`RefusalRule`): no ratio is reported, and `refused` says why, when

* fewer than `min_pairs` pairs were measured (default 5): too few to see the spread; or
* the interquartile range of the per-pair log-ratios exceeds `max_log_iqr` (default ln 1.25 = 0.223):
  the middle half of the pairs disagree by more than a factor 1.25, which happens when the load
  changes within pairs (a neighbour starting or stopping between A and B) rather than between them.

Steady load from neighbours scales both members of a pair alike and passes; load that changes
within pairs spreads the ratios and is refused instead of being averaged into a misleading number.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from workbench.periodic import Ticker

Run = Callable[[], float | None]
"""One timed unit of work; returns its own measured seconds, or None to be timed around the call."""


@dataclass(frozen=True)
class RefusalRule:
    """When the spread of the per-pair ratios says the machine was too noisy to report a ratio."""

    min_pairs: int = 5
    max_log_iqr: float = math.log(1.25)

    def reason(self, ratios: list[float]) -> str | None:
        """Why `ratios` must not be summarised as one number, or None when they may."""
        if len(ratios) < self.min_pairs:
            return f"only {len(ratios)} pairs measured, at least {self.min_pairs} are needed to judge the spread"
        iqr = log_iqr(ratios)
        if iqr > self.max_log_iqr:
            return (
                f"per-pair ratios too scattered: interquartile range of log-ratios {iqr:.3f} > {self.max_log_iqr:.3f} "
                f"(middle half spans a factor {math.exp(iqr):.2f} > {math.exp(self.max_log_iqr):.2f}); "
                "the load changed within pairs"
            )
        return None

    def describe(self) -> str:
        """The rule in words, for reports."""
        return (
            f"refused when fewer than {self.min_pairs} pairs, or when the interquartile range of the per-pair "
            f"log-ratios exceeds {self.max_log_iqr:.3f} (middle half of the pairs spanning more than a factor "
            f"{math.exp(self.max_log_iqr):.2f})"
        )


DEFAULT_RULE = RefusalRule()


def log_iqr(ratios: list[float]) -> float:
    """Interquartile range of the natural logarithms of `ratios` (0 for fewer than two)."""
    if len(ratios) < 2:
        return 0.0
    logs = np.log(np.asarray(ratios, dtype=float))
    q1, q3 = np.percentile(logs, [25, 75])
    return float(q3 - q1)


# --------------------------------------------------------------------------- machine load


@dataclass
class LoadMonitor:
    """Samples the machine's load in a background thread (a `Ticker`): 1-minute load average and CPU percentages.

    `cpu_percent` is the whole machine's use (100 = every core busy); `process_cpu_percent` is this
    process's own use, children excluded, in percent of one core.
    """

    interval: float = 0.5
    samples: list[dict[str, float]] = field(default_factory=list)
    _ticker: Ticker | None = None
    _process: psutil.Process | None = None

    def _sample(self) -> None:
        assert self._process is not None
        self.samples.append(
            {
                "t": time.time(),
                "loadavg_1m": os.getloadavg()[0],
                "cpu_percent": psutil.cpu_percent(None),
                "process_cpu_percent": self._process.cpu_percent(None),
            }
        )

    def __enter__(self) -> LoadMonitor:
        self._process = psutil.Process()
        psutil.cpu_percent(None)  # the first call only starts the measurement
        self._process.cpu_percent(None)
        self._ticker = Ticker(self._sample, self.interval, immediate=False, name="load-monitor").start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.stop()  # samples once more on the way out

    def summary(self) -> dict[str, Any]:
        """Load average and CPU use (minimum, median, maximum over the samples) and the core count."""
        result: dict[str, Any] = {"cpu_count": os.cpu_count(), "n_samples": len(self.samples)}
        for key in ("loadavg_1m", "cpu_percent", "process_cpu_percent"):
            values = [sample[key] for sample in self.samples]
            if values:
                result[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
        return result


@contextmanager
def machine_load(interval: float = 0.5) -> Iterator[LoadMonitor]:
    """Record the machine's load during a block (see `LoadMonitor`)."""
    with LoadMonitor(interval) as monitor:
        yield monitor


# --------------------------------------------------------------------------- pairing


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (DataLoader workers, child runs)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _timed(run: Run, timer: Callable[[], float]) -> tuple[float, float]:
    """Seconds of one run (its own report, or timed around the call) and CPU seconds of the whole call."""
    cpu, start = cpu_seconds(), timer()
    reported = run()
    wall = timer() - start
    return (float(reported) if reported is not None else wall), cpu_seconds() - cpu


def paired_ratio(
    run_a: Run,
    run_b: Run,
    pairs: int = 8,
    warmup: int = 1,
    names: tuple[str, str] = ("a", "b"),
    rule: RefusalRule = DEFAULT_RULE,
    timer: Callable[[], float] = time.perf_counter,
    monitor_load: bool = True,
    between: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time A against B in `pairs` alternating pairs (after `warmup` untimed pairs); ratio = A / B.

    Pair k runs A then B when k is even and B then A when k is odd. A run returning a number reports
    its own seconds (for example an epoch measured inside a longer call); otherwise the call is timed
    with `timer`. `between` runs untimed before every timed run (for example to empty the page cache).
    Returns the per-pair seconds and ratios, their minimum, median and maximum, the machine's load
    during the pairs (also per pair: the machine's mean CPU percent), and `ratio` = the median of
    the per-pair ratios, or None with `refused` giving the reason (see `RefusalRule`).
    """
    name_a, name_b = names
    for _ in range(warmup):
        run_a()
        run_b()
    seconds_a: list[float] = []
    seconds_b: list[float] = []
    cpu: dict[str, list[float]] = {name_a: [], name_b: []}
    pair_cpu: list[float] = []
    monitor = LoadMonitor() if monitor_load else None
    with monitor if monitor is not None else nullcontext():
        for k in range(pairs):
            if monitor_load:
                psutil.cpu_percent(None)
            order = ((run_a, seconds_a, cpu[name_a]), (run_b, seconds_b, cpu[name_b]))
            for run, seconds, cpu_used in order if k % 2 == 0 else order[::-1]:
                if between is not None:
                    between()
                wall, used = _timed(run, timer)
                seconds.append(wall)
                cpu_used.append(used)
            if monitor_load:
                pair_cpu.append(psutil.cpu_percent(None))
    ratios = [a / b if b > 0 else math.inf for a, b in zip(seconds_a, seconds_b, strict=True)]
    finite = [r for r in ratios if math.isfinite(r) and r > 0]
    refused = rule.reason(finite) if len(finite) == len(ratios) else "a run took no measurable time"
    result: dict[str, Any] = {
        "names": [name_a, name_b],
        "pairs": pairs,
        "warmup_pairs": warmup,
        f"{name_a}_seconds": seconds_a,
        f"{name_b}_seconds": seconds_b,
        f"{name_a}_median_seconds": statistics.median(seconds_a) if seconds_a else None,
        f"{name_b}_median_seconds": statistics.median(seconds_b) if seconds_b else None,
        "pair_ratios": ratios,
        "ratio_min": min(finite) if finite else None,
        "ratio_median": statistics.median(finite) if finite else None,
        "ratio_max": max(finite) if finite else None,
        "log_iqr": log_iqr(finite),
        "ratio": None if refused else statistics.median(finite),
        "refused": refused,
        "rule": rule.describe(),
        "pair_cpu_percent": pair_cpu,
        "cpu_seconds": cpu,
        "cpu_ratio_median": _cpu_ratio(cpu[name_a], cpu[name_b]),
    }
    if monitor is not None:
        result["load"] = monitor.summary()
    return result


def _cpu_ratio(a: list[float], b: list[float]) -> float | None:
    """Median per-pair ratio of CPU seconds (whole calls, children included), a cross-check of the wall ratio."""
    ratios = [x / y for x, y in zip(a, b, strict=True) if y > 0]
    return statistics.median(ratios) if ratios else None


def ratio_text(result: dict[str, Any], what: str) -> str:
    """One line for a paired result: the ratio with its per-pair range, or the refusal and its reason."""
    if result.get("refused"):
        return f"{what}: refused ({result['refused']})"
    return (
        f"{what}: x{result['ratio']:.2f} (pairs x{result['ratio_min']:.2f}..x{result['ratio_max']:.2f}, "
        f"{len(result['pair_ratios'])} pairs)"
    )

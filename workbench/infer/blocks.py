"""Block-wise execution of raster inference within a memory limit, in process or through dask.

A scene larger than memory is processed in blocks: each block reads the rows and columns of every
window of the whole raster's grid that touches it (a halo), so the blended result does not depend
on the block size. Block sizes follow from a memory limit; `run_blocks` yields one block's
probabilities at a time: in this process, as dask delayed tasks on a local scheduler
(`scheduler="threads"`), or on a dask distributed cluster (`scheduler="tcp://host:8786"`, or a
Client already active in the session). `PeakMemory` measures what a run actually used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.arrays import window_starts
from workbench.infer.windows import predict_array
from workbench.models.bundle import ModelBundle
from workbench.periodic import Ticker

DEFAULT_MEMORY_LIMIT_MB = 1024
OUTPUT_TILE = 256
MIB = 1024 * 1024

Span = tuple[int, int]


# --------------------------------------------------------------------------- memory measurement


class PeakMemory:
    """Samples this process's resident memory in a background thread (a `Ticker`); use as a context manager."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self._ticker: Ticker | None = None

    @staticmethod
    def rss_mb() -> float:
        """Current resident set size in MiB."""
        import psutil

        return float(psutil.Process().memory_info().rss) / MIB

    @property
    def increase_mb(self) -> float:
        return max(0.0, self.peak_mb - self.baseline_mb)

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> PeakMemory:
        self.baseline_mb = self.peak_mb = self.rss_mb()
        self._ticker = Ticker(self._sample, self.interval_s, name="peak-memory").start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.stop()  # samples once more on the way out


# --------------------------------------------------------------------------- block plan


@dataclass(frozen=True)
class AxisSpan:
    """One axis of a block: [core0, core1) is written, [read0, read1) is read; starts are relative to read0."""

    core0: int
    core1: int
    read0: int
    read1: int
    starts: tuple[int, ...]


@dataclass(frozen=True)
class Block:
    """One block of the raster: its row span and column span."""

    rows: AxisSpan
    cols: AxisSpan


def _axis_spans(size: int, window: int, stride: int, block: int, halo: int) -> list[AxisSpan]:
    """Split one axis into cores of `block` pixels; each reads every window of the global grid touching it."""
    if size <= window:
        return [AxisSpan(0, size, 0, size, (0,))]
    starts = window_starts(size, window, stride)
    spans = []
    for core0 in range(0, size, block):
        core1 = min(size, core0 + block)
        touching = [s for s in starts if s < core1 and s + window > core0]
        read0 = min(min(touching), max(0, core0 - halo))
        read1 = max(max(touching) + window, min(size, core1 + halo))
        spans.append(AxisSpan(core0, core1, read0, read1, tuple(s - read0 for s in touching)))
    return spans


def plan_blocks(
    height: int, width: int, window: int, stride: int, block_size: int, scales: Sequence[float] = (1.0,)
) -> list[Block]:
    """Row-major blocks of `block_size` pixels whose reads include every window touching their core.

    Because the window grid is the whole raster's, the blended result does not depend on block_size
    (exactly at scale 1; other scales read a halo of window / scale pixels and match closely).
    """
    halo = math.ceil(window / min(scales)) if any(s != 1.0 for s in scales) else 0
    row_spans = _axis_spans(height, window, stride, block_size, halo)
    col_spans = _axis_spans(width, window, stride, block_size, halo)
    return [Block(rows, cols) for rows in row_spans for cols in col_spans]


def default_model_memory_mb(channels: int, classes: int, window: int, batch_size: int) -> float:
    """Rough working memory of one batch forward: inputs, outputs and 64 float32 feature maps per window."""
    return batch_size * window * window * 4 * (2 * channels + 2 * classes + 64) / MIB


def gdal_cache_mb(memory_limit_mb: float) -> int:
    """GDAL block cache for reads and tiled writes: a tenth of the limit, at least 16 MiB."""
    return max(16, int(memory_limit_mb / 10))


def block_size_for_memory(
    memory_limit_mb: float,
    channels: int,
    classes: int,
    window: int,
    batch_size: int,
    itemsize: int = 4,
    model_memory_mb: float | None = None,
) -> int:
    """Side of square blocks (a multiple of the output tile) whose arrays stay under the memory limit.

    From the limit are taken the model's working memory (`model_memory_mb`, default
    `default_model_memory_mb`) and the GDAL cache; the rest holds one block's read (core plus a
    window-wide halo on each side): per pixel the raw values, a float32 copy and the normalisation
    temporaries per band, and logit/weight sums, probabilities and masks per class. Blocks never
    shrink below one output tile.
    """
    if model_memory_mb is None:
        model_memory_mb = default_model_memory_mb(channels, classes, window, batch_size)
    per_pixel = channels * (itemsize + 16) + classes * 24 + 16
    available_mb = memory_limit_mb - model_memory_mb - gdal_cache_mb(memory_limit_mb)
    budget = max(available_mb, memory_limit_mb / 4) * MIB
    side = math.isqrt(int(budget // per_pixel)) - 2 * window
    if side < OUTPUT_TILE:
        smallest_mb = smallest_memory_limit_mb(channels, classes, window, batch_size, itemsize, model_memory_mb)
        warnings.warn(
            f"memory limit {memory_limit_mb:.0f} MB is below the smallest block for {channels} bands "
            f"(about {smallest_mb:.0f} MB with window {window}); raise the limit or use a smaller window",
            RuntimeWarning,
            stacklevel=2,
        )
    return max(OUTPUT_TILE, side // OUTPUT_TILE * OUTPUT_TILE)


def smallest_memory_limit_mb(
    channels: int,
    classes: int,
    window: int,
    batch_size: int,
    itemsize: int = 4,
    model_memory_mb: float | None = None,
) -> float:
    """The smallest memory limit one output-tile block fits in (model memory, GDAL cache and its read)."""
    if model_memory_mb is None:
        model_memory_mb = default_model_memory_mb(channels, classes, window, batch_size)
    per_pixel = channels * (itemsize + 16) + classes * 24 + 16
    read_mb = (OUTPUT_TILE + 2 * window) ** 2 * per_pixel / MIB
    return model_memory_mb + read_mb + gdal_cache_mb(model_memory_mb + read_mb)


# --------------------------------------------------------------------------- block execution


def input_valid(raw: np.ndarray, nodata: Sequence[float | None]) -> np.ndarray:
    """(H, W) True where every band is finite and differs from its nodata value."""
    valid = np.isfinite(raw).all(axis=0) if raw.dtype.kind == "f" else np.ones(raw.shape[1:], dtype=bool)
    for band, value in enumerate(nodata):
        if value is not None and not math.isnan(value):
            valid &= raw[band] != value
    return valid


@dataclass
class BlockJob:
    """Everything a worker needs to predict one block (picklable for a dask distributed cluster)."""

    bundle: ModelBundle
    reader: Callable[[Span, Span], np.ndarray]
    nodata: list[float | None]
    window: int
    stride: int
    batch_size: int
    tta: str
    device: str
    scales: tuple[float, ...]
    precision: str = "fp32"

    def __call__(self, block: Block) -> tuple[Block, np.ndarray]:
        rows, cols = block.rows, block.cols
        raw = self.reader((rows.read0, rows.read1), (cols.read0, cols.read1))
        valid = input_valid(raw, self.nodata)
        probs = predict_array(
            self.bundle,
            raw,
            valid,
            window=self.window,
            stride=self.stride,
            batch_size=self.batch_size,
            tta=self.tta,
            device=self.device,
            scales=self.scales,
            progress=False,
            row_starts=rows.starts,
            col_starts=cols.starts,
            precision=self.precision,
        )
        core = probs[
            :, rows.core0 - rows.read0 : rows.core1 - rows.read0, cols.core0 - cols.read0 : cols.core1 - cols.read0
        ]
        classes = self.bundle.num_classes
        if core.shape[0] != classes:  # every window was nodata: the model never ran
            core = np.full((classes, *core.shape[1:]), np.nan, dtype=np.float32)
        return block, np.ascontiguousarray(core)


def _active_client() -> Any | None:
    """The dask distributed Client of this session, if one is running."""
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:
        return None


LOCAL_SCHEDULERS = ("threads", "synchronous", "processes")


def run_blocks(
    job: BlockJob, blocks: Sequence[Block], max_in_flight: int = 4, scheduler: str | None = None
) -> Iterator[tuple[Block, np.ndarray]]:
    """Yield (block, probabilities) one block at a time, in the order of `blocks`.

    `scheduler` None runs the blocks in this process (or on the dask distributed Client active in
    the session); "threads", "synchronous" or "processes" compute them as dask delayed tasks on that
    local scheduler, `max_in_flight` at a time; any other value is the address of a dask
    distributed scheduler to connect to. At most `max_in_flight` blocks are held at once.
    """
    if scheduler is None:
        client = _active_client()
        if client is None:
            for block in blocks:
                yield job(block)
            return
        yield from _run_on_client(client, job, blocks, max_in_flight)
        return
    if scheduler in LOCAL_SCHEDULERS:
        yield from _run_delayed(job, blocks, max_in_flight, scheduler)
        return
    client = connect_scheduler(scheduler)
    with client:
        yield from _run_on_client(client, job, blocks, max_in_flight)


def connect_scheduler(address: str, timeout_s: float = 10.0) -> Any:
    """A Client of the dask distributed scheduler at `address`, or an error naming it."""
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise RuntimeError("a scheduler address needs the `distributed` package") from exc
    if "://" not in address and ":" not in address:
        raise ValueError(
            f"scheduler {address!r} is neither one of {LOCAL_SCHEDULERS} nor a dask scheduler address "
            "such as tcp://10.0.0.5:8786"
        )
    try:
        return Client(address, timeout=timeout_s)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"cannot reach the dask scheduler at {address} within {timeout_s:.0f} s ({exc}); "
            "start it with `dask scheduler` and workers with `dask worker ADDRESS`, or use --scheduler threads"
        ) from None


def _run_delayed(
    job: BlockJob, blocks: Sequence[Block], max_in_flight: int, scheduler: str
) -> Iterator[tuple[Block, np.ndarray]]:
    """Blocks as dask delayed tasks computed on a local scheduler, `max_in_flight` per compute."""
    import dask

    task = dask.delayed(job, pure=False)
    for start in range(0, len(blocks), max_in_flight):
        group = [task(block) for block in blocks[start : start + max_in_flight]]
        yield from dask.compute(*group, scheduler=scheduler, num_workers=max_in_flight)


def _run_on_client(
    client: Any, job: BlockJob, blocks: Sequence[Block], max_in_flight: int
) -> Iterator[tuple[Block, np.ndarray]]:
    """Blocks submitted to a distributed Client, `max_in_flight` at a time, yielded in submission order."""
    from collections import deque

    remote_job = client.scatter(job, broadcast=True)
    pending = iter(blocks)
    futures: deque[Any] = deque()
    for block in [b for _, b in zip(range(max_in_flight), pending)]:
        futures.append(client.submit(_call_job, remote_job, block, pure=False))
    while futures:
        yield futures.popleft().result()
        following = next(pending, None)
        if following is not None:
            futures.append(client.submit(_call_job, remote_job, following, pure=False))


def _call_job(job: BlockJob, block: Block) -> tuple[Block, np.ndarray]:
    return job(block)

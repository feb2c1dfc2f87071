"""Benchmark of the label-noise review: chips scored per second and peak memory, cleanlab included.

Chips of 15 bands (named like the CryoSentinel stack, so the MNDWI term runs) with a lake label, a model
probability and, on a tenth of them, an omitted lake, are generated one by one and streamed through
`workbench.review.review_table`, as the review stage streams a store. The goal: 10,000 chips of
15 x 128 x 128 under 2 GiB peak memory (`tracemalloc` peak of the scoring, numpy buffers included, and the
process's peak resident set size over the whole run; the traced peak of two cleanlab batches, measured
apart because tracing slows the scoring down several times). Chip generation is part of the timed loop.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import numpy as np

BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12", "B01", "B09", "VV", "VH", "DEM"]
GOAL_BYTES = 2 * 2**30


def _chips(n: int, size: int, seed: int = 0) -> Iterator[Any]:
    from workbench.review.signals import ReviewChip

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        lake = (yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(0.08, 0.2) * size) ** 2
        image = rng.uniform(0.05, 0.3, (len(BANDS), size, size)).astype(np.float32)
        image[BANDS.index("B03")][lake] = 0.4
        image[BANDS.index("B11")][lake] = 0.02
        noisy = i % 10 == 0
        label = np.zeros((size, size), np.uint8) if noisy else lake.astype(np.uint8)
        prob = np.clip(np.where(lake, 0.9, 0.05) + rng.normal(0, 0.03, lake.shape), 0, 1).astype(np.float32)
        yield ReviewChip(image, BANDS, label, np.ones((size, size), bool), prob, {"chip_id": f"b{i}", "noisy": noisy})


def bench_review(quick: bool = False) -> dict[str, Any]:
    """Score chips through the review (signals, cleanlab in batches, ranking); chips/s and peak memory."""
    from workbench.params import ReviewParams
    from workbench.review import review_table, top_k_scores

    n, size = (300, 64) if quick else (10_000, 128)
    cfg = ReviewParams()
    import cleanlab.segmentation.rank  # noqa: F401 - imported before timing (scikit-learn takes seconds)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    table = review_table(_chips(n, size), cfg, progress=not quick)
    seconds = time.perf_counter() - started
    # the Python-level peak (numpy buffers included) of a sample, measured apart: tracing slows scoring a lot
    tracemalloc.start()
    review_table(_chips(2 * cfg.batch_size, size, seed=1), cfg, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    scores = top_k_scores(table, int(table["noisy"].sum()))
    return {
        "n_chips": n,
        "chip_shape": [len(BANDS), size, size],
        "batch_size": cfg.batch_size,
        "seconds": seconds,
        "chips_per_second": n / seconds,
        "traced_peak_bytes": peak,
        "rss_peak_bytes": rss_peak,
        "rss_before_bytes": rss_before,
        "goal_bytes": GOAL_BYTES,
        "meets_goal": bool(max(peak, rss_peak) < GOAL_BYTES),
        "top_k_precision": scores["precision"],
        "top_k_recall": scores["recall"],
    }

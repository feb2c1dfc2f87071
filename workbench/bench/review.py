"""Benchmark: review scoring throughput and memory (chips per second, peak resident memory).

The review stage streams chips (image, label, valid mask and the model's probability) through
`workbench.review.review_table`, which scores them one at a time into the ranked table. The benchmark
feeds it `n_chips` chips of 15 x 128 x 128 (the demo's bands) generated from a small pool of random
chips with fresh ids, so memory stays bounded by the scorer rather than by the input, and reports
chips per second per block of chips (minimum, median, maximum), the machine's load, and the peak
resident memory above the level before scoring.

The scorer is a parameter (`scorer`: chips -> table), so further terms (for example a cleanlab
label-quality score) are measured by passing a scorer that adds them; `paired_scorers` pairs two
scorers against each other with the common pairing method.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import psutil

from workbench.bench.pairing import machine_load, paired_ratio, ratio_text
from workbench.review import ReviewChip

Scorer = Callable[[Iterable[ReviewChip]], pd.DataFrame]


def default_scorer(chips: Iterable[ReviewChip]) -> pd.DataFrame:
    """The package's per-chip review scoring (`review_table` with default review parameters)."""
    from workbench.review import review_table

    return review_table(chips, progress=False)


def chip_pool(n: int, size: int = 128, seed: int = 0) -> list[dict[str, Any]]:
    """`n` random chips of the demo's 15 bands: reflectance-like image, lake-like label, valid mask, probability."""
    from workbench.data.synthetic import synthetic_bands

    rng = np.random.default_rng(seed)
    names = [band.name for band in synthetic_bands()]
    pool = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2).tolist()
        radius = rng.uniform(4, size / 4)
        label = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).astype(np.uint8)
        image = rng.uniform(0.0, 0.3, (len(names), size, size)).astype(np.float32)
        image[names.index("B03")] += 0.2 * label  # water: green up, SWIR down
        image[names.index("B11")] *= 1.0 - 0.8 * label
        logit = rng.normal(3.0 * (2.0 * label - 1.0), 1.5).astype(np.float32)
        pool.append(
            {
                "image": image,
                "label": label,
                "valid": rng.random((size, size)) > 0.01,
                "prob": 1.0 / (1.0 + np.exp(-logit)),
                "band_names": names,
                "index": i,
            }
        )
    return pool


def stream_chips(pool: list[dict[str, Any]], n_chips: int, start: int = 0) -> Iterator[ReviewChip]:
    """`n_chips` review chips cycling through `pool`, each with its own id (bounded memory)."""
    for number in range(start, start + n_chips):
        chip = pool[number % len(pool)]
        yield ReviewChip(
            image=chip["image"],
            band_names=chip["band_names"],
            label=chip["label"],
            valid=chip["valid"],
            prob=chip["prob"],
            row={"chip_id": f"chip{number:06d}", "split": "train"},
        )


def bench_review(
    n_chips: int = 10_000,
    block: int = 500,
    size: int = 128,
    pool: int = 32,
    scorer: Scorer = default_scorer,
) -> dict[str, Any]:
    """Chips per second of `scorer` over `n_chips` chips, in blocks of `block`, and the peak memory of the run."""
    from tqdm.auto import tqdm

    from workbench.infer import PeakMemory

    chips = chip_pool(pool, size)
    scorer(stream_chips(chips, min(block, 8)))  # warm-up: imports, first-touch allocations
    rates: list[float] = []
    rows = 0
    started = time.perf_counter()
    with machine_load() as load, PeakMemory() as memory:
        for start in tqdm(range(0, n_chips, block), desc="review bench", unit="block", leave=False):
            count = min(block, n_chips - start)
            began = time.perf_counter()
            table = scorer(stream_chips(chips, count, start))
            rates.append(count / (time.perf_counter() - began))
            rows += len(table)
    seconds = time.perf_counter() - started
    return {
        "n_chips": n_chips,
        "chip_shape": [len(chips[0]["band_names"]), size, size],
        "block_chips": block,
        "scored_rows": rows,
        "seconds": seconds,
        "chips_per_s": n_chips / seconds,
        "block_chips_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
        "block_rates": rates,
        "peak_rss_mb": memory.peak_mb,
        "peak_increase_mb": memory.increase_mb,
        "process_rss_mb_at_end": psutil.Process().memory_info().rss / 2**20,
        "load": load.summary(),
        "note": (
            "review_table scoring (water-index agreement, model and index disagreement, confident error, rank) "
            f"of chips cycled from a pool of {pool} random chips with fresh ids; chips per second over the whole "
            "run and per block; peak resident memory sampled every 10 ms, increase over the level before scoring."
        ),
    }


def paired_scorers(
    scorer_a: Scorer, scorer_b: Scorer, names: tuple[str, str], n_chips: int = 200, pairs: int = 6, size: int = 128
) -> dict[str, Any]:
    """Pair two scorers over the same chips (ratio = seconds of A / seconds of B), e.g. with and without a term."""
    chips = chip_pool(16, size)

    def run(scorer: Scorer) -> Callable[[], None]:
        def score() -> None:
            scorer(stream_chips(chips, n_chips))

        return score

    result = paired_ratio(run(scorer_a), run(scorer_b), pairs, names=names)
    result["summary"] = ratio_text(result, f"{names[0]} / {names[1]}")
    return result

"""Benchmarks of the data layer: store versus per-chip HDF5 reads, and loader versus model throughput.

(a) `bench_store_vs_hdf5`: Landslide4Sense ships one HDF5 file per patch plus one per mask, so its data
    loader opens two HDF5 files per chip. The benchmark writes a Landslide4Sense-layout folder of random
    patches, ingests it into a chip store and reads the same random batches through

    - ``hdf5``: what a Landslide4Sense loader does per sample (open the image file, read ``img``,
      transpose to (band, y, x), open the mask file, read ``mask``), then stacks the batch;
    - ``store``: what a DataLoader over ChipDataset fetches per batch (``read_raw_batch``: image, label
      and valid mask, each chip read with one positioned read from its open shard straight into its slot
      of the batch array);
    - ``store_per_chip``: the store read sample by sample (``read_raw``), then stacked, as a per-sample
      ``__getitem__`` loader would;
    - ``store_xarray``: the xarray view (`open_store(dask=False)`: lazily indexed through the chip
      reader), and ``store_xarray_dask``: the dask-backed view (`open_store()`), whose per-chip task
      overhead suits reductions over a whole store, not batch loading;

    and, one level up, the full datasets as a DataLoader collates them with torch's ``default_collate``
    (``*_dataset``: tensors as a training loop receives them). Paths are timed in blocks of a few
    batches, alternating the path order per block, so drift on a shared machine hits all of them alike
    while each path reads back to back in its own steady state (alternating batch by batch makes every
    path pay page faults for memory the other one freed); medians are reported. The cold-cache
    variant closes the store's shards and drops the benchmark's own files from the page cache
    (``posix_fadvise(DONTNEED)``, no root needed) before every timed batch, so each read comes from the
    disk as on a first epoch or a network drive.

(b) `bench_loader_vs_model`: batches per second of a DataLoader with worker processes over ChipDataset with
    normalisation and the demo's augmentation, against the training-step time (forward, backward,
    optimiser step) of the demo's smp U-Net on those batches. Ratio > 1 means the loader keeps up.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.data.dataset import ChipDataset
from workbench.data.ingest import ingest
from workbench.data.sources.landslide4sense import BANDS as L4S_BANDS
from workbench.data.store import BandSpec, Chip, ChipReader, StoreWriter, open_store, read_catalog

PATCH = 128
READ_GOAL_RATIO = 10.0
BLOCK = 5  # batches a path reads back to back before the other paths take their turn


# --------------------------------------------------------------------------- test data


def write_landslide4sense_folder(root: Path, n_chips: int, seed: int = 0) -> None:
    """<root>/img/image_<n>.h5 ((128, 128, 14) float32) and <root>/mask/mask_<n>.h5 ((128, 128) uint8)."""
    import h5py

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(parents=True, exist_ok=True)
    for number in range(1, n_chips + 1):
        image = rng.normal(1.0, 0.3, size=(PATCH, PATCH, len(L4S_BANDS))).astype(np.float32)
        mask = (rng.random((PATCH, PATCH)) < 0.05).astype(np.uint8)
        with h5py.File(root / "img" / f"image_{number}.h5", "w") as handle:
            handle.create_dataset("img", data=image)
        with h5py.File(root / "mask" / f"mask_{number}.h5", "w") as handle:
            handle.create_dataset("mask", data=mask)


def random_store(dest: Path, n_chips: int, size: int, bands: Sequence[BandSpec], seed: int = 0) -> Path:
    """A store of random chips with thresholded labels (read and training speed do not depend on content)."""
    rng = np.random.default_rng(seed)
    with StoreWriter(dest, bands, source="bench") as writer:
        for i in range(n_chips):
            image = rng.normal(size=(len(bands), size, size)).astype(np.float32)
            label = (image[0] > 0.5).astype(np.uint8)
            writer.append(Chip(f"c{i}", image, label, np.ones((size, size), bool), lat=0.0, lon=0.0))
    return dest


def evict_from_page_cache(files: Iterable[str | Path]) -> None:
    """Drop the files' pages from the OS page cache, so the next read comes from the disk (Linux; no root)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch threads (DataLoader workers use one), then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the Landslide4Sense loader


class Landslide4SenseH5:
    """Per-sample reads of the Landslide4Sense HDF5 layout, as the dataset's own loaders do them."""

    def __init__(self, image_files: Sequence[Path], mask_files: Sequence[Path]) -> None:
        self.image_files = list(image_files)
        self.mask_files = list(mask_files)

    def __len__(self) -> int:
        return len(self.image_files)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (band, y, x) float32 and mask (y, x) uint8 of one patch, opening both files."""
        import h5py

        with h5py.File(self.image_files[index], "r") as handle:
            image = np.ascontiguousarray(handle["img"][()].transpose(2, 0, 1), dtype=np.float32)
        with h5py.File(self.mask_files[index], "r") as handle:
            mask = handle["mask"][()]
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.read(index)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(mask.astype(np.int64)), "index": index}


# --------------------------------------------------------------------------- timing


def _stack(samples: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.stack(parts) for parts in zip(*samples, strict=True))


def interleaved_seconds(
    paths: Mapping[str, Callable[[np.ndarray], Any]],
    batches: Sequence[np.ndarray],
    before_each: Callable[[], None] | None = None,
    block: int = 1,
) -> dict[str, list[float]]:
    """Seconds per batch of every path, in blocks of `block` batches, alternating the path order per block.

    Alternating cancels drift on a shared machine. Within a block a path reads its batches back to
    back, as a DataLoader worker does, so it runs in its own steady state (its freed buffers are
    reused) rather than in the memory left by the other path. `before_each` runs untimed before
    every timed call (for example to empty the page cache).
    """
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    for number, start in enumerate(range(0, len(batches), max(1, block))):
        chunk = batches[start : start + max(1, block)]
        for name in names if number % 2 == 0 else reversed(names):
            for batch in chunk:
                if before_each is not None:
                    before_each()
                began = time.perf_counter()
                paths[name](batch)
                times[name].append(time.perf_counter() - began)
    return times


def _medians(times: dict[str, list[float]], suffix: str = "") -> dict[str, float]:
    return {f"{name}{suffix}_s_per_batch": statistics.median(values) for name, values in times.items()}


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_note(ratio: float, rounds: Sequence[float], cold_ratio: float | None, stack_s: float) -> str:
    reached = "reaches" if ratio >= READ_GOAL_RATIO else "does not reach"
    text = (
        f"Warm page cache: the store read {reached} the {READ_GOAL_RATIO:g}x goal (x{ratio:.1f}; per round "
        f"x{min(rounds):.1f} to x{max(rounds):.1f}). Per chip the store "
        "issues one positioned read per array from a shard file it keeps open (chunk index cached), copying the "
        "chip from the page cache once straight into the batch array: no decoding, no stacking. HDF5 pays two "
        "library file opens (superblock, object headers), its own read, a transposing copy to (band, y, x) and the "
        f"stacking copy. Stacking a batch alone costs {stack_s * 1e3:.2f} ms, which is why the per-chip store path "
        "is slower than the batched one. first_read reads every chip once with a fresh dataset, as an epoch "
        "with new DataLoader workers does (shards opened and indexes read again). "
    )
    if cold_ratio is not None:
        text += (
            f"Cold cache (files dropped from the page cache before every batch): x{cold_ratio:.1f}; both paths then "
            "wait on the disk for the same bytes, so the gap narrows to the extra small reads HDF5 issues per file. "
        )
    return text + (
        "The HDF5 path delivers image + mask, the store image + label + valid (about 3% more bytes). Timings are "
        f"medians over batches timed in blocks of {BLOCK} per path, alternating the path order per block (each path "
        "reads in its own steady state, as a DataLoader worker does), single-threaded as in DataLoader workers."
    )


# --------------------------------------------------------------------------- (a) store versus HDF5


def bench_store_vs_hdf5(
    tmp_dir: Path,
    n_chips: int = 256,
    batch_size: int = 16,
    n_batches: int = 60,
    seed: int = 0,
    cold: bool = True,
    xarray: bool = True,
    rounds: int = 3,
) -> dict[str, Any]:
    """Median seconds per random batch through per-chip HDF5 files and the store, warm and cold; their ratios.

    All paths read the same chips and deliver the same pixels (checked); ratios are HDF5 / store. The warm
    read comparison runs `rounds` times; medians pool all rounds and the per-round ratios show the spread.
    """
    tmp_dir = Path(tmp_dir)
    raw, store = tmp_dir / "landslide4sense", tmp_dir / "store"
    write_landslide4sense_folder(raw, n_chips, seed)
    ingest("landslide4sense", raw, store, overwrite=True, progress=False)
    catalog = read_catalog(store)
    image_files = [Path(path) for path in catalog["file"]]
    mask_files = [path.parent.parent / "mask" / path.name.replace("image_", "mask_") for path in image_files]
    hdf5 = Landslide4SenseH5(image_files, mask_files)
    dataset = ChipDataset(store, np.arange(len(catalog)))
    lazy = open_store(store, dask=False)
    chunked = open_store(store)
    rng = np.random.default_rng(seed)
    size = min(batch_size, n_chips)
    batches = [np.sort(rng.choice(n_chips, size=size, replace=False)) for _ in range(n_batches)]

    def read_hdf5(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return _stack([hdf5.read(int(index)) for index in batch])

    def read_store(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return dataset.read_raw_batch(batch)

    def read_store_per_chip(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return _stack([dataset.read_raw(int(index)) for index in batch])

    def read_xarray(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        selected = lazy[["image", "label", "valid"]].isel(chip=batch)
        return selected["image"].values, selected["label"].values, selected["valid"].values

    def read_xarray_dask(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        selected = chunked[["image", "label", "valid"]].isel(chip=batch)
        return selected["image"].values, selected["label"].values, selected["valid"].values

    from torch.utils.data import default_collate

    def hdf5_dataset(batch: np.ndarray) -> Any:
        return default_collate([hdf5[int(index)] for index in batch])

    def store_dataset(batch: np.ndarray) -> Any:
        return default_collate(dataset.__getitems__(batch.tolist()))

    # The goal's two paths are timed against each other alone: a third path in the rotation would leave its
    # own allocations behind for the next block (the per-chip path frees 16 chip arrays per batch).
    reads = {"hdf5": read_hdf5, "store": read_store}
    all_reads = {**reads, "store_per_chip": read_store_per_chip}
    with torch_threads(1):
        _check_same_pixels(read_hdf5(batches[0]), read_store(batches[0]), read_store_per_chip(batches[0]))
        for path in [*all_reads.values(), hdf5_dataset, store_dataset]:
            path(batches[0])  # warm-up: imports, open shards, first-touch allocations, page cache
        pooled: dict[str, list[float]] = {name: [] for name in reads}
        round_ratios = []
        for _ in range(max(1, rounds)):
            times = interleaved_seconds(reads, batches, block=BLOCK)
            round_ratios.append(statistics.median(times["hdf5"]) / statistics.median(times["store"]))
            for name, values in times.items():
                pooled[name] += values
        warm = _medians(pooled)
        warm |= _medians(interleaved_seconds({"store_per_chip": read_store_per_chip}, batches))
        warm |= _medians(_first_read_seconds(store, read_hdf5, n_chips, size, rounds, rng), "_first_read")
        datasets = {"hdf5": hdf5_dataset, "store": store_dataset}
        warm |= _medians(interleaved_seconds(datasets, batches, block=BLOCK), "_dataset")
        if xarray:
            views = {"store_xarray": read_xarray, "store_xarray_dask": read_xarray_dask}
            warm |= _medians(interleaved_seconds(views, batches[: max(2, n_batches // 3)]))
        samples = [dataset.read_raw(int(index)) for index in batches[0]]
        stack_s = statistics.median(_timed(lambda: _stack(samples)) for _ in range(5))
        result: dict[str, Any] = {
            "n_chips": n_chips,
            "batch_size": size,
            "n_batches": n_batches,
            "chip_shape": [len(L4S_BANDS), PATCH, PATCH],
            "shard_chips": ChipReader(store, "image").shard_chips,
            **warm,
            "stack_s_per_batch": stack_s,
            "ratio": warm["hdf5_s_per_batch"] / warm["store_s_per_batch"],
            "ratio_rounds": round_ratios,
            "ratio_per_chip": warm["hdf5_s_per_batch"] / warm["store_per_chip_s_per_batch"],
            "ratio_first_read": warm["hdf5_first_read_s_per_batch"] / warm["store_first_read_s_per_batch"],
            "ratio_dataset": warm["hdf5_dataset_s_per_batch"] / warm["store_dataset_s_per_batch"],
            "goal_ratio_min": READ_GOAL_RATIO,
        }
        if xarray:
            result["ratio_xarray"] = warm["hdf5_s_per_batch"] / warm["store_xarray_s_per_batch"]
            result["ratio_xarray_dask"] = warm["hdf5_s_per_batch"] / warm["store_xarray_dask_s_per_batch"]
        cold_ratio = None
        if cold and hasattr(os, "posix_fadvise"):
            os.sync()  # only clean pages can be dropped
            store_files = [file for name in ("image", "label", "valid") for file in ChipReader(store, name).files()]
            files: list[str | Path] = [*image_files, *mask_files, *store_files]

            def evict() -> None:
                dataset.close()  # shards are opened again, as on a first read
                evict_from_page_cache(files)

            cold_times = _medians(interleaved_seconds(all_reads, batches, evict, block=BLOCK), "_cold")
            result |= cold_times
            cold_ratio = cold_times["hdf5_cold_s_per_batch"] / cold_times["store_cold_s_per_batch"]
            result["ratio_cold"] = cold_ratio
            result["ratio_per_chip_cold"] = (
                cold_times["hdf5_cold_s_per_batch"] / cold_times["store_per_chip_cold_s_per_batch"]
            )
    result["hdf5_bytes"] = _folder_bytes(raw)
    result["store_bytes"] = _folder_bytes(store)
    result["note"] = _read_note(result["ratio"], round_ratios, cold_ratio, stack_s)
    return result


def _first_read_seconds(
    store: Path,
    read_hdf5: Callable[[np.ndarray], Any],
    n_chips: int,
    batch_size: int,
    rounds: int,
    rng: np.random.Generator,
) -> dict[str, list[float]]:
    """Seconds per batch when every chip is read once, as in a training epoch with fresh DataLoader workers.

    Each round opens a new dataset (its shards are opened and their indexes read again) and reads a fresh
    permutation of all chips; HDF5 reads the same batches.
    """
    pooled: dict[str, list[float]] = {"hdf5": [], "store": []}
    for _ in range(max(1, rounds)):
        fresh = ChipDataset(store, np.arange(n_chips))
        order = rng.permutation(n_chips)
        epoch = [np.sort(order[i : i + batch_size]) for i in range(0, n_chips - batch_size + 1, batch_size)]
        times = interleaved_seconds({"hdf5": read_hdf5, "store": fresh.read_raw_batch}, epoch, block=BLOCK)
        for name, values in times.items():
            pooled[name] += values
        fresh.close()
    return pooled


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _check_same_pixels(hdf5: tuple[np.ndarray, ...], *stores: tuple[np.ndarray, ...]) -> None:
    for store in stores:
        if not (np.array_equal(hdf5[0], store[0]) and np.array_equal(hdf5[1], store[1])):
            raise RuntimeError("the store and the HDF5 files disagree on the benchmark chips")


# --------------------------------------------------------------------------- (b) loader versus model


def demo_params_file() -> Path:
    """The repository's demo parameter file (augmentation, model and loss of the demo run)."""
    return Path(__file__).resolve().parents[2] / "params" / "demo.yaml"


def _loader_seconds_per_batch(loader: Any, n_batches: int) -> tuple[float, list[dict[str, Any]]]:
    """Seconds per batch after the first (worker start-up), over `n_batches` batches; keeps them."""
    kept: list[dict[str, Any]] = []
    iterator = iter(loader)
    kept.append(next(iterator))
    start = time.perf_counter()
    while len(kept) <= n_batches:
        try:
            kept.append(next(iterator))
        except StopIteration:
            iterator = iter(loader)
    return (time.perf_counter() - start) / n_batches, kept


def _train_step_seconds(batches: list[dict[str, Any]], bands: int, steps: int, warmup: int) -> float:
    """Median seconds of forward + backward + optimiser step of the demo model on the given batches."""
    from workbench.data.dataset import loss_mask
    from workbench.models.factory import build_model
    from workbench.params import load_params
    from workbench.train.losses import build_loss

    params = load_params(demo_params_file())
    torch.manual_seed(0)
    model = build_model(params.model, bands).train()
    criterion = build_loss(params.train.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.optimizer.lr)
    times = []
    for step in range(steps + warmup):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = criterion(model(batch["image"]), batch["target"], loss_mask(batch))
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def bench_loader_vs_model(
    tmp_dir: Path,
    sizes: Sequence[int] = (64, 128),
    batch_size: int = 16,
    num_workers: int = 2,
    n_batches: int = 12,
    steps: int = 4,
    warmup: int = 1,
) -> dict[str, Any]:
    """Per chip size: loader seconds per batch (normalised, augmented) vs the demo model's training step."""
    from torch.utils.data import DataLoader

    from workbench.data.augment import Augmenter
    from workbench.data.normalize import NormalizationStats
    from workbench.data.synthetic import synthetic_bands
    from workbench.params import load_params

    params = load_params(demo_params_file())
    bands = synthetic_bands()
    stats = NormalizationStats([b.name for b in bands], "zscore", mean=[0.0] * len(bands), std=[1.0] * len(bands))
    augment = Augmenter.from_bands(params.data.augment, bands)
    result: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "bands": len(bands),
        "model": f"smp {params.model.architecture} {params.model.encoder} (demo parameters)",
        "augment": params.data.augment.model_dump(mode="json"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "by_size": {},
    }
    n_chips = batch_size * 8
    for size in sizes:
        store = random_store(Path(tmp_dir) / f"loader-{size}", n_chips, size, bands)
        dataset = ChipDataset(store, np.arange(n_chips), normalizer=stats, augment=augment)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        loader_s, batches = _loader_seconds_per_batch(loader, n_batches)
        del loader
        step_s = _train_step_seconds(batches, len(bands), steps, warmup)
        result["by_size"][str(size)] = {
            "chip_size": size,
            "loader_s_per_batch": loader_s,
            "loader_batches_per_s": 1.0 / loader_s,
            "train_step_s": step_s,
            "ratio": step_s / loader_s,
        }
    result["ratio_min"] = min(entry["ratio"] for entry in result["by_size"].values())
    result["goal_ratio_min"] = 1.0
    result["note"] = (
        "ratio = training-step seconds / loader seconds per batch, measured one after the other in one process "
        "(loader alone with its workers, then the model alone with all torch threads); > 1 means the loader "
        "delivers batches faster than the model consumes them. On a machine with few cores the workers and the "
        "training step compete for the same cores when run together."
    )
    return result

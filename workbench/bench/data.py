"""Benchmarks of the data layer: the chip store against fair competitors, and loader against model throughput.

(a) `bench_store_reads` reads the same random batches (image, label and valid of 16 chips of
    14 x 128 x 128, the Landslide4Sense layout) through the store and three competitors, each paired
    against the store with `workbench.bench.pairing`:

    - ``per_chip_files``: what a Landslide4Sense loader does (open the image file, read ``img``,
      transpose to (band, y, x), open the mask file, read ``mask``) per chip, then stack the batch;
    - ``hdf5_single``: one well-chunked HDF5 file (one chunk per chip, uncompressed) opened once and
      read with h5py's ``read_direct`` chip by chip into the batch array;
    - ``memmap``: NumPy memory maps (.npy) of the same arrays, one fancy-indexed copy per array;
    - ``store``: what a DataLoader over ChipDataset fetches per batch (``read_raw_batch``: one
      positioned read per chip from an open shard, straight into the batch array).

    Warm: the files sit in the page cache. Cold: before every run the readers are closed and the
    files dropped from the page cache (``posix_fadvise(DONTNEED)``, no root needed), as on a first
    epoch or a network drive. The verdicts say where the store wins and where it does not.

(b) `bench_loader_vs_model`: a training epoch of the demo's smp U-Net fed by a DataLoader with worker
    processes over ChipDataset (normalisation, the demo's augmentation), paired against the same
    training steps on batches already in memory. Ratio 1.0 means the loader costs nothing; the excess
    is the time the model waits for data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.bench.pairing import paired_ratio
from workbench.data.dataset import ChipDataset
from workbench.data.ingest import ingest
from workbench.data.sources.landslide4sense import BANDS as L4S_BANDS
from workbench.data.store import BandSpec, Chip, ChipReader, StoreWriter, read_catalog

PATCH = 128


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


# --------------------------------------------------------------------------- the fair competitors


def _stack(samples: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.stack(parts) for parts in zip(*samples, strict=True))


def write_single_hdf5(path: Path, image: np.ndarray, label: np.ndarray, valid: np.ndarray) -> Path:
    """One HDF5 file with `image` (n, band, y, x), `label` and `valid` (n, y, x), chunked one chip per chunk."""
    import h5py

    with h5py.File(path, "w") as handle:
        for name, array in (("image", image), ("label", label), ("valid", valid)):
            handle.create_dataset(name, data=array, chunks=(1, *array.shape[1:]))
    return path


class SingleHDF5:
    """Batches from one chunked HDF5 file kept open: one chunk per chip read straight into the batch array."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle: Any = None

    def _datasets(self) -> tuple[Any, Any, Any]:
        import h5py

        if self._handle is None:
            # a chunk cache holding a few chips, as a tuned reader would set it
            self._handle = h5py.File(self.path, "r", rdcc_nbytes=8 * 2**20)
        return self._handle["image"], self._handle["label"], self._handle["valid"]

    def close(self) -> None:
        """Close the file (the next read opens it again, as a fresh DataLoader worker does)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def read_batch(self, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        """Image, label and valid of the chips at `positions`."""
        out = []
        for dataset in self._datasets():
            batch = np.empty((len(positions), *dataset.shape[1:]), dtype=dataset.dtype)
            for slot, position in enumerate(positions):
                dataset.read_direct(batch, np.s_[int(position)], np.s_[slot])
            out.append(batch)
        return tuple(out)


class MemmapChips:
    """Batches from NumPy memory maps (.npy files) of image, label and valid: one fancy-indexed copy each."""

    def __init__(self, root: Path) -> None:
        self.files = {name: Path(root) / f"{name}.npy" for name in ("image", "label", "valid")}
        self._maps: dict[str, np.ndarray] | None = None

    @classmethod
    def write(cls, root: Path, image: np.ndarray, label: np.ndarray, valid: np.ndarray) -> MemmapChips:
        """Write the three arrays as .npy files under `root`."""
        root.mkdir(parents=True, exist_ok=True)
        for name, array in (("image", image), ("label", label), ("valid", valid)):
            np.save(root / f"{name}.npy", array)
        return cls(root)

    def close(self) -> None:
        """Drop the maps (the next read maps the files again)."""
        self._maps = None

    def read_batch(self, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        """Image, label and valid of the chips at `positions`."""
        if self._maps is None:
            self._maps = {name: np.load(path, mmap_mode="r") for name, path in self.files.items()}
        return tuple(np.asarray(self._maps[name][positions]) for name in ("image", "label", "valid"))


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _verdict(name: str, result: dict[str, Any]) -> str:
    """Where the store wins against one competitor (ratios are competitor / store seconds)."""
    if result["ratio"] is None:
        return f"{name}: no verdict, {result['refused']}"
    ratio = result["ratio"]
    if ratio >= 1.1:
        return f"store faster than {name} (x{ratio:.2f})"
    if ratio <= 1 / 1.1:
        return f"{name} faster than the store (x{1 / ratio:.2f})"
    return f"store and {name} level (x{ratio:.2f})"


# --------------------------------------------------------------------------- (a) store versus the competitors


def bench_store_reads(
    tmp_dir: Path,
    n_chips: int = 128,
    batch_size: int = 16,
    block: int = 8,
    pairs: int = 10,
    cold_pairs: int = 6,
    seed: int = 0,
    cold: bool = True,
) -> dict[str, Any]:
    """Paired seconds of random batches: the store against per-chip files, one chunked HDF5 file and a memmap.

    Every competitor holds the same chips (checked pixel for pixel) and is paired against the store
    (`workbench.bench.pairing`), ratio = competitor seconds / store seconds (> 1: the store is faster).
    Warm: a run reads `block` random batches from the page cache. Cold: before every run the files
    are dropped from the page cache and the readers closed, and a run reads one batch.
    """
    tmp_dir = Path(tmp_dir)
    raw, store = tmp_dir / "landslide4sense", tmp_dir / "store"
    write_landslide4sense_folder(raw, n_chips, seed)
    ingest("landslide4sense", raw, store, overwrite=True, progress=False)
    catalog = read_catalog(store)
    image_files = [Path(path) for path in catalog["file"]]
    mask_files = [path.parent.parent / "mask" / path.name.replace("image_", "mask_") for path in image_files]
    per_chip = Landslide4SenseH5(image_files, mask_files)
    dataset = ChipDataset(store, np.arange(len(catalog)))
    everything = dataset.read_raw_batch(np.arange(len(catalog)))
    single = SingleHDF5(write_single_hdf5(tmp_dir / "chips.h5", *everything))
    memmap = MemmapChips.write(tmp_dir / "memmap", *everything)
    del everything
    rng = np.random.default_rng(seed)
    size = min(batch_size, n_chips)

    def batch() -> np.ndarray:
        return np.sort(rng.choice(n_chips, size=size, replace=False))

    readers: dict[str, Callable[[np.ndarray], tuple[np.ndarray, ...]]] = {
        "per_chip_files": lambda b: _stack([per_chip.read(int(i)) for i in b]),
        "hdf5_single": single.read_batch,
        "memmap": memmap.read_batch,
    }
    store_files = [file for name in ("image", "label", "valid") for file in ChipReader(store, name).files()]
    all_files: list[str | Path] = [
        *image_files,
        *mask_files,
        *store_files,
        single.path,
        *memmap.files.values(),
    ]

    def evict() -> None:
        dataset.close()
        single.close()
        memmap.close()
        evict_from_page_cache(all_files)

    result: dict[str, Any] = {
        "n_chips": n_chips,
        "batch_size": size,
        "chip_shape": [len(L4S_BANDS), PATCH, PATCH],
        "block_batches": block,
        "shard_chips": ChipReader(store, "image").shard_chips,
        "bytes": {
            "per_chip_files": _folder_bytes(raw),
            "store": _folder_bytes(store),
            "hdf5_single": single.path.stat().st_size,
            "memmap": sum(path.stat().st_size for path in memmap.files.values()),
        },
        "warm": {},
        "cold": {},
    }
    with torch_threads(1):
        probe = batch()
        reference = dataset.read_raw_batch(probe)
        for name, read in readers.items():
            _check_same_pixels(reference, read(probe), name)
        for name, read in readers.items():
            blocks = [[batch() for _ in range(block)] for _ in range(pairs + 1)]  # +1: the warm-up pair
            result["warm"][name] = paired_ratio(
                _reading(read, blocks), _reading(dataset.read_raw_batch, blocks), pairs, names=(name, "store")
            )
        if cold and hasattr(os, "posix_fadvise"):
            os.sync()  # only clean pages can be dropped
            for name, read in readers.items():
                blocks = [[batch()] for _ in range(cold_pairs + 1)]
                result["cold"][name] = paired_ratio(
                    _reading(read, blocks),
                    _reading(dataset.read_raw_batch, blocks),
                    cold_pairs,
                    names=(name, "store"),
                    between=evict,
                )
    result["verdicts"] = {
        f"{state}/{name}": _verdict(name, entry) for state in ("warm", "cold") for name, entry in result[state].items()
    }
    result["note"] = (
        "ratio = competitor seconds / store seconds for the same random batches (image, label and valid of "
        f"{size} chips of {len(L4S_BANDS)} x {PATCH} x {PATCH}); > 1 means the store is faster. per_chip_files: "
        "the Landslide4Sense layout, two HDF5 files opened per chip; hdf5_single: one HDF5 file kept open, one "
        "chunk per chip read into the batch array; memmap: .npy memory maps, one fancy-indexed copy per array; "
        "store: ChipDataset.read_raw_batch (one positioned read per chip from open shards). Warm: page cache "
        "filled; cold: files dropped from the page cache and readers closed before every run. Single-threaded, "
        "as in DataLoader workers."
    )
    return result


def _reading(read: Callable[[np.ndarray], Any], blocks: list[list[np.ndarray]]) -> Callable[[], None]:
    """A run that reads the next block of batches on each call: both sides of a pair read the same chips."""
    calls = iter(blocks)

    def run() -> None:
        for chosen in next(calls):
            read(chosen)

    return run


def _check_same_pixels(store: tuple[np.ndarray, ...], other: tuple[np.ndarray, ...], name: str) -> None:
    if not (np.array_equal(store[0], other[0]) and np.array_equal(store[1], other[1])):
        raise RuntimeError(f"the store and {name} disagree on the benchmark chips")


# --------------------------------------------------------------------------- (b) loader versus model


def demo_params_file() -> Path:
    """The repository's demo parameter file (augmentation, model and loss of the demo run)."""
    return Path(__file__).resolve().parents[2] / "params" / "demo.yaml"


def _train_step(bands: int) -> Callable[[dict[str, Any]], None]:
    """One training step (forward, loss, backward, AdamW step) of the demo model on a batch."""
    from workbench.data.dataset import loss_mask
    from workbench.models.factory import build_model
    from workbench.params import load_params
    from workbench.train.losses import build_loss

    params = load_params(demo_params_file())
    torch.manual_seed(0)
    model = build_model(params.model, bands).train()
    criterion = build_loss(params.train.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.optimizer.lr)

    def step(batch: dict[str, Any]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = criterion(model(batch["image"]), batch["target"], loss_mask(batch))
        loss.backward()
        optimizer.step()

    return step


def _pair_loader_with_model(loader: Any, step: Callable[[dict[str, Any]], None], pairs: int) -> dict[str, Any]:
    """Paired seconds of one epoch fed by `loader` against the same number of steps on batches in memory."""
    kept = list(loader)

    def from_loader() -> None:
        for batch in loader:  # a fresh epoch: the workers start, then prefetch while the model trains
            step(batch)

    def from_memory() -> None:
        for batch in kept:
            step(batch)

    return paired_ratio(from_loader, from_memory, pairs, names=("epoch_with_loader", "epoch_from_memory"))


def bench_loader_vs_model(
    tmp_dir: Path,
    sizes: Sequence[int] = (64, 128),
    batch_size: int = 16,
    num_workers: int = 2,
    batches: int = 3,
    pairs: int = 5,
) -> dict[str, Any]:
    """Per chip size: an epoch of `batches` batches fed by the loader, paired against the same steps from memory.

    The loader is the workbench's (ChipDataset with normalisation and the demo's augmentation, worker
    processes started per epoch as the training loader does); ratio = epoch with the loader / epoch from
    memory, so 1.0 means the loader costs the epoch nothing and the excess is the data stall.
    """
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
        "batches_per_epoch": batches,
        "bands": len(bands),
        "model": f"smp {params.model.architecture} {params.model.encoder} (demo parameters)",
        "augment": params.data.augment.model_dump(mode="json"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "by_size": {},
    }
    n_chips = batch_size * batches
    for size in sizes:
        store = random_store(Path(tmp_dir) / f"loader-{size}", n_chips, size, bands)
        dataset = ChipDataset(store, np.arange(n_chips), normalizer=stats, augment=augment)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
        )
        entry = _pair_loader_with_model(loader, _train_step(len(bands)), pairs)
        del loader
        result["by_size"][str(size)] = {"chip_size": size, **entry}
    ratios = [entry["ratio"] for entry in result["by_size"].values()]
    result["ratio_max"] = None if None in ratios else max(ratios)
    result["note"] = (
        "ratio = seconds of a training epoch fed by the loader (workers started for the epoch, normalisation, "
        "augmentation) / seconds of the same training steps on the same number of batches already in memory, "
        "paired; 1.0 means the loader hides behind the model, the excess is the data stall. On a machine with "
        "few cores the workers and the training step compete for the same cores."
    )
    return result

"""Loading a prepared run's chips for training, resumably.

`build_datamodule` wires a run's sampler, augmentation and normalisation into a Lightning data
module whose training loader is a `ResumableDataLoader`: it remembers how many batches of the
epoch it has delivered, so a run resumed from a checkpoint taken mid-epoch continues with the next
batch of the same order. Every epoch's chip order is a function of (seed, epoch) (the samplers of
`workbench.data.sampling`, or `EpochShuffleSampler` when none is configured), and augmentation is
seeded per (seed, epoch, chip) and per global step (`workbench.data.augment.batch_augment_generator`).
`data_pos_weight` is the train split's negative:positive pixel ratio for loss terms weighted by the data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from workbench.arrays import IGNORE_INDEX
from workbench.data.augment import Augmenter, BatchAugmenter
from workbench.data.dataset import ChipDataModule, Sample
from workbench.data.normalize import NormalizationStats
from workbench.data.prepare import PreparedData
from workbench.data.sampling import EpochSampler, build_sampler
from workbench.data.store import read_store_meta
from workbench.params import Params


class EpochShuffleSampler(EpochSampler):
    """Every chip once per epoch in an order drawn from (seed, epoch): plain shuffling that resumes exactly.

    A DataLoader with `shuffle=True` draws each epoch's order from a generator whose state depends on
    how many epochs the loader has run, which a restarted process cannot know.
    """

    def __init__(self, n_chips: int, seed: int = 0) -> None:
        super().__init__(seed)
        if n_chips < 1:
            raise ValueError("no chips to sample from (empty train split)")
        self.n_chips = int(n_chips)

    def __len__(self) -> int:
        return self.n_chips

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.n_chips)


def merge_single_remainder(batches: Iterator[list[int]]) -> Iterator[list[int]]:
    """Batches of indices where a last batch of one chip is merged into the one before it.

    BatchNorm in training mode cannot normalise a batch of one chip whose deepest feature map is 1 x 1
    (and normalises any one-chip batch badly), so an epoch never ends in one; no chip is dropped.
    """
    previous: list[int] | None = None
    for batch in batches:
        batch = list(batch)
        if previous is not None:
            if len(batch) == 1:
                yield previous + batch
                previous = None
                continue
            yield previous
        previous = batch
    if previous is not None:
        yield previous


class _ResumeIndices:
    """The loader's batches of indices (a one-chip remainder merged into the batch before it), less the
    first `loader._skip` ones (read when iteration starts)."""

    def __init__(self, base: Any, loader: ResumableDataLoader) -> None:
        self.base = base
        self.loader = loader

    def _merges(self) -> bool:
        size = getattr(self.base, "batch_size", None)
        return bool(size and size > 1 and not getattr(self.base, "drop_last", False))

    def __len__(self) -> int:
        n = len(self.base)
        if self._merges() and n > 1:
            try:
                chips = len(self.base.sampler)
            except TypeError:
                return n
            if chips % self.base.batch_size == 1:
                return n - 1
        return n

    def __iter__(self) -> Iterator[Any]:
        batches = merge_single_remainder(iter(self.base)) if self._merges() else iter(self.base)
        return itertools.islice(batches, self.loader._skip, None)


class ResumableDataLoader(DataLoader[Sample]):
    """A DataLoader whose position within the epoch goes into Lightning checkpoints.

    Lightning saves `state_dict()` of stateful training loaders with each checkpoint and hands it
    back through `load_state_dict()` on resume, before the first iteration. The state is the number
    of batches delivered in the current epoch and the sampler's epoch; the resumed iteration then
    skips that many batches of the same (seed, epoch) order without loading them. A checkpoint
    taken after the last batch of an epoch resumes at the start of the next one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._delivered = 0
        self._pending_skip = 0
        self._skip = 0

    @classmethod
    def like(cls, loader: DataLoader[Sample]) -> ResumableDataLoader:
        """A resumable loader with the dataset, sampler and settings of `loader`."""
        return cls(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=loader.sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            generator=loader.generator,
            persistent_workers=loader.persistent_workers,
            prefetch_factor=loader.prefetch_factor,
        )

    @property
    def _index_sampler(self) -> Any:
        return _ResumeIndices(DataLoader._index_sampler.fget(self), self)  # type: ignore[attr-defined]

    def __iter__(self) -> Any:
        self._skip, self._pending_skip = self._pending_skip, 0
        self._delivered = self._skip
        iterator = super().__iter__()  # the index iterators are created here and read `_skip`
        self._skip = 0
        return self._count(iterator)

    def _count(self, iterator: Any) -> Iterator[Any]:
        for batch in iterator:
            self._delivered += 1
            yield batch

    def _sampler_epoch(self) -> int | None:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if sampler is not None and hasattr(sampler, "epoch"):
                return int(sampler.epoch)
        return None

    def state_dict(self) -> dict[str, Any]:
        """Batches delivered in the current epoch (0 once the epoch is complete) and the sampler's epoch."""
        if self._delivered >= len(self):
            return {"batches": 0, "epoch": None}
        return {"batches": int(self._delivered), "epoch": self._sampler_epoch()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iteration continue the saved epoch after its delivered batches."""
        if "batches" not in state_dict:
            raise ValueError(f"loader state {state_dict!r} lacks 'batches'; expected ResumableDataLoader.state_dict()")
        self._pending_skip = int(state_dict["batches"])
        epoch = state_dict.get("epoch")
        if epoch is not None:
            for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
                set_epoch = getattr(sampler, "set_epoch", None)
                if callable(set_epoch):
                    set_epoch(int(epoch))
            if hasattr(self.dataset, "epoch"):
                self.dataset.epoch = int(epoch)


class ResumableChipDataModule(ChipDataModule):
    """ChipDataModule whose training loader is a `ResumableDataLoader`.

    Under DDP, Lightning wraps the epoch sampler in a `DistributedSamplerWrapper`, which shards the
    epoch's draw across processes and forwards `set_epoch` to it.
    """

    def train_dataloader(self) -> DataLoader[Sample]:
        return ResumableDataLoader.like(super().train_dataloader())


def data_pos_weight(params: Params, prepared: PreparedData) -> float | None:
    """Raw negative:positive pixel ratio of the train split, for loss terms with pos_weight='data'.

    Each term applies its own weighting (linear / sqrt / log) and cap to this ratio.
    """
    if not any(term.pos_weight == "data" or term.class_weighting != "none" for term in params.train.loss):
        return None
    train = prepared.catalog[prepared.catalog["split"] == "train"]
    valid = train["valid_fraction"].to_numpy() if "valid_fraction" in train else np.ones(len(train))
    n_pos = float((train["positive_fraction"].to_numpy() * valid).sum())
    n_valid = float(valid.sum())
    return (n_valid - n_pos) / n_pos if n_pos > 0 else float("inf")


def class_pixel_counts(params: Params, datamodule: ChipDataModule, batch: int = 64) -> list[float] | None:
    """Labelled valid pixels per class in the train split (softmax models with class_weights='frequency').

    Reads the train labels once in batches (review-ledger corrections applied); a label value outside
    0..num_classes-1 (other than 255) stops with the value, its pixel count and the store.
    """
    n_classes = params.model.num_classes
    if n_classes < 2 or not any(term.class_weights == "frequency" for term in params.train.loss):
        return None
    dataset = datamodule.dataset("train")
    counts = np.zeros(IGNORE_INDEX + 1, dtype=np.int64)
    for start in range(0, len(dataset), batch):
        _, label, valid = dataset.read_raw_batch(np.arange(start, min(start + batch, len(dataset))))
        counts += np.bincount(label[valid].ravel().astype(np.int64), minlength=IGNORE_INDEX + 1)[: IGNORE_INDEX + 1]
    bad = [(value, int(counts[value])) for value in range(n_classes, IGNORE_INDEX) if counts[value]]
    if bad:
        listed = ", ".join(f"{value} ({count} px)" for value, count in bad[:10])
        raise ValueError(
            f"train labels of store {dataset.store} hold value(s) {listed} outside the classes 0..{n_classes - 1} "
            f"of model.num_classes={n_classes}; re-ingest with a class_map (or 'ignore'), or raise num_classes"
        )
    return [float(c) for c in counts[:n_classes]]


def build_datamodule(params: Params, prepared: PreparedData) -> ResumableChipDataModule:
    """The Lightning data module of a prepared run (sampler, augmentation and normalisation wired in)."""

    stats = NormalizationStats.load(prepared.stats_path)
    stats.check_compatible(prepared.bands, params.data.normalize.method)
    meta = {band["name"]: band for band in read_store_meta(prepared.store)["bands"]}
    modalities = [meta[name]["modality"] for name in prepared.bands]
    optical = [bool(meta[name]["optical"]) for name in prepared.bands]
    cfg = params.data

    def sampler_factory(positive_fraction: np.ndarray) -> Any:
        sampler = build_sampler(cfg.sampler, positive_fraction, seed=params.seed)
        return sampler if sampler is not None else EpochShuffleSampler(len(positive_fraction), seed=params.seed)

    return ResumableChipDataModule(
        prepared.store,
        prepared.catalog,
        bands=prepared.bands,
        normalizer=stats,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        sampler_factory=sampler_factory,
        augment=Augmenter(cfg.augment, modalities, optical),
        batch_augment=BatchAugmenter(cfg.augment),
        seed=params.seed,
        corrections=prepared.corrections,
    )

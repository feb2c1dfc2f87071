"""PyTorch datasets and the Lightning data module over a chip store.

Chips are read straight from the Zarr arrays (one chunk per chip), so a batch touches only
its own chips and DataLoader workers each open the store lazily. DataLoaders fetch a whole
batch at once through `ChipDataset.__getitems__`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from workbench.arrays import IGNORE_INDEX
from workbench.data.augment import batch_augment_generator
from workbench.data.store import ChipReader, read_store_meta

Sample = dict[str, Any]


class BandSelectionError(ValueError):
    """Requested bands are not in the store."""


def resolve_band_indices(available: Sequence[str], wanted: Sequence[str] | None) -> list[int]:
    """Positions of `wanted` bands in `available` (all bands when `wanted` is None)."""
    if wanted is None:
        return list(range(len(available)))
    missing = [band for band in wanted if band not in available]
    if missing:
        raise BandSelectionError(f"bands {missing} are not in the store; available bands: {list(available)}")
    return [list(available).index(band) for band in wanted]


class ChipDataset(Dataset[Sample]):
    """Chips of a store as dicts of tensors: image (C,H,W), label (H,W), valid (H,W), target (H,W), index.

    `indices` are chip positions in the store; `normalizer` maps a raw (C,H,W) array to model input;
    `augment` is called on each sample dict (after normalisation) with a torch.Generator.
    """

    def __init__(
        self,
        store: str | Path,
        indices: Sequence[int] | np.ndarray,
        bands: Sequence[str] | None = None,
        normalizer: Any | None = None,
        augment: Callable[..., Sample] | None = None,
        seed: int = 0,
        corrections: Mapping[int, Path] | None = None,
    ) -> None:
        self.store = Path(store)
        self.corrections = dict(corrections or {})  # store position -> corrected label (review ledger "fix")
        meta = read_store_meta(self.store)
        self.all_bands = [band["name"] for band in meta["bands"]]
        self.band_index = resolve_band_indices(self.all_bands, bands)
        self.bands = [self.all_bands[i] for i in self.band_index]
        self.modalities = [meta["bands"][i]["modality"] for i in self.band_index]
        self.optical = [bool(meta["bands"][i]["optical"]) for i in self.band_index]
        self.indices = np.asarray(indices, dtype=np.int64)
        self.normalizer = normalizer
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._group: Any = None

    def __len__(self) -> int:
        return len(self.indices)

    def _readers(self) -> dict[str, ChipReader]:
        if self._group is None:
            self._group = {name: ChipReader(self.store, name) for name in ("image", "label", "valid")}
        readers: dict[str, ChipReader] = self._group
        return readers

    def close(self) -> None:
        """Release the store's mapped shard files (reads map them again)."""
        for reader in (self._group or {}).values():
            reader.close()

    def read_raw(self, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw image (selected bands), label and valid mask of the chip at dataset position `position`.

        Fresh, writable arrays owned by the caller (a batch of one, see `read_raw_batch`).
        """
        image, label, valid = self.read_raw_batch([position])
        return image[0], label[0], valid[0]

    def read_raw_batch(self, positions: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw images (n, C, H, W), labels (n, H, W) and valid masks of several dataset positions.

        Each chip is read straight into its slot of one batch array, so a batch costs one copy
        from the page cache per chip and array and no stacking.
        """
        chips = self.indices[np.asarray(positions, dtype=np.int64)]
        readers = self._readers()
        image = readers["image"].read_batch(chips)
        if self.band_index != list(range(image.shape[1])):  # copy only when a band subset or order is asked for
            image = image[:, self.band_index]
        label, valid = readers["label"].read_batch(chips), readers["valid"].read_batch(chips)
        if self.corrections:
            from workbench.data.ledger import load_corrected

            for slot, chip in enumerate(chips):
                if int(chip) in self.corrections:
                    label[slot] = load_corrected(self.corrections[int(chip)], label.shape[1:])
        return image.astype(np.float32, copy=False), label, valid.astype(bool, copy=False)

    def __getitem__(self, position: int) -> Sample:
        image, label, valid = self.read_raw(position)
        if self.normalizer is not None:
            image = self.normalizer.apply(image)
        return self.build_sample(position, image, label, valid)

    def __getitems__(self, positions: Sequence[int]) -> list[Sample]:
        """The samples of several positions, read in one batched fetch (DataLoader calls this once per batch).

        Equal to `[self[p] for p in positions]`: normalisation runs once over the batch, the rest per sample.
        """
        image, label, valid = self.read_raw_batch(positions)
        if self.normalizer is not None:
            image = self.normalizer.apply(image)
        return [self.build_sample(int(p), image[i], label[i], valid[i]) for i, p in enumerate(positions)]

    def build_sample(self, position: int, image: np.ndarray, label: np.ndarray, valid: np.ndarray) -> Sample:
        """Sample dict of one normalised chip: nodata zeroed, ignore labels set, target derived, augmented.

        `image` may be modified in place (callers pass arrays they own).
        """
        image = np.asarray(image, dtype=np.float32)
        if not valid.all():
            image = image.copy() if not image.flags.writeable else image
            image[:, ~valid] = 0.0  # nodata carries no signal after normalisation
        label_t = torch.from_numpy(label.astype(np.int64))
        label_t[~torch.from_numpy(valid)] = IGNORE_INDEX
        sample: Sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": label_t,
            "valid": torch.from_numpy(valid),
            "index": int(self.indices[position]),
        }
        sample["target"] = target_from_label(sample["label"])
        if self.augment is not None:
            generator = torch.Generator().manual_seed(
                hash((self.seed, self.epoch, int(self.indices[position]))) % 2**63
            )
            sample = self.augment(sample, generator)
        return sample


def target_from_label(label: torch.Tensor, num_classes: int = 1) -> torch.Tensor:
    """The loss target of a label.

    Binary (`num_classes` 1): float, 1 for any foreground class, 0 for background and ignored pixels.
    Softmax (`num_classes` >= 2): long class ids, ignored pixels 0 (they are masked out of the loss by
    `loss_mask`); a class id >= num_classes is an error naming the value and its pixel count.
    """
    if num_classes < 2:
        return ((label > 0) & (label != IGNORE_INDEX)).float()
    labelled = label != IGNORE_INDEX
    bad = labelled & ((label < 0) | (label >= num_classes))
    if bool(bad.any()):
        values, counts = torch.unique(label[bad], return_counts=True)
        listed = ", ".join(f"{int(v)} ({int(c)} px)" for v, c in zip(values, counts, strict=True))
        raise ValueError(
            f"label value(s) {listed} are not classes of a model with num_classes={num_classes}; re-ingest "
            f"with a class_map onto 0..{num_classes - 1} (or 'ignore'), or raise model.num_classes"
        )
    return torch.where(labelled, label, torch.zeros_like(label)).long()


def loss_mask(batch: Sample) -> torch.Tensor:
    """Pixels that count for losses and metrics: valid input and a label."""
    mask: torch.Tensor = batch["valid"] & (batch["label"] != IGNORE_INDEX)
    return mask


class ChipDataModule(L.LightningDataModule):
    """Train / val / test loaders over a store whose catalog carries a `split` column.

    The catalog passed in decides the split (so stages can hand over a catalog file with
    assigned splits); samplers and augmentation come from the workbench parameters.
    """

    def __init__(
        self,
        store: str | Path,
        catalog: pd.DataFrame,
        bands: Sequence[str] | None,
        normalizer: Any | None,
        batch_size: int = 16,
        num_workers: int = 0,
        sampler_factory: Callable[[np.ndarray], Any] | None = None,
        augment: Callable[..., Sample] | None = None,
        batch_augment: Callable[..., Sample] | None = None,
        seed: int = 0,
        corrections: Mapping[int, Path] | None = None,
    ) -> None:
        super().__init__()
        self.corrections = dict(corrections or {})
        self.store = Path(store)
        self.catalog = catalog.reset_index(drop=True)
        self.bands = bands
        self.normalizer = normalizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sampler_factory = sampler_factory
        self.augment = augment
        self.batch_augment = batch_augment
        self.seed = seed
        self._sampler: Any = None

    def split_indices(self, split: str) -> np.ndarray:
        """Store positions of the chips in `split`; an empty split is an error that says how to fix it."""
        positions = np.flatnonzero(self.catalog["split"].to_numpy() == split)
        if positions.size == 0:
            counts = self.catalog["split"].value_counts().to_dict()
            raise ValueError(
                f"split {split!r} of store {self.store} has no chips (split counts: {counts}); "
                "adjust data.split (block_deg, percentages or holdout regions) or add chips"
            )
        return positions

    def dataset(self, split: str, augment: bool = False) -> ChipDataset:
        """A dataset over one split, with training augmentation when `augment` is True."""
        return ChipDataset(
            self.store,
            self.split_indices(split),
            bands=self.bands,
            normalizer=self.normalizer,
            augment=self.augment if augment else None,
            seed=self.seed,
            corrections=self.corrections,
        )

    def _loader(self, dataset: ChipDataset, shuffle: bool, sampler: Any = None) -> DataLoader[Sample]:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,  # workers re-created per epoch see the current augmentation epoch
            generator=generator,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader[Sample]:
        dataset = self.dataset("train", augment=True)
        sampler = None
        if self.sampler_factory is not None:
            positive = self.catalog["positive_fraction"].to_numpy()[dataset.indices]
            sampler = self.sampler_factory(positive)
        self._sampler = sampler
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        dataset.epoch = epoch
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return self._loader(dataset, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader[Sample]:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader[Sample]:
        return self._loader(self.dataset("test"), shuffle=False)

    def on_after_batch_transfer(self, batch: Sample, dataloader_idx: int) -> Sample:
        if self.batch_augment is not None and self.trainer is not None and self.trainer.training:
            step = self.trainer.global_step
            batch = self.batch_augment(batch, batch_augment_generator(self.seed, step))
        return batch

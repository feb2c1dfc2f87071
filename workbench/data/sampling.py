"""Chip samplers for rare-positive segmentation, and prevalence views for evaluation.

Positives (chips holding the target class) are often a small minority; drawing chips uniformly
lets easy negatives dominate the gradient. Each sampler yields dataset positions for one epoch,
is reproducible from (seed, epoch) and takes `set_epoch` so that Lightning / DDP advance it:

* `BalancedSampler`: a fixed share of positives per epoch;
* `CurriculumSampler`: all positives plus a number of negatives per positive that steps up at
  given epochs (the default schedule is 1:1 from epoch 0, 1:5 from 10, 1:10 from 30, 1:15 from 50,
  1:20 from 100);
* `HardNegativeSampler`: CryoSentinel's weighted draw with replacement (positives together weigh
  `ratio` times the negatives).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from workbench.params import CurriculumStage, SamplerConfig

DEFAULT_CURRICULUM = [
    CurriculumStage(epoch=0, negatives_per_positive=1),
    CurriculumStage(epoch=10, negatives_per_positive=5),
    CurriculumStage(epoch=30, negatives_per_positive=10),
    CurriculumStage(epoch=50, negatives_per_positive=15),
    CurriculumStage(epoch=100, negatives_per_positive=20),
]


class SamplerError(ValueError):
    """A sampler cannot be built from the given chips or parameters."""


def positive_chips(positive_fraction: np.ndarray, threshold: float) -> np.ndarray:
    """Chips counted as positive: label fraction >= threshold (CryoSentinel), or > 0 when threshold is 0."""
    fraction = np.asarray(positive_fraction, dtype=np.float64)
    result: np.ndarray = fraction >= threshold if threshold > 0 else fraction > 0
    return result


def _as_mask(is_positive: Sequence[bool] | np.ndarray) -> np.ndarray:
    mask = np.asarray(is_positive).astype(bool).ravel()
    if mask.size == 0:
        raise SamplerError("no chips to sample from (empty train split)")
    return mask


def _require_both_classes(mask: np.ndarray, what: str) -> None:
    n_pos = int(mask.sum())
    if n_pos == 0 or n_pos == mask.size:
        kind = "positive" if n_pos == 0 else "negative"
        raise SamplerError(
            f"{what} needs positive and negative chips, but the train split has no {kind} chip "
            f"({n_pos} of {mask.size} positive); lower sampler.positive_threshold or use sampler.kind=random"
        )


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """`n` items of `pool`: without replacement when possible, else every item once plus a random remainder."""
    if n <= len(pool):
        return rng.choice(pool, size=n, replace=False)
    repeats, rest = divmod(n, len(pool))
    return np.concatenate([np.tile(pool, repeats), rng.choice(pool, size=rest, replace=False)])


class EpochSampler(Sampler[int]):
    """Base: indices of an epoch come from `_epoch_indices(rng)` with an RNG seeded by (seed, epoch)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw `__iter__` yields (called by the training loop)."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def indices(self) -> np.ndarray:
        """The dataset positions of the current epoch."""
        return self._epoch_indices(self._rng())

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        raise NotImplementedError


class BalancedSampler(EpochSampler):
    """Each epoch: `epoch_size` positions of which round(positive_fraction * epoch_size) are positive chips.

    Each class is drawn without replacement while it has enough chips, else every chip once plus
    a random remainder; the epoch is then shuffled.
    """

    def __init__(
        self,
        is_positive: Sequence[bool] | np.ndarray,
        positive_fraction: float = 0.5,
        epoch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.mask = _as_mask(is_positive)
        if not 0 < positive_fraction < 1:
            raise SamplerError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
        _require_both_classes(self.mask, "the balanced sampler")
        self.positive_fraction = positive_fraction
        self.epoch_size = int(epoch_size) if epoch_size is not None else self.mask.size
        self.positives = np.flatnonzero(self.mask)
        self.negatives = np.flatnonzero(~self.mask)

    def __len__(self) -> int:
        return self.epoch_size

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        n_pos = round(self.positive_fraction * self.epoch_size)
        chosen = np.concatenate(
            [_draw(rng, self.positives, n_pos), _draw(rng, self.negatives, self.epoch_size - n_pos)]
        )
        return rng.permutation(chosen)


class CurriculumSampler(EpochSampler):
    """Each epoch: the positives plus `negatives_per_positive` negatives each, stepping at stage epochs.

    Without `epoch_size` every positive appears once per epoch; with it, the epoch holds
    `epoch_size` chips in the same positive:negative proportion. Negatives are drawn without
    replacement when there are enough. The epoch length therefore changes with the stage.
    """

    def __init__(
        self,
        is_positive: Sequence[bool] | np.ndarray,
        stages: Sequence[CurriculumStage] | None = None,
        seed: int = 0,
        epoch_size: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.mask = _as_mask(is_positive)
        _require_both_classes(self.mask, "the curriculum sampler")
        self.stages = sorted(stages or DEFAULT_CURRICULUM, key=lambda stage: stage.epoch)
        if self.stages[0].epoch != 0:
            raise SamplerError(
                f"the curriculum must start at epoch 0 (first stage is at epoch {self.stages[0].epoch}); "
                "add a stage with epoch: 0"
            )
        epochs = [stage.epoch for stage in self.stages]
        if len(set(epochs)) != len(epochs):
            raise SamplerError(f"curriculum stages repeat an epoch: {epochs}")
        self.epoch_size = epoch_size
        self.positives = np.flatnonzero(self.mask)
        self.negatives = np.flatnonzero(~self.mask)

    def negatives_per_positive(self, epoch: int | None = None) -> float:
        """The ratio of the stage active at `epoch` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        active = [stage for stage in self.stages if stage.epoch <= epoch]
        return float(active[-1].negatives_per_positive)

    def _counts(self) -> tuple[int, int]:
        ratio = self.negatives_per_positive()
        if self.epoch_size is None:
            n_pos = len(self.positives)
            return n_pos, round(ratio * n_pos)
        n_pos = max(1, round(self.epoch_size / (1 + ratio)))
        return n_pos, self.epoch_size - n_pos

    def __len__(self) -> int:
        return sum(self._counts())

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        n_pos, n_neg = self._counts()
        chosen = np.concatenate([_draw(rng, self.positives, n_pos), _draw(rng, self.negatives, n_neg)])
        return rng.permutation(chosen)


class HardNegativeSampler(EpochSampler):
    """CryoSentinel's sampler: weights ratio/n_pos for positives and 1/n_neg for negatives, drawn with replacement.

    Positives are chips whose label fraction is >= `threshold`; in expectation a share
    ratio / (ratio + 1) of the draws is positive. Without any positive (or negative) chip the draw is uniform.
    """

    def __init__(
        self,
        positive_fraction_per_chip: Sequence[float] | np.ndarray,
        threshold: float = 0.002,
        ratio: float = 3.0,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        fraction = np.asarray(positive_fraction_per_chip, dtype=np.float64).ravel()
        self.mask = _as_mask(positive_chips(fraction, threshold))
        if ratio <= 0:
            raise SamplerError(f"hard-negative ratio must be positive, got {ratio}")
        self.ratio = ratio
        self.num_samples = int(num_samples) if num_samples is not None else self.mask.size
        self.weights = self._weights()

    def _weights(self) -> torch.Tensor:
        n_pos = int(self.mask.sum())
        n_neg = self.mask.size - n_pos
        if n_pos == 0 or n_neg == 0:
            return torch.ones(self.mask.size, dtype=torch.float64)
        weights = np.where(self.mask, self.ratio / n_pos, 1.0 / n_neg)
        return torch.as_tensor(weights, dtype=torch.float64)

    def __len__(self) -> int:
        return self.num_samples

    def _epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        drawn = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        result: np.ndarray = drawn.numpy()
        return result


def build_sampler(cfg: SamplerConfig, positive_fraction: np.ndarray, seed: int) -> EpochSampler | None:
    """The sampler described by `cfg` over chips with these label fractions; None means plain shuffling."""
    if cfg.kind == "random":
        return None
    if cfg.kind == "hard_negative":
        return HardNegativeSampler(
            positive_fraction,
            threshold=cfg.positive_threshold,
            ratio=cfg.hard_negative_ratio,
            num_samples=cfg.epoch_size,
            seed=seed,
        )
    is_positive = positive_chips(positive_fraction, cfg.positive_threshold)
    if cfg.kind == "balanced":
        return BalancedSampler(is_positive, cfg.positive_fraction, epoch_size=cfg.epoch_size, seed=seed)
    return CurriculumSampler(is_positive, cfg.curriculum or DEFAULT_CURRICULUM, seed=seed, epoch_size=cfg.epoch_size)


class PrevalenceIndices(np.ndarray):
    """Sorted chip positions of a prevalence view, with the ratio requested and the ratio achieved.

    `achieved_ratio` (negatives per positive) is below `ratio` when there are too few negatives;
    then every negative is included and `complete` is False.
    """

    ratio: float
    achieved_ratio: float
    complete: bool

    def __array_finalize__(self, obj: Any) -> None:
        self.ratio = getattr(obj, "ratio", float("nan"))
        self.achieved_ratio = getattr(obj, "achieved_ratio", float("nan"))
        self.complete = getattr(obj, "complete", False)


def prevalence_view(is_positive: Sequence[bool] | np.ndarray, ratio: int, seed: int = 0) -> PrevalenceIndices:
    """All positive chips plus negatives subsampled to positives:negatives = 1:ratio (sorted positions).

    One inference pass can then be scored at several realistic prevalences (1:200, 1:500, ...).
    Negatives come from one seeded permutation, so views of a smaller ratio are subsets of views of
    a larger ratio. When there are fewer than ratio * n_pos negatives all of them are used; check
    `.achieved_ratio` / `.complete` on the result.
    """
    mask = _as_mask(is_positive)
    if ratio < 0:
        raise SamplerError(f"prevalence ratio must be >= 0, got {ratio}")
    positives = np.flatnonzero(mask)
    if positives.size == 0:
        raise SamplerError("a prevalence view needs at least one positive chip; the split has none")
    negatives = np.random.default_rng(seed).permutation(np.flatnonzero(~mask))
    wanted = round(ratio * positives.size)
    chosen = negatives[:wanted]
    view = np.sort(np.concatenate([positives, chosen])).view(PrevalenceIndices)
    view.ratio = float(ratio)
    view.achieved_ratio = chosen.size / positives.size
    view.complete = chosen.size == wanted
    return view

"""Samplers: class shares, curriculum boundaries, determinism, weighted draws and prevalence views."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch.utils.data import DataLoader, Sampler, TensorDataset

from workbench.data.sampling import (
    DEFAULT_CURRICULUM,
    BalancedSampler,
    CurriculumSampler,
    HardNegativeSampler,
    SamplerError,
    build_sampler,
    positive_chips,
    prevalence_view,
)
from workbench.params import CurriculumStage, SamplerConfig


def _mask(n_pos: int, n_neg: int, seed: int = 0) -> np.ndarray:
    mask = np.array([True] * n_pos + [False] * n_neg)
    return np.random.default_rng(seed).permutation(mask)


def test_balanced_sampler_share_and_uniformity() -> None:
    mask = _mask(20, 380)
    sampler = BalancedSampler(mask, positive_fraction=0.3, epoch_size=100, seed=1)
    assert isinstance(sampler, Sampler) and len(sampler) == 100
    counts = np.zeros(mask.size)
    epochs = 300
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        drawn = np.array(list(sampler))
        assert drawn.size == 100 and mask[drawn].sum() == 30
        # 30 positives out of 20 chips: each positive at least once
        assert set(np.flatnonzero(mask)) <= set(drawn.tolist())
        np.add.at(counts, drawn, 1)
    # each negative is drawn in an epoch with probability 70/380; totals are binomial(epochs, p)
    p = 70 / 380
    neg_counts = counts[~mask]
    sd = math.sqrt(epochs * p * (1 - p))
    assert abs(neg_counts.mean() - epochs * p) < 4 * sd / math.sqrt(neg_counts.size)
    assert np.all(np.abs(neg_counts - epochs * p) < 5 * sd)


def test_balanced_sampler_deterministic_per_seed_and_epoch() -> None:
    mask = _mask(10, 90)
    a, b = BalancedSampler(mask, seed=3), BalancedSampler(mask, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    assert list(a) != list(BalancedSampler(mask, seed=4))


def test_balanced_sampler_needs_both_classes() -> None:
    with pytest.raises(SamplerError, match="no positive chip"):
        BalancedSampler(np.zeros(10, bool))
    with pytest.raises(SamplerError, match="no negative chip"):
        BalancedSampler(np.ones(10, bool))


def test_curriculum_steps_at_epoch_boundaries() -> None:
    mask = _mask(10, 200)
    sampler = CurriculumSampler(mask, DEFAULT_CURRICULUM, seed=0)
    expected = {0: 1, 9: 1, 10: 5, 29: 5, 30: 10, 49: 10, 50: 15, 99: 15, 100: 20, 299: 20}
    for epoch, ratio in expected.items():
        sampler.set_epoch(epoch)
        drawn = np.array(list(sampler))
        n_pos = int(mask[drawn].sum())
        n_neg = drawn.size - n_pos
        assert len(sampler) == drawn.size
        assert n_pos == 10 and sorted(drawn[mask[drawn]]) == sorted(np.flatnonzero(mask))
        assert n_neg == 10 * ratio
        # enough negatives: no negative repeats within the epoch
        assert len(set(drawn[~mask[drawn]].tolist())) == n_neg


def test_curriculum_with_few_negatives_and_epoch_size() -> None:
    mask = _mask(10, 30)
    stages = [CurriculumStage(epoch=0, negatives_per_positive=5)]
    drawn = np.array(list(CurriculumSampler(mask, stages, seed=2)))
    negatives = drawn[~mask[drawn]]
    assert negatives.size == 50 and set(negatives.tolist()) == set(np.flatnonzero(~mask).tolist())
    sized = CurriculumSampler(mask, [CurriculumStage(epoch=0, negatives_per_positive=3)], seed=2, epoch_size=40)
    drawn = np.array(list(sized))
    assert drawn.size == 40 and mask[drawn].sum() == 10
    with pytest.raises(SamplerError, match="start at epoch 0"):
        CurriculumSampler(mask, [CurriculumStage(epoch=2, negatives_per_positive=1)])


def test_hard_negative_expected_positive_share() -> None:
    rng = np.random.default_rng(0)
    fraction = np.where(rng.random(1000) < 0.05, rng.uniform(0.002, 0.5, 1000), rng.uniform(0, 0.0019, 1000))
    sampler = HardNegativeSampler(fraction, threshold=0.002, ratio=3, num_samples=4000, seed=7)
    is_pos = fraction >= 0.002
    drawn = np.array(list(sampler))
    assert drawn.size == 4000 and len(sampler) == 4000
    share = is_pos[drawn].mean()
    expected = 3 / 4  # positives weigh 3 : 1 against negatives in total
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / drawn.size)
    # positives are drawn uniformly among themselves: each has weight 3 / n_pos of a total 4
    per_pos = np.bincount(drawn, minlength=fraction.size)[is_pos]
    p = 3 / 4 / is_pos.sum()
    assert abs(per_pos.mean() - 4000 * p) < 1e-9 + 4 * math.sqrt(4000 * p * (1 - p) / is_pos.sum())
    sampler.set_epoch(1)
    again = HardNegativeSampler(fraction, threshold=0.002, ratio=3, num_samples=4000, seed=7)
    again.set_epoch(1)
    assert list(sampler) == list(again) and list(sampler) != drawn.tolist()


def test_build_sampler_kinds() -> None:
    fraction = np.array([0.0, 0.001, 0.002, 0.3, 0.0, 0.0, 0.5, 0.0])
    assert positive_chips(fraction, 0.002).tolist() == [False, False, True, True, False, False, True, False]
    assert positive_chips(fraction, 0.0).sum() == 4
    assert build_sampler(SamplerConfig(kind="random"), fraction, 0) is None
    balanced = build_sampler(SamplerConfig(kind="balanced", epoch_size=6), fraction, 0)
    assert isinstance(balanced, BalancedSampler) and len(balanced) == 6
    hard = build_sampler(SamplerConfig(kind="hard_negative"), fraction, 0)
    assert isinstance(hard, HardNegativeSampler) and len(hard) == fraction.size
    curriculum = build_sampler(SamplerConfig(kind="curriculum"), fraction, 0)
    assert isinstance(curriculum, CurriculumSampler) and len(curriculum) == 6  # 3 positives, 1:1


def test_sampler_works_in_a_dataloader() -> None:
    import torch

    mask = _mask(4, 12)
    dataset = TensorDataset(torch.arange(16))
    sampler = BalancedSampler(mask, positive_fraction=0.5, epoch_size=8, seed=0)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    values = torch.cat([batch[0] for batch in loader]).numpy()
    assert values.size == 8 and mask[values].sum() == 4


def test_prevalence_view_ratio_nesting_and_shortfall() -> None:
    mask = _mask(5, 2000, seed=3)
    view = prevalence_view(mask, 200, seed=1)
    assert mask[view].sum() == 5 and (~mask[view]).sum() == 1000
    assert view.achieved_ratio == 200 and view.complete
    assert np.all(np.diff(view) > 0)
    smaller = prevalence_view(mask, 100, seed=1)
    assert set(smaller.tolist()) <= set(view.tolist())
    short = prevalence_view(mask, 1000, seed=1)
    assert (~mask[short]).sum() == 2000 and short.achieved_ratio == 400 and not short.complete
    with pytest.raises(SamplerError, match="at least one positive"):
        prevalence_view(np.zeros(10, bool), 10)

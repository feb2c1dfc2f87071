"""Augmentation: geometry keeps pixels aligned, colour changes stay on their bands, batch methods, boundaries."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from workbench.data.augment import (
    Augmenter,
    BatchAugmenter,
    apply_boundary,
    copy_paste,
    label_boundary,
    rescale,
    slide_mix,
)
from workbench.params import AugmentConfig

H = W = 8
MODALITIES = ["S2L2A", "S2L2A", "S1GRD", "DEM"]
OPTICAL = [True, True, False, False]
OFF = {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0}


def _sample(height: int = H, width: int = W) -> dict[str, torch.Tensor]:
    """Pixel (i, j) holds code i*W+j in every band (times the band number); label and valid derive from it."""
    code = torch.arange(height * width, dtype=torch.float32).reshape(height, width)
    image = torch.stack([code * (b + 1) for b in range(len(MODALITIES))])
    label = (code.long() % 5 == 0).long()
    label[code.long() % 11 == 0] = 255
    valid = code.long() % 3 != 0
    return {"image": image, "label": label, "valid": valid}


def _consistent(out: dict[str, torch.Tensor]) -> bool:
    """Every output pixel carries the label/valid that belonged to its input pixel."""
    code = out["image"][0].round().long()
    expected_label = (code % 5 == 0).long()
    expected_label[code % 11 == 0] = 255
    bands_agree = all(torch.equal(out["image"][b], out["image"][0] * (b + 1)) for b in range(len(MODALITIES)))
    return bands_agree and torch.equal(out["label"], expected_label) and torch.equal(out["valid"], code % 3 != 0)


def test_flip_twice_is_identity_and_flip_matches_torch() -> None:
    aug = Augmenter(AugmentConfig(**{**OFF, "hflip": 1.0}), MODALITIES, OPTICAL)
    sample = _sample()
    once = aug(sample, torch.Generator().manual_seed(0))
    assert torch.equal(once["image"], torch.flip(sample["image"], dims=(-1,)))
    twice = aug(once, torch.Generator().manual_seed(1))
    for key in ("image", "label", "valid"):
        assert torch.equal(twice[key], sample[key])


def test_rot90_moves_label_and_valid_with_image() -> None:
    aug = Augmenter(AugmentConfig(**{**OFF, "rot90": 1.0}), MODALITIES, OPTICAL)
    sample = _sample()
    out = aug(sample, torch.Generator().manual_seed(3))
    matches = [k for k in (1, 2, 3) if torch.equal(out["image"], torch.rot90(sample["image"], k, dims=(-2, -1)))]
    assert len(matches) == 1
    assert torch.equal(out["label"], torch.rot90(sample["label"], matches[0]))
    assert _consistent(out)


def test_d4_covers_all_eight_elements_and_stays_consistent() -> None:
    aug = Augmenter(AugmentConfig(hflip=0.5, vflip=0.5, rot90=0.75), MODALITIES, OPTICAL)
    sample = _sample()
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        out = aug(sample, generator)
        assert _consistent(out)
        seen.add(tuple(out["image"][0].flatten().tolist()))
    assert len(seen) == 8


def test_non_square_chips_skip_rotation() -> None:
    aug = Augmenter(AugmentConfig(hflip=0.5, vflip=0.5, rot90=1.0), MODALITIES, OPTICAL)
    out = aug(_sample(6, 10), torch.Generator().manual_seed(0))
    assert out["image"].shape == (4, 6, 10)


def test_multiscale_pad_and_crop_by_hand() -> None:
    sample = _sample()
    small = rescale(sample, 0.5)  # 4x4 placed in the centre rows/cols 2..5
    assert torch.equal(small["label"][2:6, 2:6], sample["label"][::2, ::2])
    assert torch.equal(small["valid"][2:6, 2:6], sample["valid"][::2, ::2])
    border = torch.ones(H, W, dtype=torch.bool)
    border[2:6, 2:6] = False
    assert not small["valid"][border].any() and (small["label"][border] == 255).all()
    assert (small["image"][:, border] == 0).all()
    large = rescale(sample, 2.0)  # 16x16, centre crop starting at 4
    rows = (torch.arange(H) + 4) // 2
    assert torch.equal(large["label"], sample["label"][rows][:, rows])
    assert torch.equal(large["valid"], sample["valid"][rows][:, rows])
    aug = Augmenter(AugmentConfig(**OFF, multiscale=1.0, scale_range=(0.8, 1.2)), MODALITIES, OPTICAL)
    out = aug(sample, torch.Generator().manual_seed(2))
    assert out["image"].shape == sample["image"].shape and out["label"].dtype == torch.int64


def test_brightness_contrast_leaves_non_optical_bands_exact() -> None:
    cfg = AugmentConfig(**OFF, brightness=1.0, brightness_limit=0.3)
    aug = Augmenter(cfg, MODALITIES, OPTICAL)
    sample = _sample()
    sample["image"] = torch.randn(4, H, W, generator=torch.Generator().manual_seed(5))
    out = aug(sample, torch.Generator().manual_seed(1))
    assert torch.equal(out["image"][2:], sample["image"][2:])
    assert not torch.equal(out["image"][:2], sample["image"][:2])
    # an affine change of the optical bands: out = a * x + c with a in [0.7, 1.3]
    x, y = sample["image"][0].flatten(), out["image"][0].flatten()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert 0.7 - 1e-5 <= slope <= 1.3 + 1e-5
    assert torch.allclose(y, slope * x + (y.mean() - slope * x.mean()), atol=1e-5)


def test_spectral_jitter_gain_per_modality_bounded_by_eps() -> None:
    eps = {"S2L2A": 0.03, "S1GRD": 0.07}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aug = Augmenter(AugmentConfig(**OFF, spectral_jitter=1.0, jitter_eps=eps), MODALITIES, OPTICAL)
    assert any("DEM" in str(w.message) for w in caught)
    sample = _sample()
    sample["image"] = torch.rand(4, H, W, generator=torch.Generator().manual_seed(0)) + 1.0
    generator = torch.Generator().manual_seed(0)
    gains = []
    for _ in range(100):
        out = aug(sample, generator)
        ratio = out["image"] / sample["image"]
        per_band = ratio.flatten(1)
        assert torch.allclose(per_band, per_band[:, :1].expand_as(per_band), atol=1e-6)  # one gain per band
        gains.append(per_band[:, 0])
    gains_t = torch.stack(gains)
    assert torch.allclose(gains_t[:, 0], gains_t[:, 1])  # one gain per modality group
    assert (gains_t[:, :2] - 1).abs().max() <= 0.03 + 1e-6
    assert (gains_t[:, 2] - 1).abs().max() <= 0.07 + 1e-6
    assert (gains_t[:, 2] - 1).abs().max() > 0.05  # the range is used
    assert torch.equal(gains_t[:, 3], torch.ones(100))  # DEM has no eps here
    with pytest.raises(ValueError, match="no entry for modalities"):
        Augmenter(AugmentConfig(spectral_jitter=0.5, jitter_eps={"S2L2A": 0.1}), ["X"], [False])


def _square_label(size: int = 14, lo: int = 3, hi: int = 9) -> torch.Tensor:
    label = torch.zeros(size, size, dtype=torch.long)
    label[lo:hi, lo:hi] = 1
    return label


def test_boundary_ignore_width_matches_hand_built_square() -> None:
    label = _square_label()  # square rows/cols 3..8
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[1:11, 1:11] = True  # 2 px outside the square
    expected[5:7, 5:7] = False  # 2 px inside the square are in the band; rows/cols 5..6 are not
    assert torch.equal(label_boundary(label, 2), expected)
    ring1 = torch.zeros(14, 14, dtype=torch.bool)
    ring1[2:10, 2:10] = True
    ring1[4:8, 4:8] = False
    assert torch.equal(label_boundary(label, 1), ring1)
    sample = {"image": torch.zeros(1, 14, 14), "label": label, "valid": torch.ones(14, 14, dtype=torch.bool)}
    out = apply_boundary(sample, "ignore", 2, 0.05)
    assert torch.equal(out["label"] == 255, expected)
    assert torch.equal(out["target"], torch.where(expected, 0.0, label.float()))


def test_boundary_soft_values_and_default_target() -> None:
    label = _square_label()
    label[0, 13] = 255
    sample = {"image": torch.zeros(1, 14, 14), "label": label, "valid": torch.ones(14, 14, dtype=torch.bool)}
    out = apply_boundary(sample, "soft", 1, 0.1)
    band = label_boundary(label, 1)
    assert torch.equal(out["label"], label)
    assert torch.allclose(out["target"][band & (label == 1)], torch.tensor(0.9))
    assert torch.allclose(out["target"][band & (label == 0)], torch.tensor(0.1))
    assert (out["target"][~band & (label == 1)] == 1).all() and (out["target"][~band & (label == 0)] == 0).all()
    assert out["target"][0, 13] == 0
    plain = Augmenter(AugmentConfig(**OFF), ["S2L2A"], [True])(sample, torch.Generator())
    assert plain["target"].dtype == torch.float32
    assert torch.equal(plain["target"], torch.where(label == 255, 0, label).float())


def _batch(n: int = 4, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(n, H, W, generator=g) < 0.4).long()
    label[0] = 0  # sample 0 has no positive pixel
    return {
        "image": torch.randn(n, 3, H, W, generator=g),
        "label": label,
        "valid": torch.rand(n, H, W, generator=g) > 0.1,
        "chip_id": [f"c{i}" for i in range(n)],
        "index": torch.arange(n),
    }


def test_slide_mix_appends_rolled_copies() -> None:
    batch = _batch()
    batch["target"] = batch["label"].float()
    out = slide_mix(batch, p=1.0, copies=2, generator=torch.Generator().manual_seed(0))
    assert out["image"].shape[0] == 4 + 8 and len(out["chip_id"]) == 12
    assert torch.equal(out["image"][:4], batch["image"])  # originals kept
    for copy in range(8):
        source = int(out["index"][4 + copy])
        assert out["chip_id"][4 + copy] == f"c{source}"
        found = [
            (shift, dim)
            for dim in (-1, -2)
            for shift in range(1, H)
            if torch.equal(out["image"][4 + copy], torch.roll(batch["image"][source], shift, dims=dim))
        ]
        assert len(found) == 1
        shift, dim = found[0]
        for key in ("label", "valid", "target"):
            assert torch.equal(out[key][4 + copy], torch.roll(batch[key][source], shift, dims=dim))
        assert out["label"][4 + copy].sum() == batch["label"][source].sum()
    assert slide_mix(batch, p=0.0, copies=2)["image"].shape[0] == 4


def test_copy_paste_only_adds_donor_positive_pixels() -> None:
    batch = _batch(6, seed=1)
    out = copy_paste(batch, p=1.0, min_pixels=5, generator=torch.Generator().manual_seed(0))
    label, valid, image = batch["label"], batch["valid"], batch["image"]
    donor_pos = (label == 1) & valid
    changed_any = False
    for i in range(6):
        changed = (out["label"][i] != label[i]) | (out["valid"][i] != valid[i]) | (out["image"][i] != image[i]).any(0)
        changed_any |= bool(changed.any())
        # which donor? the one whose positive pixels explain every change
        donors = [j for j in range(6) if j != i and bool((donor_pos[j] | ~changed).all())]
        assert donors, f"sample {i} changed outside any donor's positives"
        j_matches = [
            j
            for j in donors
            if torch.equal(out["image"][i][:, donor_pos[j]], image[j][:, donor_pos[j]])
            and (out["label"][i][donor_pos[j]] == 1).all()
            and out["valid"][i][donor_pos[j]].all()
            and torch.equal(out["image"][i][:, ~donor_pos[j]], image[i][:, ~donor_pos[j]])
        ]
        assert j_matches and 0 not in j_matches  # sample 0 has no positives and cannot donate
        assert torch.equal(out["target"][i], torch.where(out["label"][i] == 255, 0, out["label"][i]).float())
    assert changed_any
    none = copy_paste(batch, p=1.0, min_pixels=10_000, generator=torch.Generator())
    assert torch.equal(none["image"], image) and torch.equal(none["label"], label)


def test_batch_augmenter_and_determinism() -> None:
    cfg = AugmentConfig(copy_paste=0.5, copy_paste_min_pixels=4, slide_mix=0.5, slide_mix_copies=1)
    batch = _batch()
    first = BatchAugmenter(cfg)(batch, torch.Generator().manual_seed(9))
    second = BatchAugmenter(cfg)(batch, torch.Generator().manual_seed(9))
    assert torch.equal(first["image"], second["image"]) and "target" in first
    assert first["image"].shape[0] == first["label"].shape[0] == first["target"].shape[0] >= 4
    assert not BatchAugmenter(AugmentConfig()).enabled


def test_bad_sample_errors() -> None:
    aug = Augmenter(AugmentConfig(), MODALITIES, OPTICAL)
    sample = _sample()
    with pytest.raises(KeyError, match="'valid' is missing"):
        aug({"image": sample["image"], "label": sample["label"]})
    with pytest.raises(ValueError, match=r"expected \(4, H, W\)"):
        aug({**sample, "image": sample["image"][:3]})

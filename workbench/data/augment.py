"""Augmentation of multiband chips: per-sample (`Augmenter`) and per-batch (`BatchAugmenter`).

A sample is a dict with "image" (C, H, W) float, "label" (H, W) int64 (255 = ignore) and
"valid" (H, W) bool; other (H, W) tensors (for example "target") ride along. Geometric changes
(flips, 90-degree rotations, rescaling, rolls) are applied identically to every spatial tensor so
labels and masks stay aligned with the pixels; colour changes touch only optical bands; spectral
jitter scales each modality by its own small gain. After augmentation every sample carries a
float "target" (H, W) that losses can use, optionally softened or ignored near label edges.

Batch-level methods work on collated dicts (image (B, C, H, W), label / valid / target (B, H, W)):
copy-paste of positive pixels between samples (CryoSentinel) and Sat-SlideMix circular rolls
(Hopkins et al., 2025), which append rolled copies to the batch. `batch_augment_generator` is the
one formula seeding them per training step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from workbench.arrays import IGNORE_INDEX
from workbench.data.store import BandSpec
from workbench.params import AugmentConfig

Sample = dict[str, Any]


# --------------------------------------------------------------------------- random draws


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _chance(p: float, generator: torch.Generator | None) -> bool:
    """True with probability p (no draw is made when p is 0)."""
    return p > 0 and _rand(generator) < p


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * _rand(generator)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator))


# --------------------------------------------------------------------------- masks and targets


def positive_mask(label: torch.Tensor) -> torch.Tensor:
    """Labelled pixels of a foreground class (label > 0 and not ignore)."""
    return (label > 0) & (label != IGNORE_INDEX)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square (Chebyshev) dilation of a (..., H, W) bool mask by `radius` pixels."""
    height, width = mask.shape[-2:]
    flat = mask.reshape(-1, 1, height, width).float()
    grown = F.max_pool2d(flat, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown.reshape(mask.shape) > 0


def label_boundary(label: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within `width` pixels (Chebyshev distance) of an edge between foreground and background.

    A foreground pixel is in the band when a background pixel lies within `width` of it and vice
    versa, so the band is `width` pixels thick on each side of the edge. Ignored pixels and the
    image border are not edges.
    """
    positive = positive_mask(label)
    background = label == 0
    return (positive & _dilate(background, width)) | (background & _dilate(positive, width))


def make_target(label: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Float target: `target` if given, else the label as float; 0 where the label is ignored."""
    base = label.float() if target is None else target.float()
    return torch.where(label == IGNORE_INDEX, torch.zeros_like(base), base)


def apply_boundary(sample: Sample, mode: str, width: int, soft_value: float) -> Sample:
    """Set "target" (and for mode=ignore, relabel edge pixels as ignore) near label edges.

    none: target = label. ignore: pixels within `width` of an edge become 255. soft: near-edge
    background gets `soft_value`, near-edge foreground 1 - soft_value.
    """
    label = sample["label"]
    out = dict(sample)
    if mode not in ("none", "ignore", "soft"):
        raise ValueError(f"augment.boundary must be none, ignore or soft, got {mode!r}")
    band = label_boundary(label, width) if mode != "none" else None
    if mode == "ignore" and band is not None:
        label = torch.where(band, torch.full_like(label, IGNORE_INDEX), label)
        out["label"] = label
    target = make_target(label, sample.get("target"))
    if mode == "soft" and band is not None:
        target = torch.where(band & (label == 0), torch.full_like(target, soft_value), target)
        target = torch.where(band & positive_mask(label), torch.full_like(target, 1.0 - soft_value), target)
    out["target"] = target
    return out


# --------------------------------------------------------------------------- geometry


def _spatial_keys(sample: Sample, batched: bool = False) -> list[str]:
    """Keys of tensors sharing the image's last two (H, W) dims (image, label, valid, target, planes)."""
    image = sample["image"]
    size = tuple(image.shape[-2:])
    plane_ndim = 3 if batched else 2
    keys = ["image"]
    for key, value in sample.items():
        is_plane = isinstance(value, torch.Tensor) and value.ndim == plane_ndim and tuple(value.shape[-2:]) == size
        if key != "image" and is_plane:
            keys.append(key)
    return keys


def _map_spatial(sample: Sample, fn: Any) -> Sample:
    out = dict(sample)
    for key in _spatial_keys(sample):
        out[key] = fn(sample[key])
    return out


def _fill_value(key: str, tensor: torch.Tensor) -> float | int | bool:
    if key == "label":
        return IGNORE_INDEX
    if tensor.dtype == torch.bool:
        return False
    return 0


def _fit(tensor: torch.Tensor, height: int, width: int, fill: float | int | bool) -> torch.Tensor:
    """Centre-crop or centre-pad the last two dims of `tensor` to (height, width)."""
    h, w = tensor.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if h >= height and w >= width:
        return tensor[..., top : top + height, left : left + width]
    out = torch.full((*tensor.shape[:-2], height, width), fill, dtype=tensor.dtype, device=tensor.device)
    src_top, src_left = max(top, 0), max(left, 0)
    dst_top, dst_left = max(-top, 0), max(-left, 0)
    rows, cols = min(h, height), min(w, width)
    out[..., dst_top : dst_top + rows, dst_left : dst_left + cols] = tensor[
        ..., src_top : src_top + rows, src_left : src_left + cols
    ]
    return out


def rescale(sample: Sample, scale: float) -> Sample:
    """Resize by `scale` (image bilinear, other planes nearest) then centre-crop / pad back to (H, W).

    Padded pixels are nodata: valid=False, label=255, image and other planes 0.
    """
    height, width = sample["image"].shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    out = dict(sample)
    for key in _spatial_keys(sample):
        tensor = sample[key]
        if key == "image":
            resized = F.interpolate(tensor[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            resized = resized.to(tensor.dtype)
        else:
            resized = F.interpolate(tensor[None, None].float(), size=size, mode="nearest")[0, 0].to(tensor.dtype)
        out[key] = _fit(resized, height, width, _fill_value(key, tensor))
    return out


# --------------------------------------------------------------------------- sample-level


class Augmenter:
    """Per-sample augmentation configured by `AugmentConfig`; call with a sample dict and a torch.Generator.

    Order: flips / rot90 (rot90 only for square chips), multiscale, spectral jitter, brightness /
    contrast (optical bands only), then boundary handling and the "target" plane. Colour changes
    are applied to the (already normalised) image tensor.
    """

    def __init__(self, cfg: AugmentConfig, modalities: Sequence[str], optical: Sequence[bool]) -> None:
        if len(modalities) != len(optical):
            raise ValueError(f"got {len(modalities)} band modalities but {len(optical)} optical flags")
        self.cfg = cfg
        self.modalities = list(modalities)
        self.optical = torch.tensor([bool(flag) for flag in optical], dtype=torch.bool)
        self.jitter_groups = self._jitter_groups()

    @classmethod
    def from_bands(cls, cfg: AugmentConfig, bands: Sequence[BandSpec]) -> Augmenter:
        """Build from a store's band table."""
        return cls(cfg, [band.modality for band in bands], [band.optical for band in bands])

    def _jitter_groups(self) -> list[tuple[str, float, torch.Tensor]]:
        groups = []
        for modality in dict.fromkeys(self.modalities):
            eps = float(self.cfg.jitter_eps.get(modality, 0.0))
            if eps > 0:
                index = torch.tensor([i for i, m in enumerate(self.modalities) if m == modality])
                groups.append((modality, eps, index))
        unmatched = sorted(set(self.modalities) - set(self.cfg.jitter_eps))
        if self.cfg.spectral_jitter > 0 and unmatched:
            message = (
                f"augment.jitter_eps has no entry for modalities {unmatched} (keys: {sorted(self.cfg.jitter_eps)})"
            )
            if not groups:
                raise ValueError(message + "; spectral jitter would change nothing")
            warnings.warn(message + "; their bands are not jittered", stacklevel=2)
        return groups

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        out = _checked_sample(sample, len(self.modalities))
        out = self.geometric(out, generator)
        image = out["image"]
        if _chance(self.cfg.spectral_jitter, generator):
            image = self.jitter(image, generator)
        if _chance(self.cfg.brightness, generator):
            image = self.brightness_contrast(image, out["valid"], generator)
        out["image"] = image
        return apply_boundary(out, self.cfg.boundary, self.cfg.boundary_width, self.cfg.soft_label_value)

    def geometric(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        """Flips, 90-degree rotation and multiscale, identical for every spatial tensor."""
        cfg = self.cfg
        out = sample
        if _chance(cfg.hflip, generator):
            out = _map_spatial(out, lambda t: torch.flip(t, dims=(-1,)))
        if _chance(cfg.vflip, generator):
            out = _map_spatial(out, lambda t: torch.flip(t, dims=(-2,)))
        height, width = out["image"].shape[-2:]
        if height == width and _chance(cfg.rot90, generator):
            k = _randint(1, 3, generator)
            out = _map_spatial(out, lambda t: torch.rot90(t, k, dims=(-2, -1)))
        if _chance(cfg.multiscale, generator):
            low, high = cfg.scale_range
            out = rescale(out, _uniform(low, high, generator))
        return out

    def jitter(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Multiply each modality's bands by one gain 1 + U(-eps, eps) (eps from cfg.jitter_eps)."""
        gains = torch.ones(image.shape[0], dtype=image.dtype, device=image.device)
        for _modality, eps, index in self.jitter_groups:
            gains[index.to(image.device)] = 1.0 + _uniform(-eps, eps, generator)
        return image * gains.view(-1, 1, 1)

    def brightness_contrast(
        self, image: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Contrast c = 1 + U(-l, l) around each optical band's valid mean, plus brightness U(-l, l).

        Non-optical bands are returned unchanged.
        """
        if not bool(self.optical.any()):
            return image
        limit = self.cfg.brightness_limit
        contrast = 1.0 + _uniform(-limit, limit, generator)
        brightness = _uniform(-limit, limit, generator)
        optical = self.optical.to(image.device)
        bands = image[optical]
        mask = valid if bool(valid.any()) else torch.ones_like(valid)
        centre = bands[:, mask].mean(dim=1).view(-1, 1, 1)
        out = image.clone()
        out[optical] = (bands - centre) * contrast + centre + brightness
        return out


def _checked_sample(sample: Sample, n_bands: int) -> Sample:
    for key in ("image", "label", "valid"):
        if key not in sample:
            raise KeyError(f"augmentation needs a sample with 'image', 'label' and 'valid'; {key!r} is missing")
    image = sample["image"]
    if image.ndim != 3 or image.shape[0] != n_bands:
        raise ValueError(f"sample image has shape {tuple(image.shape)}, expected ({n_bands}, H, W)")
    for key in ("label", "valid"):
        if tuple(sample[key].shape) != tuple(image.shape[-2:]):
            raise ValueError(f"sample {key} has shape {tuple(sample[key].shape)}, expected {tuple(image.shape[-2:])}")
    out = dict(sample)
    out["label"] = sample["label"].long()
    out["valid"] = sample["valid"].bool()
    return out


# --------------------------------------------------------------------------- batch-level


def _batch_target(batch: Sample) -> torch.Tensor:
    return make_target(batch["label"], batch.get("target"))


def copy_paste(batch: Sample, p: float, min_pixels: int = 32, generator: torch.Generator | None = None) -> Sample:
    """With probability p per sample, overlay the positive pixels of another sample of the batch in place.

    Donors are samples with at least `min_pixels` valid positive pixels. At each donor-positive
    pixel the receiver takes the donor's image values, label, target and valid=True; all other
    pixels are unchanged. Donors are read from the batch as it was before any paste.
    """
    image, label, valid = batch["image"], batch["label"], batch["valid"]
    target = _batch_target(batch)
    donor_pixels = positive_mask(label) & valid
    donors = torch.nonzero(donor_pixels.flatten(1).sum(dim=1) >= min_pixels).flatten().tolist()
    out = dict(batch)
    new_image, new_label, new_valid, new_target = image.clone(), label.clone(), valid.clone(), target.clone()
    for receiver in range(image.shape[0]):
        if not _chance(p, generator):
            continue
        candidates = [donor for donor in donors if donor != receiver]
        if not candidates:
            continue
        donor = candidates[_randint(0, len(candidates) - 1, generator)]
        mask = donor_pixels[donor]
        new_image[receiver][:, mask] = image[donor][:, mask]
        new_label[receiver][mask] = label[donor][mask]
        new_target[receiver][mask] = target[donor][mask]
        new_valid[receiver][mask] = True
    out.update(image=new_image, label=new_label, valid=new_valid, target=new_target)
    return out


def slide_mix(batch: Sample, p: float, copies: int = 1, generator: torch.Generator | None = None) -> Sample:
    """Sat-SlideMix: for each sample chosen with probability p, append `copies` circularly rolled copies.

    Each copy rolls along H or W (chosen at random) by an offset uniform in 1..size-1, identically
    for the image and every (B, H, W) plane. Other per-sample entries (tensors or lists of length B,
    such as chip ids) are repeated for the copies.
    """
    image = batch["image"]
    n = image.shape[0]
    height, width = image.shape[-2:]
    chosen = [i for i in range(n) if _chance(p, generator)]
    if not chosen or copies < 1:
        return batch
    spatial = set(_spatial_keys(batch, batched=True))
    rolls = []
    for index in chosen:
        for _ in range(copies):
            dim = -1 if _rand(generator) < 0.5 else -2
            size = width if dim == -1 else height
            shift = _randint(1, size - 1, generator) if size > 1 else 0
            rolls.append((index, shift, dim))
    out = dict(batch)
    for key, value in batch.items():
        if key in spatial:
            extra = torch.stack([torch.roll(value[i], shifts=shift, dims=dim) for i, shift, dim in rolls])
            out[key] = torch.cat([value, extra])
        elif isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n:
            out[key] = torch.cat([value, value[[i for i, _, _ in rolls]]])
        elif isinstance(value, list | tuple) and len(value) == n:
            out[key] = type(value)([*value, *(value[i] for i, _, _ in rolls)])
    return out


class BatchAugmenter:
    """Batch-level augmentation from `AugmentConfig`: copy-paste, then Sat-SlideMix."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    @property
    def enabled(self) -> bool:
        return self.cfg.copy_paste > 0 or self.cfg.slide_mix > 0

    def __call__(self, batch: Sample, generator: torch.Generator | None = None) -> Sample:
        out = dict(batch)
        if "target" not in out:
            out["target"] = _batch_target(out)
        if self.cfg.copy_paste > 0:
            out = copy_paste(out, self.cfg.copy_paste, self.cfg.copy_paste_min_pixels, generator)
        if self.cfg.slide_mix > 0:
            out = slide_mix(out, self.cfg.slide_mix, self.cfg.slide_mix_copies, generator)
        return out


def batch_augment_generator(seed: int, step: int) -> torch.Generator:
    """The random generator of batch-level augmentation at global training step `step` of a run seeded `seed`.

    Training and the data audit's loader check draw their batch augmentation from it, so the
    check sees the batches training sees, and a resumed run redraws the same augmentation.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + step)

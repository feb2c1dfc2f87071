"""Per-band normalisation statistics computed on valid train pixels, saved beside every model.

Statistics stream chip by chip (bounded memory) and are mergeable across workers:

* `Welford` keeps per-band count, mean and sum of squared deviations (Chan et al. parallel update);
* `PercentileReservoir` keeps a bounded uniform sample of valid pixels for per-band percentiles
  (exact while fewer pixels than its capacity have been seen).

`NormalizationStats` applies them (z-score, or percentile clip and rescale to [0, 1]) to numpy
arrays or torch tensors, and refuses to be used with other bands or another method, so a model
is never fed data normalised differently from its training data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from workbench.io import read_json, write_json_atomic
from workbench.run import STATS_FILE

STATS_FORMAT = "workbench-normalization-stats"
STATS_VERSION = 1
Method = Literal["zscore", "percentile", "none"]
ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


class NormalizationMismatch(ValueError):
    """Statistics do not fit the data or model they are used with (bands or method differ)."""


class NormalizationStatsError(ValueError):
    """A statistics file is missing keys or holds values of the wrong shape."""


def _valid_pixels(image: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The (n_valid, C) float64 matrix of pixels where `valid` is True."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must have shape (C, H, W), got {image.shape}")
    if valid is None:
        valid = np.ones(image.shape[1:], dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != image.shape[1:]:
        raise ValueError(f"valid mask has shape {valid.shape}, expected {image.shape[1:]} to match the image")
    pixels: np.ndarray = image[:, valid].T.astype(np.float64)
    return pixels


class Welford:
    """Streaming per-band mean and variance over valid pixels; `merge` combines workers exactly."""

    def __init__(self, n_bands: int) -> None:
        self.n_bands = n_bands
        self.count = 0
        self._mean = np.zeros(n_bands, dtype=np.float64)
        self._m2 = np.zeros(n_bands, dtype=np.float64)

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    def update(self, image: np.ndarray, valid: np.ndarray | None = None) -> Welford:
        """Add the valid pixels of one (C, H, W) image."""
        if np.asarray(image).shape[0] != self.n_bands:
            raise ValueError(f"image has {np.asarray(image).shape[0]} bands, the accumulator {self.n_bands}")
        pixels = _valid_pixels(image, valid)
        if len(pixels):
            mean = pixels.mean(axis=0)
            self._combine(len(pixels), mean, ((pixels - mean) ** 2).sum(axis=0))
        return self

    def merge(self, other: Welford) -> Welford:
        """Fold another accumulator (for example from another worker) into this one."""
        if other.n_bands != self.n_bands:
            raise ValueError(f"cannot merge accumulators of {other.n_bands} and {self.n_bands} bands")
        self._combine(other.count, other._mean, other._m2)
        return self

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy() if self.count else np.full(self.n_bands, np.nan)

    @property
    def var(self) -> np.ndarray:
        """Population variance (ddof=0)."""
        return self._m2 / self.count if self.count else np.full(self.n_bands, np.nan)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0)."""
        result: np.ndarray = np.sqrt(self.var)
        return result


class PercentileReservoir:
    """A bounded uniform random sample of valid pixels (all bands of a pixel kept together).

    Each pixel gets a random key and the `capacity` smallest keys are kept, which is a uniform
    sample without replacement and can be merged with another reservoir. Percentiles are exact
    while at most `capacity` pixels have been seen.
    """

    def __init__(self, n_bands: int, capacity: int = 200_000, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be positive, got {capacity}")
        self.n_bands = n_bands
        self.capacity = capacity
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._pixels = np.zeros((0, n_bands), dtype=np.float64)
        self._keys = np.zeros(0, dtype=np.float64)

    def _offer(self, pixels: np.ndarray, keys: np.ndarray) -> None:
        if len(self._keys) >= self.capacity:
            better = keys < self._keys.max()
            pixels, keys = pixels[better], keys[better]
        if not len(keys):
            return
        all_pixels = np.concatenate([self._pixels, pixels])
        all_keys = np.concatenate([self._keys, keys])
        if len(all_keys) > self.capacity:
            keep = np.argpartition(all_keys, self.capacity - 1)[: self.capacity]
            all_pixels, all_keys = all_pixels[keep], all_keys[keep]
        self._pixels, self._keys = all_pixels, all_keys

    def update(self, image: np.ndarray, valid: np.ndarray | None = None) -> PercentileReservoir:
        """Offer the valid pixels of one (C, H, W) image to the sample."""
        pixels = _valid_pixels(image, valid)
        self.seen += len(pixels)
        self._offer(pixels, self._rng.random(len(pixels)))
        return self

    def merge(self, other: PercentileReservoir) -> PercentileReservoir:
        """Combine with another reservoir of the same bands (the union stays a uniform sample)."""
        if other.n_bands != self.n_bands:
            raise ValueError(f"cannot merge reservoirs of {other.n_bands} and {self.n_bands} bands")
        self.seen += other.seen
        self._offer(other._pixels, other._keys)
        return self

    @property
    def sample(self) -> np.ndarray:
        """The retained (n, C) pixels."""
        return self._pixels.copy()

    def percentiles(self, q: Sequence[float]) -> np.ndarray:
        """Per-band percentiles, shape (len(q), C)."""
        if not len(self._pixels):
            raise ValueError("no valid pixels were seen; cannot compute percentiles")
        result: np.ndarray = np.percentile(self._pixels, list(q), axis=0)
        return result


def _floats(values: Any) -> list[float] | None:
    return None if values is None else [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


@dataclass
class NormalizationStats:
    """Per-band normalisation of a model's input, stored as `normalization_stats.json` beside the model.

    zscore: ``(x - mean) / std``; percentile: clip to ``[low, high]`` then ``(x - low) / (high - low)``
    in [0, 1]; none: unchanged. Bands with zero spread are left centred but not scaled.
    """

    bands: list[str]
    method: Method = "zscore"
    mean: list[float] | None = None
    std: list[float] | None = None
    low: list[float] | None = None
    high: list[float] | None = None
    percentiles: tuple[float, float] | None = None
    count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bands = [str(band) for band in self.bands]
        self.mean, self.std = _floats(self.mean), _floats(self.std)
        self.low, self.high = _floats(self.low), _floats(self.high)
        if self.method not in ("zscore", "percentile", "none"):
            raise NormalizationStatsError(f"method must be zscore, percentile or none, got {self.method!r}")
        needed = {"zscore": ("mean", "std"), "percentile": ("low", "high"), "none": ()}[self.method]
        for name in needed:
            values = getattr(self, name)
            if values is None:
                raise NormalizationStatsError(f"method={self.method} needs {name!r} values")
            if len(values) != len(self.bands):
                raise NormalizationStatsError(
                    f"{name!r} has {len(values)} values but there are {len(self.bands)} bands {self.bands}"
                )
            if not all(math.isfinite(v) for v in values):
                raise NormalizationStatsError(f"{name!r} holds non-finite values: {values}")

    # ------------------------------------------------------------------ applying
    def _offset_scale(self) -> tuple[np.ndarray, np.ndarray]:
        if self.method == "zscore":
            assert self.mean is not None and self.std is not None
            offset, scale = np.array(self.mean), np.array(self.std)
        else:
            assert self.low is not None and self.high is not None
            offset, scale = np.array(self.low), np.array(self.high) - np.array(self.low)
        return offset, np.where(scale > 0, scale, 1.0)

    def apply(self, image: ArrayOrTensor) -> ArrayOrTensor:
        """Normalise a (C, H, W) or (B, C, H, W) array or tensor; returns the same type (float)."""
        if self.method == "none":
            return image
        if image.ndim < 3 or image.shape[-3] != len(self.bands):
            raise NormalizationMismatch(
                f"image has shape {tuple(image.shape)}; expected {len(self.bands)} bands {self.bands} in dim -3"
            )
        offset, scale = self._offset_scale()
        if isinstance(image, torch.Tensor):
            dtype = image.dtype if image.is_floating_point() else torch.float32
            off_t = torch.as_tensor(offset, dtype=dtype, device=image.device).view(-1, 1, 1)
            scale_t = torch.as_tensor(scale, dtype=dtype, device=image.device).view(-1, 1, 1)
            x = image.to(dtype)
            if self.method == "percentile":
                x = torch.minimum(torch.maximum(x, off_t), off_t + scale_t)
            return (x - off_t) / scale_t
        array = np.asarray(image)
        out_dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
        off_a = offset.reshape(-1, 1, 1)
        scale_a = scale.reshape(-1, 1, 1)
        x_a = array.astype(np.float64)
        if self.method == "percentile":
            x_a = np.clip(x_a, off_a, off_a + scale_a)
        result: np.ndarray = ((x_a - off_a) / scale_a).astype(out_dtype)
        return result

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, bands: Sequence[str], method: str | None = None) -> None:
        """Raise `NormalizationMismatch` unless these statistics were made for `bands` (in order) and `method`."""
        bands = [str(band) for band in bands]
        problems = []
        if method is not None and method != self.method:
            problems.append(f"method is {self.method!r} in the statistics but {method!r} is requested")
        if bands != self.bands:
            missing = [b for b in bands if b not in self.bands]
            extra = [b for b in self.bands if b not in bands]
            if missing:
                problems.append(f"bands {missing} have no statistics")
            if extra:
                problems.append(f"statistics hold bands {extra} that the input lacks")
            if not missing and not extra:
                problems.append(f"band order differs: statistics {self.bands}, input {bands}")
        if problems:
            raise NormalizationMismatch(
                "normalisation statistics do not match: " + "; ".join(problems) + " (recompute or pass matching bands)"
            )

    def select(self, bands: Sequence[str]) -> NormalizationStats:
        """The statistics of a subset / reordering of the bands."""
        missing = [b for b in bands if b not in self.bands]
        if missing:
            raise NormalizationMismatch(f"bands {missing} have no statistics; available: {self.bands}")
        index = [self.bands.index(b) for b in bands]

        def pick(values: list[float] | None) -> list[float] | None:
            return None if values is None else [values[i] for i in index]

        return NormalizationStats(
            bands=list(bands),
            method=self.method,
            mean=pick(self.mean),
            std=pick(self.std),
            low=pick(self.low),
            high=pick(self.high),
            percentiles=self.percentiles,
            count=self.count,
            extra=dict(self.extra),
        )

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["percentiles"] = list(self.percentiles) if self.percentiles is not None else None
        return {"format": STATS_FORMAT, "version": STATS_VERSION, **data}

    def save(self, path: str | Path) -> Path:
        """Write the statistics as JSON atomically (callers name the file `normalization_stats.json`)."""
        return write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> NormalizationStats:
        """Read statistics written by `save`; errors name the file and the offending key."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        data = read_json(path)
        if not isinstance(data, dict):
            raise NormalizationStatsError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != STATS_FORMAT:
            raise NormalizationStatsError(
                f"{path}: not a normalisation statistics file (format {data.get('format')!r})"
            )
        if data.get("version") != STATS_VERSION:
            raise NormalizationStatsError(f"{path}: unsupported version {data.get('version')!r}, expected 1")
        for key in ("bands", "method"):
            if key not in data:
                raise NormalizationStatsError(f"{path}: missing key {key!r}")
        known = {"bands", "method", "mean", "std", "low", "high", "percentiles", "count", "extra"}
        kwargs = {key: value for key, value in data.items() if key in known}
        if kwargs.get("percentiles") is not None:
            kwargs["percentiles"] = tuple(kwargs["percentiles"])
        try:
            return cls(**kwargs)
        except (NormalizationStatsError, TypeError, ValueError) as exc:
            raise NormalizationStatsError(f"{path}: {exc}") from exc


def _band_positions(ds: xr.Dataset, bands: Sequence[str] | None) -> tuple[list[str], list[int]]:
    names = [str(name) for name in ds["band"].values]
    if bands is None:
        return names, list(range(len(names)))
    missing = [b for b in bands if b not in names]
    if missing:
        raise NormalizationMismatch(f"bands {missing} are not in the store; its bands are {names}")
    return list(bands), [names.index(b) for b in bands]


def _chip_groups(chip_indices: Iterable[int], size: int) -> Iterable[list[int]]:
    group: list[int] = []
    for index in chip_indices:
        group.append(int(index))
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def compute_stats(
    ds: xr.Dataset,
    chip_indices: Sequence[int] | np.ndarray,
    bands: Sequence[str] | None = None,
    method: Method = "zscore",
    percentiles: tuple[float, float] = (1.0, 99.0),
    progress: bool = True,
    reservoir_capacity: int = 200_000,
    read_chips: int = 16,
    seed: int = 0,
) -> NormalizationStats:
    """Statistics of the valid pixels of `chip_indices` (the train split) in a store opened by `open_store`.

    Chips are read `read_chips` at a time, so memory stays bounded whatever the store size.
    Mean/std are always recorded; percentile bounds are computed for method="percentile".
    """
    chip_indices = np.asarray(chip_indices, dtype=np.int64)
    if chip_indices.size == 0:
        raise ValueError("no chips to compute normalisation statistics from (is the train split empty?)")
    names, positions = _band_positions(ds, bands)
    if method == "none":
        return NormalizationStats(bands=names, method="none")
    low_q, high_q = percentiles
    if not 0 <= low_q < high_q <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    moments = Welford(len(names))
    reservoir = PercentileReservoir(len(names), reservoir_capacity, seed) if method == "percentile" else None
    bar = tqdm(total=len(chip_indices), desc="normalisation statistics", unit="chip", disable=not progress)
    for group in _chip_groups(chip_indices, read_chips):
        images = ds["image"].isel(chip=group, band=positions).values
        valids = ds["valid"].isel(chip=group).values.astype(bool)
        for image, valid in zip(images, valids):
            moments.update(image, valid)
            if reservoir is not None:
                reservoir.update(image, valid)
        bar.update(len(group))
    bar.close()
    if moments.count == 0:
        raise ValueError("the selected chips hold no valid pixel; cannot compute normalisation statistics")
    low = high = None
    if reservoir is not None:
        low, high = reservoir.percentiles([low_q, high_q])
    return NormalizationStats(
        bands=names,
        method=method,
        mean=_floats(moments.mean),
        std=_floats(moments.std),
        low=_floats(low),
        high=_floats(high),
        percentiles=(float(low_q), float(high_q)) if reservoir is not None else None,
        count=moments.count,
    )

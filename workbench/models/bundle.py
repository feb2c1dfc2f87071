"""The saved-model directory ("model dir") shared by training, evaluation and inference.

Layout (file names from `workbench.run`, since a run's `model/` is a bundle)::

    model_dir/model.pt                  {"format": 1, "state_dict", "model_params", "bands", "modalities"}
    model_dir/normalization_stats.json  the train-split statistics, applied identically at inference
    model_dir/calibration.json          optional: {"temperature": T, "threshold": t, ...}
    model_dir/run_info.json             written by training: parameters, git commit, package versions
    model_dir/checksums.json            sha256 of model.pt, normalization_stats.json and calibration.json
    model_dir/input_profile.json        optional: training chip size, pixel size and per-band value scale,
                                        which `workbench predict` compares an input raster against

Keeping weights, band order, normalisation and calibration together means inference cannot
silently feed a model bands in another order or with other statistics than it was trained on.
`checksums.json` makes a changed, truncated or deleted file an error on loading, and the
normalisation statistics are checked (finite, std > 0) before use.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.data.normalize import NormalizationStats
from workbench.io import read_json, write_bytes_atomic, write_json_atomic
from workbench.models.factory import build_model
from workbench.params import ModelParams, resolve_classes
from workbench.run import CALIBRATION_FILE, CHECKSUMS_FILE, INPUT_PROFILE_FILE, MODEL_FILE, STATS_FILE

BUNDLE_FORMAT = 1
_REQUIRED_KEYS = ("format", "state_dict", "model_params", "bands", "modalities")

BuildModel = Callable[[ModelParams, int], nn.Module]


class BandMismatchError(ValueError):
    """An input's bands differ from the bands a model was trained on."""


class BundleIntegrityError(ValueError):
    """A bundle file changed, vanished or holds unusable values since the bundle was written."""


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(model_dir: str | Path) -> Path:
    """Record the sha256 of the bundle's files that exist (model, statistics, calibration) in checksums.json."""
    directory = Path(model_dir)
    files = {
        name: file_sha256(directory / name)
        for name in (MODEL_FILE, STATS_FILE, CALIBRATION_FILE)
        if (directory / name).is_file()
    }
    return write_json_atomic(directory / CHECKSUMS_FILE, {"algorithm": "sha256", "files": files})


def verify_checksums(model_dir: str | Path) -> bool:
    """Check the bundle's files against checksums.json; False when the bundle has none (older bundles).

    Raises FileNotFoundError naming a recorded file that is missing, BundleIntegrityError naming one
    whose bytes changed.
    """
    directory = Path(model_dir)
    manifest = directory / CHECKSUMS_FILE
    if not manifest.is_file():
        return False
    recorded = read_json(manifest)
    files = recorded.get("files") if isinstance(recorded, dict) else None
    if not isinstance(files, dict):
        raise BundleIntegrityError(f"{manifest} must hold {{'files': {{name: sha256}}}}; re-save the bundle")
    for name, expected in files.items():
        path = directory / str(name)
        if Path(str(name)).name != str(name):
            raise BundleIntegrityError(f"{manifest} lists {name!r}, which is not a file name of the bundle")
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing but {manifest} records it; the bundle is incomplete (restore the file, or "
                "for calibration.json run the calibration stage again)"
            )
        if file_sha256(path) != expected:
            raise BundleIntegrityError(
                f"{path} changed since the bundle was written (its sha256 differs from {manifest}); restore it "
                "from the run that wrote it or retrain"
            )
    return True


def check_normalization_values(stats: NormalizationStats, source: Path) -> None:
    """Refuse statistics that would silently scale inputs wrongly: non-finite values, std <= 0, high <= low."""
    import numpy as np

    for key in ("mean", "std", "low", "high"):
        values = getattr(stats, key)
        if values is not None and not np.isfinite(np.asarray(values, float)).all():
            raise BundleIntegrityError(f"{source}: {key} holds non-finite values {values}")
    if stats.method == "zscore" and stats.std is not None:
        bad = [band for band, value in zip(stats.bands, stats.std, strict=True) if not value > 0]
        if bad:
            raise BundleIntegrityError(
                f"{source}: std must be positive, but is zero or negative for bands {bad}; the file is damaged "
                "or was edited. Restore it from the run's data/normalization_stats.json"
            )
    if stats.method == "percentile" and stats.low is not None and stats.high is not None:
        bad = [b for b, lo, hi in zip(stats.bands, stats.low, stats.high, strict=True) if not hi > lo]
        if bad:
            raise BundleIntegrityError(f"{source}: percentile high must exceed low, not so for bands {bad}")


@dataclass
class InputProfile:
    """What the model's training inputs looked like: chip side, pixel size and per-band mean and spread.

    `workbench predict` uses it for the default window (the chip side) and to refuse rasters on another
    value scale (e.g. digital numbers x10000 for a model trained on reflectance) or another pixel size.
    """

    bands: list[str]
    mean: list[float]
    std: list[float]
    chip_size: int | None = None
    pixel_size_m: float | None = None

    def __post_init__(self) -> None:
        self.bands = [str(band) for band in self.bands]
        self.mean, self.std = [float(v) for v in self.mean], [float(v) for v in self.std]
        if not len(self.bands) == len(self.mean) == len(self.std):
            raise ValueError(
                f"input profile lists {len(self.bands)} bands but {len(self.mean)} means and {len(self.std)} stds"
            )
        if not all(math.isfinite(v) for v in [*self.mean, *self.std]):
            raise ValueError(f"input profile holds non-finite band statistics: mean {self.mean}, std {self.std}")
        if self.chip_size is not None and self.chip_size < 1:
            raise ValueError(f"input profile chip_size must be positive, got {self.chip_size}")
        if self.pixel_size_m is not None and not (math.isfinite(self.pixel_size_m) and self.pixel_size_m > 0):
            raise ValueError(f"input profile pixel_size_m must be a positive number, got {self.pixel_size_m}")

    def typical_scale(self) -> list[float]:
        """Per band root mean square value sqrt(mean^2 + std^2): the magnitude of typical values."""
        return [math.hypot(m, s) for m, s in zip(self.mean, self.std)]

    def select(self, bands: Sequence[str]) -> InputProfile:
        """The profile of a subset / reordering of the bands."""
        index = [self.bands.index(band) for band in bands]
        return InputProfile(
            list(bands), [self.mean[i] for i in index], [self.std[i] for i in index], self.chip_size, self.pixel_size_m
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "chip_size": self.chip_size,
            "pixel_size_m": self.pixel_size_m,
            "bands": self.bands,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "input profile") -> InputProfile:
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"chip_size", "pixel_size_m", "bands", "mean", "std"})
        if unknown or not {"bands", "mean", "std"} <= set(data):
            raise ValueError(f"{source}: expected keys chip_size, pixel_size_m, bands, mean, std; got {sorted(data)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc


@dataclass
class ModelBundle:
    """A trained model ready for inference, with everything needed to feed it correctly."""

    model: nn.Module
    model_params: ModelParams
    bands: list[str]
    modalities: list[str]
    normalization: NormalizationStats  # train-split statistics of exactly `bands`, in that order
    temperature: float = 1.0
    threshold: float = 0.5
    calibration: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    input_profile: InputProfile | None = None  # None for bundles saved without one

    @property
    def in_channels(self) -> int:
        return len(self.bands)

    @property
    def num_classes(self) -> int:
        return self.model_params.num_classes


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copy of the weights, without the `_orig_mod.` prefix that torch.compile adds."""
    prefix = "_orig_mod."
    return {
        (key[len(prefix) :] if key.startswith(prefix) else key): value.detach().cpu()
        for key, value in model.state_dict().items()
    }


def _normalization_stats(normalization: str | Path | NormalizationStats) -> NormalizationStats:
    """Statistics given as an object or as a normalization_stats.json file (validated on reading)."""
    if isinstance(normalization, NormalizationStats):
        return normalization
    if isinstance(normalization, str | Path):
        source = Path(normalization)
        if not source.exists():
            raise FileNotFoundError(
                f"normalisation statistics {source} do not exist; compute them on the train split first"
            )
        return NormalizationStats.load(source)
    raise TypeError(f"normalization must be a NormalizationStats or a path, got {type(normalization).__name__}")


def save_bundle(
    model_dir: str | Path,
    model: nn.Module,
    model_params: ModelParams,
    bands: Sequence[str],
    modalities: Sequence[str],
    normalization: str | Path | NormalizationStats,
    calibration: dict[str, Any] | None = None,
    input_profile: InputProfile | None = None,
) -> Path:
    """Write a model dir (each file atomically) and return its path.

    The normalisation statistics (and the input profile, when given) are stored for exactly `bands`,
    in that order.
    """
    bands, modalities = list(bands), list(modalities)
    if len(bands) != len(modalities):
        raise ValueError(f"got {len(bands)} bands but {len(modalities)} modalities; give one modality per band")
    if len(set(bands)) != len(bands):
        raise ValueError(f"band names must be unique, got {bands}")
    directory = Path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": BUNDLE_FORMAT,
        "state_dict": _plain_state_dict(model),
        "model_params": model_params.model_dump(mode="json"),
        "bands": bands,
        "modalities": modalities,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(directory / MODEL_FILE, buffer.getvalue())
    _normalization_stats(normalization).select(bands).save(directory / STATS_FILE)
    if input_profile is not None:
        write_json_atomic(directory / INPUT_PROFILE_FILE, input_profile.select(bands).to_dict())
    if calibration is not None:
        write_calibration(directory, calibration, model_params)  # also records the checksums
    else:
        (directory / CALIBRATION_FILE).unlink(missing_ok=True)  # never pair new weights with an old calibration
        write_checksums(directory)
    return directory


def write_calibration(model_dir: str | Path, calibration: dict[str, Any], model: ModelParams | None = None) -> Path:
    """Write calibration.json (validated first: temperature(s), threshold(s), and with `model` that they fit it)."""
    _check_calibration(calibration, Path(model_dir) / CALIBRATION_FILE, model)
    verify_checksums(model_dir)  # calibrate only an intact bundle
    path = write_json_atomic(Path(model_dir) / CALIBRATION_FILE, calibration)
    write_checksums(model_dir)
    return path


def _check_calibration(
    calibration: dict[str, Any], source: Path, model: ModelParams | None = None
) -> tuple[float, float]:
    """Validate a calibration record; returns (temperature, threshold) for `ModelBundle`.

    A softmax model's record (``decision: argmax``) holds one temperature or one per class and optional
    ``class_thresholds`` {class name: t}; its returned temperature is the single T, or the geometric mean
    of the per-class vector (for display: probabilities use the vector) and its threshold 0.5 (unused).
    With `model` the record must fit it (binary record for a binary model, classes and their count).
    """
    if calibration.get("decision") == "argmax" or "class_thresholds" in calibration:
        return _check_softmax_calibration(calibration, source, model)
    if model is not None and model.num_classes >= 2:
        raise ValueError(
            f"{source} holds a binary calibration (temperature, threshold) but the model has "
            f"{model.num_classes} classes; run the calibration stage (03_calibrate) again"
        )
    temperature = float(calibration.get("temperature", 1.0))
    threshold = float(calibration.get("threshold", 0.5))
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{source}: temperature must be a positive number, got {temperature}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"{source}: threshold must lie strictly between 0 and 1, got {threshold}")
    return temperature, threshold


def _check_softmax_calibration(
    calibration: dict[str, Any], source: Path, model: ModelParams | None
) -> tuple[float, float]:
    if calibration.get("decision") != "argmax":
        raise ValueError(
            f"{source}: a softmax calibration needs decision 'argmax', got {calibration.get('decision')!r}"
        )
    if model is not None and model.num_classes < 2:
        raise ValueError(
            f"{source} holds a softmax calibration (decision argmax) but the model is binary (one logit); "
            "run the calibration stage (03_calibrate) again"
        )
    value = calibration.get("temperature", 1.0)
    values = value if isinstance(value, list) else [value]
    try:
        temps = [float(t) for t in values]
    except (TypeError, ValueError):
        raise ValueError(f"{source}: temperature must be a number or a list of numbers, got {value!r}") from None
    if not temps or not all(math.isfinite(t) and t > 0 for t in temps):
        raise ValueError(f"{source}: every temperature must be a positive number, got {value!r}")
    names = [spec.name for spec in resolve_classes(model)] if model is not None else None
    if isinstance(value, list) and names is not None and len(temps) != len(names):
        raise ValueError(
            f"{source}: {len(temps)} per-class temperatures for a model of {len(names)} classes ({', '.join(names)})"
        )
    recorded = calibration.get("classes")
    if names is not None and recorded is not None and list(recorded) != names:
        raise ValueError(f"{source} was written for classes {recorded}, but the model's classes are {names}")
    thresholds = calibration.get("class_thresholds") or {}
    if not isinstance(thresholds, dict):
        raise ValueError(f"{source}: class_thresholds must map class names to thresholds, got {thresholds!r}")
    for name, threshold in thresholds.items():
        if names is not None and name not in names:
            raise ValueError(f"{source}: class_thresholds names {name!r}, not one of the model's classes {names}")
        if not isinstance(threshold, int | float) or not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"{source}: class_thresholds[{name!r}] must lie strictly between 0 and 1, got {threshold}")
    return float(math.exp(sum(math.log(t) for t in temps) / len(temps))), 0.5


def _require(path: Path, how: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {how}")
    return path


def _build_from_factory(params: ModelParams, bands: list[str], modalities: list[str]) -> nn.Module:
    """The workbench's own model factory, told the band names and modalities (late fusion and TerraMind use them)."""

    return build_model(params, len(bands), band_names=bands, modalities=modalities)


def _load_payload(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable model file: {exc}") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path} holds {type(payload).__name__}; expected a dict written by save_bundle")
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"{path} lacks keys {missing}; re-save it with workbench.models.bundle.save_bundle")
    if payload["format"] != BUNDLE_FORMAT:
        raise ValueError(f"{path} has format {payload['format']!r}; this version reads format {BUNDLE_FORMAT}")
    return payload


def load_bundle(
    model_dir: str | Path,
    build_model: BuildModel | None = None,
    require_calibration: bool = False,
    num_classes: int | None = None,
) -> ModelBundle:
    """Read a model dir: rebuild the model (eval mode), its bands, normalisation and calibration.

    Files are checked against checksums.json first (a bundle without it loads with a warning), and the
    normalisation statistics must be finite with std > 0. With `require_calibration` a bundle without
    calibration.json is refused instead of silently using temperature 1 and threshold 0.5.
    """
    directory = Path(model_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist; train a model to create it")
    if not verify_checksums(directory):
        warnings.warn(
            f"{directory} has no {CHECKSUMS_FILE} (written by an older version): its files cannot be verified",
            stacklevel=2,
        )
    model_path = _require(directory / MODEL_FILE, "train a model (workbench train) or write one with save_bundle")
    stats_path = _require(
        directory / STATS_FILE, "save the train-split normalisation statistics there (save_bundle does this)"
    )
    payload = _load_payload(model_path)
    params = ModelParams.model_validate(payload["model_params"])
    if num_classes is not None and params.num_classes != num_classes:
        raise ValueError(
            f"{model_path} holds a model with num_classes={params.num_classes} but model.num_classes={num_classes} "
            f"is asked for; use a bundle trained with {num_classes} classes or set model.num_classes="
            f"{params.num_classes}"
        )
    bands = [str(band) for band in payload["bands"]]
    try:
        normalization = NormalizationStats.load(stats_path).select(bands)
    except ValueError as exc:
        raise ValueError(f"{stats_path} does not fit the model's bands {bands}: {exc}") from exc
    check_normalization_values(normalization, stats_path)
    modalities = [str(m) for m in payload["modalities"]]
    build = build_model or (lambda p, _: _build_from_factory(p, bands, modalities))
    model = build(params, len(bands))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{model_path}: weights do not fit the model described by its model_params: {exc}") from exc
    model.eval()
    calibration: dict[str, Any] = {}
    temperature, threshold = 1.0, 0.5
    calibration_path = directory / CALIBRATION_FILE
    if calibration_path.is_file():
        calibration = read_json(calibration_path)
        if not isinstance(calibration, dict):
            raise ValueError(f"{calibration_path} must hold a JSON object with temperature and threshold")
        temperature, threshold = _check_calibration(calibration, calibration_path, params)
    elif require_calibration:
        raise FileNotFoundError(
            f"{calibration_path} is missing: the model is uncalibrated (temperature 1, threshold 0.5). Run the "
            "calibration stage (03_calibrate) first, or ask for the uncalibrated model explicitly "
            "(`workbench predict --uncalibrated`, allow_uncalibrated=True)"
        )
    profile = None
    profile_path = directory / INPUT_PROFILE_FILE
    if profile_path.is_file():
        profile = InputProfile.from_dict(read_json(profile_path), str(profile_path))
        missing = [band for band in bands if band not in profile.bands]
        if missing:
            raise ValueError(f"{profile_path} lacks the model's bands {missing}; re-save the bundle")
        profile = profile.select(bands)
    return ModelBundle(
        model=model,
        model_params=params,
        bands=bands,
        modalities=modalities,
        normalization=normalization,
        temperature=temperature,
        threshold=threshold,
        calibration=calibration,
        model_dir=directory,
        input_profile=profile,
    )


def describe_band_mismatch(expected: Sequence[str], got: Sequence[str]) -> str | None:
    """None when the band lists are equal, else which bands are missing, extra or out of order."""
    expected, got = list(expected), list(got)
    if expected == got:
        return None
    missing = [band for band in expected if band not in got]
    extra = [band for band in got if band not in expected]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"extra {extra}")
    if not parts:
        parts.append("same bands in another order" if len(expected) == len(got) else "repeated bands")
    return "; ".join(parts)


def check_bands(bundle: ModelBundle | Sequence[str], bands: Sequence[str], source: str = "input") -> None:
    """Raise BandMismatchError unless `bands` are exactly the model's bands in the model's order."""
    expected = bundle.bands if isinstance(bundle, ModelBundle) else list(bundle)
    problem = describe_band_mismatch(expected, bands)
    if problem is not None:
        raise BandMismatchError(
            f"{source} has bands {list(bands)} but the model expects {list(expected)} in this order: {problem}"
        )

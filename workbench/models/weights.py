"""Local weight files for encoders and backbones, the offline guard and the model-parameter error type.

Weights are only ever read from local files: nothing here (or anywhere in the model factory) downloads.
A file may hold a bare state dict, a Lightning checkpoint (`state_dict`) or a wrapper (`model`,
`model_state_dict`, `encoder`, `backbone`); keys are matched to the target module after stripping common
prefixes (`module.`, `model.`, `encoder.`, ...). A first convolution trained on 3 bands is adapted to the
model's band count the smp/timm way, so ImageNet weights can seed a 15-band encoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Leading key components that wrappers add around an encoder's own parameter names.
KNOWN_PREFIXES = ("module", "_orig_mod", "model", "net", "network", "encoder", "backbone", "state_dict")
#: Keys under which checkpoints commonly nest the actual state dict.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "encoder", "backbone", "net")


class ModelConfigError(ValueError):
    """Model parameters or inputs that cannot build a model; the message names the key and what is allowed."""


class WeightsFileError(ValueError):
    """A weights file that cannot be used; the message names the file and what was expected."""


def ensure_offline_hub() -> None:
    """Make hub-aware libraries fail fast instead of retrying a download when there is no network.

    Sets HF_HUB_OFFLINE=1 unless the user chose a value, and keeps an already imported
    huggingface_hub in step with it (it reads the variable once at import time).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    offline = os.environ["HF_HUB_OFFLINE"].strip().upper() in {"1", "ON", "YES", "TRUE"}
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and offline:
        setattr(constants, "HF_HUB_OFFLINE", True)  # noqa: B010


@dataclass
class WeightsReport:
    """What loading a weights file into a module did, for logs and the model card."""

    path: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the counts and the first few names of each problem."""

        def head(names: list[str]) -> str:
            shown = ", ".join(names[:5])
            return shown + (f", ... ({len(names)} in all)" if len(names) > 5 else "")

        parts = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        if self.adapted:
            parts.append(f"adapted input channels of {head(self.adapted)}")
        if self.missing:
            parts.append(f"missing (kept initial values) {head(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored) {head(self.unexpected)}")
        if self.shape_mismatch:
            parts.append(f"shape mismatch (ignored) {head(self.shape_mismatch)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside a checkpoint object."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(value, torch.Tensor) for value in obj.values()):
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            return tensors
        nested = next((obj[key] for key in NESTED_STATE_KEYS if isinstance(obj.get(key), Mapping)), None)
        if nested is None:
            break
        obj = nested
    raise WeightsFileError(
        f"weights file {path} holds no tensors: expected a state dict (name -> tensor) or a checkpoint "
        f"with one under {', '.join(repr(k) for k in NESTED_STATE_KEYS)}"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict from a torch file (weights only) or a .safetensors file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} does not exist; give a local .pt/.pth/.ckpt or .safetensors file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsFileError(f"weights file {file} is not a readable .safetensors file: {exc}") from exc
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors and refused non-tensor objects
        raise WeightsFileError(
            f"weights file {file} could not be read as a torch state dict (weights only): {exc}"
        ) from exc
    return _unwrap_state_dict(obj, file)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-convolution kernel (out, C_src, kh, kw) to `in_channels` input bands.

    One band: the kernels are summed over the source channels (a grey image gives the same response).
    Otherwise the source kernels are repeated cyclically over the new channels and scaled by C_src / N,
    which keeps the expected activation unchanged (the convention of smp and timm).
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-D convolution weight, got shape {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    source_channels = weight.shape[1]
    if in_channels == source_channels:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    order = torch.arange(in_channels) % source_channels
    return weight[:, order] * (source_channels / in_channels)


def _resolve_key(key: str, target_keys: Mapping[str, Any]) -> str | None:
    """The target key that `key` names once known wrapper prefixes are removed, or None."""
    candidate = key
    while True:
        if candidate in target_keys:
            return candidate
        head, _, rest = candidate.partition(".")
        if not rest or head not in KNOWN_PREFIXES:
            return None
        candidate = rest


def _is_adaptable_conv(source: torch.Tensor, target: torch.Tensor) -> bool:
    return (
        source.ndim == 4
        and target.ndim == 4
        and source.shape[0] == target.shape[0]
        and source.shape[2:] == target.shape[2:]
        and source.shape[1] != target.shape[1]
    )


def load_weights(module: nn.Module, path: str | Path) -> WeightsReport:
    """Load a local weights file into `module` (non-strict) and report what matched.

    Keys are matched after stripping wrapper prefixes; a convolution whose only difference is the number
    of input channels is adapted with `adapt_input_conv`; other shape differences are skipped and reported.
    Raises WeightsFileError when no tensor of the file fits the module (wrong file).
    """
    source = read_state_dict(path)
    target = module.state_dict()
    report = WeightsReport(path=str(path))
    chosen: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        name = _resolve_key(key, target)
        if name is None:
            report.unexpected.append(key)
            continue
        wanted = target[name]
        if tensor.shape == wanted.shape:
            chosen[name] = tensor
        elif _is_adaptable_conv(tensor, wanted):
            chosen[name] = adapt_input_conv(tensor, wanted.shape[1])
            report.adapted.append(name)
        else:
            report.shape_mismatch.append(f"{name} {tuple(tensor.shape)} vs {tuple(wanted.shape)}")
    if not chosen:
        raise WeightsFileError(
            f"no tensor of weights file {path} matches the module: file keys start with "
            f"{list(source)[:3]}, the module's with {list(target)[:3]}"
        )
    module.load_state_dict(chosen, strict=False)
    report.loaded = sorted(chosen)
    report.missing = [k for k in target if k not in chosen and not k.endswith("num_batches_tracked")]
    level = logging.WARNING if report.missing or report.shape_mismatch else logging.INFO
    log.log(level, "weights %s", report.summary())
    return report

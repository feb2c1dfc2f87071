"""Where training runs: a GPU recipe on a machine without a GPU falls back to the CPU with a warning."""

from __future__ import annotations

import torch

from workbench.params import Params


class CpuFallbackWarning(UserWarning):
    """A recipe asked for a GPU on a machine without one and runs on the CPU instead."""


def gpu_available(accelerator: str) -> bool:
    """Whether the accelerator a parameter file names exists on this machine."""
    if accelerator in ("gpu", "cuda"):
        return bool(torch.cuda.is_available()) or (accelerator == "gpu" and torch.backends.mps.is_available())
    if accelerator == "mps":
        return bool(torch.backends.mps.is_available())
    return True


def resolve_hardware(params: Params, warn: bool = True) -> Params:
    """`params` as they run here: a GPU recipe on a machine without a GPU falls back to one CPU process
    in 32-bit precision (mixed precision on a CPU is slow or, for fp16, unsupported), with a warning,
    instead of Lightning's `No supported gpu backend found!`."""
    cfg = params.train
    if gpu_available(cfg.accelerator):
        return params
    if warn:
        import warnings

        warnings.warn(
            f"train.accelerator={cfg.accelerator} but this machine has no such device; training on the CPU "
            f"(1 process, precision 32-true instead of {cfg.precision}, strategy auto). Set train.accelerator=cpu "
            "to silence this, or run on a GPU machine for the recipe's speed",
            CpuFallbackWarning,
            stacklevel=2,
        )
    train = cfg.model_copy(update={"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"})
    return params.model_copy(update={"train": train})

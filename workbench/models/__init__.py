"""Segmentation models: `build_model` turns `ModelParams` into a network, `describe_model` summarises it."""

from workbench.models.factory import build_model, describe_model

__all__ = ["build_model", "describe_model"]

"""Small stores, bundles, rasters and a tmpfs for the fault-injection and bad-input tests."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from torch import nn

from workbench.data.normalize import NormalizationStats
from workbench.data.store import BandSpec, Chip, StoreWriter
from workbench.models.bundle import save_bundle, write_calibration
from workbench.params import ModelParams

BANDS = ["B02", "B03", "B04", "B11"]
SPLITS = ["train", "train", "train", "val", "val", "test", "test", "train"]
REGIONS = ["north", "north", "south", "south", "east", "east", "west", "west"]


def tiny_store(
    path: Path,
    label_value: int = 1,
    positives: bool = True,
    chip_ids: list[str] | None = None,
    regions: list[str] | None = None,
    size: int = 16,
) -> Path:
    """A store of 8 chips (4 bands, `size` px) with a catalog split; a square of `label_value` in each chip."""
    rng = np.random.default_rng(0)
    specs = [BandSpec(name, "S2L2A", optical=True) for name in BANDS]
    with StoreWriter(path, specs, source="test") as writer:
        for number in range(len(SPLITS)):
            image = rng.normal(0.1, 0.02, (len(BANDS), size, size)).astype(np.float32)
            label = np.zeros((size, size), np.uint8)
            if positives:
                label[4:8, 4:8] = label_value
            writer.append(
                Chip(
                    (chip_ids or [f"chip{n}" for n in range(len(SPLITS))])[number],
                    image,
                    label,
                    np.ones((size, size), bool),
                    lat=43.0 + 0.3 * number,
                    lon=77.0 + 0.1 * number,
                    region=(regions or REGIONS)[number],
                    year=2021,
                    split=SPLITS[number],
                )
            )
    return path


class FirstChannel(nn.Module):
    """Returns its first input channel as the logit (a model whose output is known)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.scale


def first_channel(params: ModelParams, channels: int) -> nn.Module:
    return FirstChannel()


def tiny_bundle(model_dir: Path, calibrated: bool = True, std: list[float] | None = None) -> Path:
    """A bundle of FirstChannel over bands B03, B11 with z-score statistics (mean 0, std 1 unless given)."""
    stats = NormalizationStats(bands=["B03", "B11"], method="zscore", mean=[0.0, 0.0], std=std or [1.0, 1.0])
    save_bundle(model_dir, FirstChannel(), ModelParams(), ["B03", "B11"], ["S2L2A", "S2L2A"], stats)
    if calibrated:
        write_calibration(model_dir, {"temperature": 1.0, "threshold": 0.5})
    return model_dir


def tiny_raster(path: Path, height: int = 64, width: int = 64) -> Path:
    """A 2-band GeoTIFF (B03, B11) whose left half is positive (first band 4, else -4)."""
    image = np.full((2, height, width), -4.0, np.float32)
    image[0, :, : width // 2] = 4.0
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 2,
        "dtype": "float32",
        "crs": "EPSG:32643",
        "transform": from_origin(500_000.0, 4_800_000.0, 10.0, 10.0),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)
        dst.descriptions = ("B03", "B11")
    return path


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextmanager
def small_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (e.g. '2m') under `parent`; the caller skips unless running as root."""
    mount = parent / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        mount.rmdir()
        raise OSError(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def fill(directory: Path, leave_bytes: int) -> Path:
    """Write a filler file so that about `leave_bytes` stay free on the file system of `directory`."""
    import shutil

    free = shutil.disk_usage(directory).free
    filler = directory / "filler.bin"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(free - leave_bytes, 0))
    return filler

"""38-Cloud (Landsat 8 cloud masks): one single-band 384x384 uint16 TIF per band and patch.

Two layouts are read:

* the dataset's own: ``<root>/<split>_red/red_patch_<rest>.TIF`` with sibling folders ``<split>_green``,
  ``<split>_blue``, ``<split>_nir`` and ``<split>_gt`` (split train/valid/test; test has no gt folder, so its
  chips are unlabelled, label 255);
* the single-folder sample layout: ``{red,green,blue,nir,gt}_patch_<rest>.TIF`` side by side.

gt 255 (cloud) becomes class 1, everything else 0 (``class_map`` changes that). A pixel is nodata when
all four bands are 0 (the black frame around each Landsat scene).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.arrays import IGNORE_INDEX
from workbench.data.sources import (
    Scene,
    Source,
    SourceError,
    as_class_map,
    chip_count,
    find_files,
    map_classes,
    require_dir,
    scene_chips,
    split_from_name,
)
from workbench.data.sources.geotiff import nodata_valid, read_raster
from workbench.data.store import BandSpec, Chip

BAND_NAMES = ["red", "green", "blue", "nir"]
BANDS = [BandSpec(name, "L8", optical=True) for name in BAND_NAMES]
PATCH_SIZE = 384
_PATCH = re.compile(r"patch_\d+_\d+_by_\d+_(?P<scene>[A-Z0-9]+_[A-Z0-9]+_\d+_(?P<date>\d{8})\w*)", re.IGNORECASE)


@dataclass
class PatchFiles:
    """The files of one patch: four bands (red, green, blue, nir) and the gt mask or None."""

    name: str
    bands: list[Path]
    gt: Path | None
    split: str


def _band_locator(red: Path) -> tuple[Any, str, bool]:
    """(function band -> path, split, whether a gt is expected) for the layout `red` sits in."""
    folder, rest = red.parent, red.name[len("red_") :]
    if folder.name.lower().endswith("_red"):
        prefix = folder.name[: -len("_red")]
        gt_expected = (folder.parent / f"{prefix}_gt").is_dir()
        return (
            (lambda band: folder.parent / f"{prefix}_{band}" / f"{band}_{rest}"),
            split_from_name(prefix),
            gt_expected,
        )
    gt_expected = any(folder.glob("gt_patch_*"))
    return (lambda band: folder / f"{band}_{rest}"), "", gt_expected


def find_patches(root: Path) -> tuple[list[PatchFiles], list[str]]:
    """Every complete patch under `root`, and a description of every incomplete one."""
    patches, unpaired = [], []
    for red in find_files(root, r"red_patch_.+\.tiff?", "38-Cloud red_patch_*.TIF files"):
        locate, split, gt_expected = _band_locator(red)
        bands = [locate(band) for band in BAND_NAMES]
        gt = locate("gt")
        missing = [path for path in bands if not path.is_file()]
        if gt_expected and not gt.is_file():
            missing.append(gt)
        if missing:
            unpaired.append(f"{red}: missing {', '.join(map(str, missing))}")
            continue
        stem = Path(red.name[len("red_") :]).stem
        patches.append(PatchFiles(f"{split}_{stem}" if split else stem, bands, gt if gt_expected else None, split))
    return patches, unpaired


def scene_year(name: str) -> tuple[str, int]:
    """(Landsat scene id, acquisition year) from a patch name, or ('', 0)."""
    match = _PATCH.search(name)
    return (match.group("scene"), int(match.group("date")[:4])) if match else ("", 0)


def patch_scene(patch: PatchFiles, class_map: dict[Any, int]) -> Scene:
    """Read one patch's four bands and mask."""
    image = np.concatenate([read_raster(path, bands=1).data for path in patch.bands]).astype(np.float32)
    for path, band in zip(patch.bands[1:], image[1:]):
        if band.shape != image[0].shape:
            raise SourceError(f"shape mismatch: {patch.bands[0]} is {image[0].shape} but {path} is {band.shape}")
    if patch.gt is None:
        label = np.full(image.shape[1:], IGNORE_INDEX, dtype=np.uint8)
    else:
        raw = read_raster(patch.gt, bands=1).data[0]
        if raw.shape != image.shape[1:]:
            raise SourceError(f"shape mismatch: {patch.bands[0]} is {image.shape[1:]} but {patch.gt} is {raw.shape}")
        label = map_classes(raw, class_map, where=str(patch.gt))
    region, year = scene_year(patch.name)
    valid = nodata_valid(image, 0.0)
    return Scene(patch.name, image, label, valid, str(patch.bands[0]), region=region, year=year, split=patch.split)


def read_cloud38(src: Path, chip_size: int | None = None, stride: int | None = None, class_map: Any = None) -> Source:
    """38-Cloud patches under `src` as chips (bands red, green, blue, nir; label 1 = cloud)."""
    root = require_dir(Path(src), "38-Cloud patch TIFs")
    patches, unpaired = find_patches(root)
    mapping = as_class_map(class_map) or {255: 1}

    def chips() -> Iterator[Chip]:
        for patch in patches:
            yield from scene_chips(patch_scene(patch, mapping), chip_size, stride, "cloud38")

    total = len(patches) * chip_count(PATCH_SIZE, PATCH_SIZE, chip_size, stride)
    return Source(bands=list(BANDS), chips=chips(), unpaired=unpaired, total=total)

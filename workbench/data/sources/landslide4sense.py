"""Landslide4Sense: per-patch HDF5 files ``image_<n>.h5`` (key ``img``, (128, 128, 14)) and ``mask_<n>.h5``
(key ``mask``, (128, 128)), paired by the number n within one data folder.

Folders may be ``<root>/{TrainData,ValidData,TestData}/{img,mask}`` as distributed, or flat; the reader
searches recursively. Images without a mask (and masks without an image; the training set ships five
extra masks) are listed in ``Source.unpaired`` and skipped. Bands: Sentinel-2 B1..B12 (with B10, without
B8A), slope and DEM. A pixel is nodata when any band is not finite.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from workbench.data.nodata import clean_finite
from workbench.data.sources import (
    Scene,
    Source,
    SourceError,
    SourceNotFoundError,
    chip_count,
    find_files,
    map_classes,
    require_dir,
    scene_chips,
    split_from_name,
)
from workbench.data.store import BandSpec, Chip

S2_NAMES = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12"]
BANDS = [BandSpec(name, "S2L1C", optical=True) for name in S2_NAMES] + [
    BandSpec("slope", "slope"),
    BandSpec("DEM", "DEM"),
]
PATCH_SIZE = 128
_NUMBERED = re.compile(r"(image|mask)_(\d+)\.h5", re.IGNORECASE)
_IMAGE_DIRS = {"img", "image", "images"}
_MASK_DIRS = {"mask", "masks", "label", "labels"}


def _pair_key(path: Path, root: Path) -> tuple[str, int]:
    """(data folder, n): the folder above img/ or mask/ (or the file's own folder when flat) and the number."""
    match = _NUMBERED.fullmatch(path.name)
    assert match is not None
    folder = path.parent
    if folder.name.lower() in _IMAGE_DIRS | _MASK_DIRS and folder != root:
        folder = folder.parent
    return folder.relative_to(root).as_posix(), int(match.group(2))


def pair_files(root: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(image, mask) pairs under `root` and a description of every file left without a partner."""
    files = find_files(root, r"(image|mask)_\d+\.h5", "Landslide4Sense image_<n>.h5 / mask_<n>.h5 files")
    images: dict[tuple[str, int], Path] = {}
    masks: dict[tuple[str, int], Path] = {}
    for path in files:
        kind = "image" if path.name.lower().startswith("image") else "mask"
        (images if kind == "image" else masks)[_pair_key(path, root)] = path
    pairs = [(images[key], masks[key]) for key in images if key in masks]
    unpaired = [f"{images[key]}: no mask_{key[1]}.h5 beside it" for key in images if key not in masks]
    unpaired += [f"{masks[key]}: no image_{key[1]}.h5 beside it" for key in masks if key not in images]
    return pairs, unpaired


def read_h5_array(path: Path, key: str, expected: str) -> np.ndarray:
    """One dataset of an HDF5 file, with errors that name the file, the key and what was expected."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if key not in handle:
                raise SourceError(f"{path}: no key {key!r} (keys: {sorted(handle.keys())}); expected {expected}")
            return np.asarray(handle[key][()])
    except OSError as error:
        raise SourceError(f"{path}: cannot read as HDF5 ({error}); expected {expected}") from None


def read_pair(image_path: Path, mask_path: Path, image_key: str, mask_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Image (band, y, x) float32 and mask (y, x) of one patch, shape-checked."""
    expected = f"key {image_key!r} of shape (H, W, {len(BANDS)}) holding bands {[b.name for b in BANDS]}"
    image = read_h5_array(image_path, image_key, expected)
    if image.ndim != 3 or image.shape[2] != len(BANDS):
        raise SourceError(f"{image_path}: {image_key!r} has shape {image.shape}; expected {expected}")
    mask = read_h5_array(mask_path, mask_key, f"key {mask_key!r} of shape {image.shape[:2]}")
    mask = mask.squeeze(-1) if mask.ndim == 3 and mask.shape[-1] == 1 else mask
    if mask.shape != image.shape[:2]:
        raise SourceError(
            f"{mask_path}: {mask_key!r} has shape {mask.shape}, but {image_path} is {image.shape[:2]} pixels"
        )
    return np.moveaxis(image, -1, 0).astype(np.float32), mask


def pair_scene(image_path: Path, mask_path: Path, root: Path, image_key: str, mask_key: str) -> Scene:
    """One image/mask pair as a scene; the id is the data folder plus image_<n>."""
    image, mask = read_pair(image_path, mask_path, image_key, mask_key)
    valid, image = clean_finite(image)
    folder, number = _pair_key(image_path, root)
    prefix = "" if folder == "." else folder.replace("/", "_") + "_"
    return Scene(
        name=f"{prefix}image_{number}",
        image=image,
        label=map_classes(np.nan_to_num(mask, nan=255), None),
        valid=valid,
        file=str(image_path),
        split=split_from_name(folder),
    )


def read_landslide4sense(
    src: Path,
    chip_size: int | None = None,
    stride: int | None = None,
    image_key: str = "img",
    mask_key: str = "mask",
) -> Source:
    """Landslide4Sense patches under `src` as chips (whole 128x128 patches unless chip_size is given)."""
    root = require_dir(Path(src), "Landslide4Sense HDF5 patches")
    pairs, unpaired = pair_files(root)
    if not pairs:
        raise SourceNotFoundError(f"no image_<n>.h5 under {root} has a matching mask_<n>.h5: {unpaired[:5]}")

    def chips() -> Iterator[Chip]:
        for image_path, mask_path in pairs:
            yield from scene_chips(
                pair_scene(image_path, mask_path, root, image_key, mask_key), chip_size, stride, "landslide4sense"
            )

    total = len(pairs) * chip_count(PATCH_SIZE, PATCH_SIZE, chip_size, stride)
    return Source(bands=list(BANDS), chips=chips(), unpaired=unpaired, total=total)

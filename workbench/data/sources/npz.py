"""NumPy ``.npz`` archives holding an image array and a label array (for example the ukis-csmask test scenes).

Keys, array layout (``HWC`` or ``CHW``), band names and the label's class mapping are options. Arrays
larger than the chip size are tiled with ``chip_size``/``stride``. A pixel is nodata when any band is not
finite, or when every band equals the optional ``nodata`` value.

``read_ukis_csmask`` is the preset for ukis-csmask: ``img`` (H, W, 6) reflectance Blue, Green, Red, NIR,
SWIR16, SWIR22 and ``msk`` (H, W, 1) with 0 = cloud shadow, 1/2/3 = clear, 4 = cloud; by default cloud
becomes 1 and the rest 0 (binary). ``class_map`` drives the classes: ``UKIS_MULTICLASS_MAP`` (0 clear,
1 cloud, 2 shadow; ``class_map="{1: 0, 2: 0, 3: 0, 4: 1, 0: 2}"`` on the command line) gives the three
ukis-csmask classes; a multiclass map must name every raw value (or give ``other``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.sources import (
    Scene,
    Source,
    SourceError,
    SourceNotFoundError,
    as_class_map,
    as_number_list,
    as_str_list,
    find_files,
    map_classes,
    scene_chips,
)
from workbench.data.sources.geotiff import nodata_valid
from workbench.data.store import BandSpec, Chip

LAYOUTS = ("HWC", "CHW")
UKIS_BANDS = ["Blue", "Green", "Red", "NIR", "SWIR16", "SWIR22"]
UKIS_CLASS_MAP = {4: 1}
UKIS_MULTICLASS_MAP = {1: 0, 2: 0, 3: 0, 4: 1, 0: 2}
UKIS_MULTICLASS_NAMES = ["clear", "cloud", "shadow"]


def npz_files(src: Path) -> list[Path]:
    """`src` itself when it is a file, else every .npz under the folder."""
    src = Path(src)
    if not src.exists():
        raise SourceNotFoundError(f"{src} does not exist; expected a .npz file or a folder of them")
    return [src] if src.is_file() else find_files(src, r".+\.npz", ".npz archives")


def load_arrays(path: Path, image_key: str, label_key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The image and label arrays of one archive, with errors naming the file and the keys."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in (image_key, label_key) if key is not None and key not in archive.files]
            if missing:
                raise SourceError(f"{path}: no key(s) {missing}; the archive holds {archive.files}")
            return archive[image_key], None if label_key is None else archive[label_key]
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        if isinstance(error, SourceError):
            raise
        raise SourceError(f"{path}: cannot read as a NumPy .npz archive ({error})") from None


def to_chw(image: np.ndarray, layout: str, path: Path) -> np.ndarray:
    """(band, y, x) from an image stored as HWC or CHW."""
    if image.ndim != 3:
        raise SourceError(f"{path}: image has shape {image.shape}; expected 3 dimensions in {layout} order")
    return np.moveaxis(image, -1, 0) if layout == "HWC" else image


def to_yx(label: np.ndarray, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """(y, x) label from (y, x), (y, x, 1) or (1, y, x), checked against the image size."""
    squeezed = label.reshape(label.shape[:2]) if label.ndim == 3 and label.shape[2] == 1 else label
    squeezed = squeezed[0] if squeezed.ndim == 3 and squeezed.shape[0] == 1 else squeezed
    if squeezed.shape != shape:
        raise SourceError(f"{path}: label has shape {label.shape}, but the image is {shape} pixels")
    return squeezed


def archive_scene(path: Path, options: dict[str, Any]) -> Scene:
    """One archive as a scene."""
    image, raw = load_arrays(path, options["image_key"], options["label_key"])
    image = to_chw(image, options["layout"], path).astype(np.float32)
    if image.shape[0] != options["n_bands"]:
        raise SourceError(
            f"{path}: image has {image.shape[0]} bands ({options['layout']} shape {image.shape}); "
            f"expected {options['n_bands']} ({options['band_names']})"
        )
    valid = np.ones(image.shape[1:], dtype=bool)
    for value in options["nodata"] or [None]:
        valid &= nodata_valid(image, value)
    if raw is None:
        label = np.full(image.shape[1:], 255, dtype=np.uint8)
    else:
        try:
            label = map_classes(
                to_yx(raw, image.shape[1:], path), options["class_map"], ignore_values=options["ignore"]
            )
        except ValueError as error:
            raise SourceError(f"{path}: {error}") from None
    return Scene(
        name=path.stem,
        image=np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0),
        label=label,
        valid=valid,
        file=str(path),
    )


def read_npz(
    src: Path,
    chip_size: int | None = None,
    stride: int | None = None,
    image_key: str = "img",
    label_key: str | None = "msk",
    layout: str = "HWC",
    band_names: Any = None,
    modality: str = "image",
    optical: bool = True,
    class_map: Any = None,
    label_ignore: Any = None,
    nodata: Any = None,
) -> Source:
    """Image/label pairs from .npz archives as chips.

    `band_names` defaults to b1..bn from the first archive; `class_map` maps raw label values to class ids
    (None keeps them); `label_ignore` lists raw values that become 255; `label_key` None = unlabelled.
    """
    layout = str(layout).upper()
    if layout not in LAYOUTS:
        raise SourceError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    paths = npz_files(Path(src))
    first, _ = load_arrays(paths[0], image_key, None)
    n_bands = to_chw(first, layout, paths[0]).shape[0]
    del first
    names = [f"b{i + 1}" for i in range(n_bands)] if band_names is None else as_str_list(band_names, "band_names")
    if len(names) != n_bands:
        raise SourceError(f"{paths[0]}: image has {n_bands} bands ({layout}) but band_names lists {len(names)}")
    options = {
        "image_key": image_key,
        "label_key": label_key,
        "layout": layout,
        "n_bands": n_bands,
        "band_names": names,
        "class_map": as_class_map(class_map),
        "ignore": as_number_list(label_ignore, "label_ignore"),
        "nodata": as_number_list(nodata, "nodata"),
    }

    def chips() -> Iterator[Chip]:
        for path in paths:
            yield from scene_chips(archive_scene(path, options), chip_size, stride, "npz")

    bands = [BandSpec(name, modality, optical=bool(optical)) for name in names]
    return Source(bands=bands, chips=chips(), attrs={"class_map": options["class_map"], "layout": layout})


def read_ukis_csmask(
    src: Path, chip_size: int | None = None, stride: int | None = None, class_map: Any = None
) -> Source:
    """ukis-csmask archives (img/msk, HWC, six Landsat bands); label 1 = cloud unless `class_map` says otherwise."""
    return read_npz(
        src,
        chip_size=chip_size,
        stride=stride,
        band_names=UKIS_BANDS,
        modality="Landsat",
        optical=True,
        class_map=UKIS_CLASS_MAP if class_map is None else class_map,
    )

"""TerraMesh-style multimodal samples: one folder per modality holding GeoTIFFs with matching file names.

``<root>/S2L1C/<name>.tif`` (13 bands), ``S2L2A/`` (12 bands, no B10), ``S1RTC/`` (VV, VH dB), ``DEM/``
(1 band, m) and optionally ``LULC/`` (land-cover classes). The chosen modalities are stacked in the order
given (default S2L2A, S1RTC, DEM). The binary target comes from LULC through ``class_map`` (default
{1: 1}: water is 1, every other class 0); without a LULC folder the chips are unlabelled (255).
Nodata follows :mod:`workbench.data.nodata`. Chip centres are converted to WGS84 from each file's
transform and CRS.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workbench.arrays import IGNORE_INDEX
from workbench.data.nodata import clean_dem, clean_s1, clean_s2
from workbench.data.sources import (
    S2_L1C_BANDS,
    S2_L2A_BANDS,
    Scene,
    Source,
    SourceError,
    SourceNotFoundError,
    as_class_map,
    as_str_list,
    map_classes,
    natural_key,
    require_dir,
    scene_chips,
)
from workbench.data.sources.geotiff import Raster, read_raster
from workbench.data.store import BandSpec, Chip

MODALITY_BANDS: dict[str, list[str]] = {
    "S2L1C": S2_L1C_BANDS,
    "S2L2A": S2_L2A_BANDS,
    "S1RTC": ["VV", "VH"],
    "DEM": ["DEM"],
}
OPTICAL = {"S2L1C", "S2L2A"}
DEFAULT_MODALITIES = ("S2L2A", "S1RTC", "DEM")
LABEL_MODALITY = "LULC"


def band_specs(modalities: list[str]) -> list[BandSpec]:
    """Band table of the chosen modalities; names are prefixed with the modality only where they would repeat."""
    names = [name for modality in modalities for name in MODALITY_BANDS[modality]]
    repeated = {name for name in names if names.count(name) > 1}
    return [
        BandSpec(f"{modality}_{name}" if name in repeated else name, modality, optical=modality in OPTICAL)
        for modality in modalities
        for name in MODALITY_BANDS[modality]
    ]


def clean_modality(modality: str, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid, sanitised) for one modality under its nodata rule."""
    if modality in OPTICAL:
        return clean_s2(data)
    if modality == "S1RTC":
        return clean_s1(data)
    return clean_dem(data)


def find_samples(root: Path, modalities: list[str], label_modality: str) -> tuple[list[str], list[str], bool]:
    """(sample names present in every chosen modality [and the label folder], unpaired descriptions, labelled)."""
    missing = [m for m in modalities if not (root / m).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise SourceNotFoundError(f"{root}: no modality folder {missing}; found folders {present}")
    labelled = (root / label_modality).is_dir()
    folders = [*modalities, *([label_modality] if labelled else [])]
    names = {folder: {p.stem for p in (root / folder).glob("*.tif*")} for folder in folders}
    every = set.union(*names.values())
    complete = sorted(set.intersection(*names.values()), key=lambda n: natural_key(Path(n)))
    if not complete:
        raise SourceNotFoundError(f"{root}: no GeoTIFF name is present in every folder of {folders}")
    unpaired = [
        f"{root}/*/{name}.tif: in {[f for f in folders if name in names[f]]}, "
        f"missing in {[f for f in folders if name not in names[f]]}"
        for name in sorted(every - set(complete))
    ]
    return complete, unpaired, labelled


def _tif(root: Path, folder: str, name: str) -> Path:
    matches = sorted((root / folder).glob(f"{name}.tif*"))
    return matches[0]


def sample_scene(root: Path, name: str, modalities: list[str], label_modality: str | None, class_map: Any) -> Scene:
    """Read and clean one sample's modalities and label."""
    rasters: list[Raster] = []
    for modality in modalities:
        rasters.append(read_raster(_tif(root, modality, name), bands=len(MODALITY_BANDS[modality])))
    label_raster = None if label_modality is None else read_raster(_tif(root, label_modality, name), bands=1)
    for other in [*rasters[1:], *([label_raster] if label_raster else [])]:
        if other.data.shape[1:] != rasters[0].data.shape[1:]:
            raise SourceError(
                f"shape mismatch: {rasters[0].path} is {rasters[0].data.shape[1:]} but {other.path} is "
                f"{other.data.shape[1:]}"
            )
    cleaned = [clean_modality(modality, raster.data) for modality, raster in zip(modalities, rasters)]
    valid = np.logical_and.reduce([mask for mask, _ in cleaned])
    shape = rasters[0].data.shape[1:]
    label = (
        np.full(shape, IGNORE_INDEX, dtype=np.uint8)
        if label_raster is None
        else map_classes(label_raster.data[0], class_map, where=f"{root} sample {name} ({label_modality})")
    )
    return Scene(
        name=name,
        image=np.concatenate([data for _, data in cleaned]).astype(np.float32),
        label=label,
        valid=np.asarray(valid),
        file=str(rasters[0].path),
        transform=rasters[0].transform,
        crs=rasters[0].crs,
    )


def read_terramesh(
    src: Path,
    chip_size: int | None = None,
    stride: int | None = None,
    modalities: Any = DEFAULT_MODALITIES,
    class_map: Any = None,
    label_modality: str = LABEL_MODALITY,
) -> Source:
    """TerraMesh samples under `src` as chips of the chosen modalities, with a binary target from LULC."""
    root = require_dir(Path(src), "TerraMesh modality folders")
    chosen = as_str_list(modalities, "modalities")
    unknown = [name for name in chosen if name not in MODALITY_BANDS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise SourceError(f"modalities {chosen} must be distinct names from {list(MODALITY_BANDS)}")
    mapping = as_class_map(class_map) or {1: 1}
    names, unpaired, labelled = find_samples(root, chosen, label_modality)
    label_folder = label_modality if labelled else None

    def chips() -> Iterator[Chip]:
        for name in names:
            yield from scene_chips(
                sample_scene(root, name, chosen, label_folder, mapping), chip_size, stride, "terramesh"
            )

    attrs = {"modalities": chosen, "class_map": {str(k): v for k, v in mapping.items()}, "labelled": labelled}
    return Source(bands=band_specs(chosen), chips=chips(), unpaired=unpaired, attrs=attrs)

"""Sen1Floods11 hand-labelled chips: ``<event>_<id>_S2Hand.tif`` (13 bands L1C), ``<event>_<id>_S1Hand.tif``
(VV, VH in dB, NaN = nodata) and ``<event>_<id>_LabelHand.tif`` (int16: -1 no data, 0 dry, 1 water).

The three files are paired by ``<event>_<id>`` anywhere under the root (the dataset keeps them in sibling
folders S2Hand/, S1Hand/, LabelHand/). The image is S2 (13 bands) followed by S1 (2 bands). Nodata
follows :mod:`workbench.data.nodata` (S2 all zero or saturated, S1 not finite); label -1 marks the pixel
invalid and unlabelled (255).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.nodata import clean_s1, clean_s2
from workbench.data.sources import (
    S2_L1C_BANDS,
    Scene,
    Source,
    SourceError,
    SourceNotFoundError,
    as_str_list,
    find_files,
    map_classes,
    require_dir,
    scene_chips,
)
from workbench.data.sources.geotiff import read_raster
from workbench.data.store import BandSpec, Chip

S2_BANDS = [BandSpec(name, "S2L1C", optical=True) for name in S2_L1C_BANDS]
S1_BANDS = [BandSpec("VV", "S1GRD"), BandSpec("VH", "S1GRD")]
MODALITIES = {"S2L1C": S2_BANDS, "S1GRD": S1_BANDS}
NO_LABEL = -1
_KINDS = ("S2Hand", "S1Hand", "LabelHand")
_NAME = re.compile(r"(?P<key>.+)_(?P<kind>S2Hand|S1Hand|LabelHand)\.tiff?", re.IGNORECASE)


def group_files(root: Path) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """{event_id: {kind: path}} for complete triples, and a description of every incomplete one."""
    groups: dict[str, dict[str, Path]] = {}
    for path in find_files(
        root, r".+_(S2Hand|S1Hand|LabelHand)\.tiff?", "Sen1Floods11 *_S2Hand/_S1Hand/_LabelHand.tif"
    ):
        match = _NAME.fullmatch(path.name)
        assert match is not None
        groups.setdefault(match.group("key"), {})[match.group("kind")] = path
    complete = {key: files for key, files in groups.items() if all(kind in files for kind in _KINDS)}
    unpaired = [
        f"{next(iter(files.values()))}: missing {', '.join(k for k in _KINDS if k not in files)} for {key}"
        for key, files in groups.items()
        if key not in complete
    ]
    return complete, unpaired


def triple_scene(key: str, files: dict[str, Path], modalities: list[str]) -> Scene:
    """Read one event chip: stacked image, valid mask and label."""
    s2 = read_raster(files["S2Hand"], bands=len(S2_BANDS))
    s1 = read_raster(files["S1Hand"], bands=len(S1_BANDS))
    label = read_raster(files["LabelHand"], bands=1)
    for other in (s1, label):
        if other.data.shape[1:] != s2.data.shape[1:]:
            raise SourceError(
                f"shape mismatch: {s2.path} is {s2.data.shape[1:]} but {other.path} is {other.data.shape[1:]}"
            )
    valid_s2, s2_image = clean_s2(s2.data)
    valid_s1, s1_image = clean_s1(s1.data)
    raw = label.data[0]
    parts = {"S2L1C": s2_image, "S1GRD": s1_image}
    valid = (valid_s2 if "S2L1C" in modalities else True) & (valid_s1 if "S1GRD" in modalities else True)
    valid = np.asarray(valid & (raw != NO_LABEL))
    return Scene(
        name=key,
        image=np.concatenate([parts[name] for name in modalities]),
        label=map_classes(raw, None, ignore_values=[NO_LABEL]),
        valid=valid,
        file=str(files["S2Hand"]),
        transform=s2.transform,
        crs=s2.crs,
        region=key.split("_")[0],
    )


def read_sen1floods11(
    src: Path, chip_size: int | None = None, stride: int | None = None, modalities: Any = ("S2L1C", "S1GRD")
) -> Source:
    """Sen1Floods11 hand-labelled chips under `src`; `modalities` picks S2L1C and/or S1GRD, stacked in the
    order given."""
    root = require_dir(Path(src), "Sen1Floods11 GeoTIFFs")
    chosen = as_str_list(modalities, "modalities")
    unknown = [name for name in chosen if name not in MODALITIES]
    if unknown or not chosen:
        raise SourceError(f"unknown Sen1Floods11 modalities {unknown or chosen}; choose from {list(MODALITIES)}")
    groups, unpaired = group_files(root)
    if not groups:
        raise SourceNotFoundError(f"no complete S2Hand/S1Hand/LabelHand triple under {root}: {unpaired[:5]}")

    def chips() -> Iterator[Chip]:
        for key, files in groups.items():
            yield from scene_chips(triple_scene(key, files, chosen), chip_size, stride, "sen1floods11")

    bands = [band for name in chosen for band in MODALITIES[name]]
    return Source(bands=bands, chips=chips(), unpaired=unpaired)

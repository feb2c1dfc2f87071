"""Vector labels: polygons from one or several annotators, rasterised onto a GeoTIFF image grid.

Each annotator's file (shapefile, GeoJSON, anything GeoPandas reads) is reprojected to the image CRS and
burnt into a 0/1 mask with ``rasterio.features.rasterize``. The per-pixel number of annotators who drew
the pixel is stored as the extra plane ``votes``; the label is the consensus ``votes >= min_votes``
(default: a strict majority, votes > n/2). A file with no polygons counts as an annotator who marked
nothing. The image side (stacking, nodata, tiling, georeferencing) is the GeoTIFF reader's.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.sources import Source, SourceError, SourceNotFoundError, as_str_list, resolve_tiling
from workbench.data.sources.geotiff import RasterStack, band_table, image_paths, pixel_size_m, stack_chips

VOTES_PLANE = "votes"


def annotation_paths(labels: Any) -> list[Path]:
    """Vector files from paths or glob patterns (relative to the working directory); each must match."""
    paths: list[Path] = []
    for pattern in as_str_list(labels, "labels"):
        matches = sorted(glob.glob(glob.escape(pattern) if Path(pattern).exists() else pattern, recursive=True))
        if not matches:
            raise SourceNotFoundError(f"no vector label file matches {pattern!r}")
        paths.extend(Path(match) for match in matches)
    if not paths:
        raise SourceNotFoundError("option 'labels' lists no vector file")
    return paths


def read_polygons(path: Path, crs: Any) -> Any:
    """Polygons of one file in `crs` (files without a CRS are taken to be in it), empty geometries dropped."""
    import geopandas as gpd

    try:
        frame = gpd.read_file(path)
    except Exception as error:
        raise SourceError(f"{path}: cannot read as a vector file ({error})") from None
    frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
    if frame.crs is None:
        frame = frame.set_crs(crs)
    elif crs is not None:
        frame = frame.to_crs(crs)
    return frame.geometry.reset_index(drop=True)


def rasterize_polygons(geometry: Any, shape: tuple[int, int], transform: Any, all_touched: bool = False) -> np.ndarray:
    """0/1 uint8 mask of the pixels (centres, or any touched) covered by the polygons."""
    from rasterio.features import rasterize

    if len(geometry) == 0:
        return np.zeros(shape, dtype=np.uint8)
    return rasterize(
        ((geom, 1) for geom in geometry),
        out_shape=shape,
        transform=transform,
        fill=0,
        dtype="uint8",
        all_touched=all_touched,
    )


def vote_counts(annotators: list[Any], shape: tuple[int, int], transform: Any, all_touched: bool = False) -> np.ndarray:
    """Per-pixel number of annotators whose polygons cover the pixel (uint8)."""
    votes = np.zeros(shape, dtype=np.uint8)
    for geometry in annotators:
        votes += rasterize_polygons(geometry, shape, transform, all_touched)
    return votes


def consensus_threshold(n_annotators: int, min_votes: int | None) -> int:
    """Votes needed for the consensus label: a strict majority by default."""
    threshold = n_annotators // 2 + 1 if min_votes is None else int(min_votes)
    if not 1 <= threshold <= n_annotators:
        raise SourceError(f"min_votes must lie in 1..{n_annotators} (the number of annotators), got {threshold}")
    return threshold


def read_vector(
    src: Path,
    chip_size: int | None = None,
    stride: int | None = None,
    labels: Any = None,
    images: Any = None,
    band_names: Any = None,
    modality: str = "",
    optical: bool = False,
    min_votes: int | None = None,
    all_touched: bool = False,
    region: str = "",
    year: int = 0,
    split: str = "",
) -> Source:
    """A GeoTIFF image stack labelled by polygons of one or more annotators.

    `labels` lists vector files or glob patterns (one file per annotator); the chips carry the consensus
    label and the extra plane ``votes``.
    """
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    if labels is None:
        raise SourceError("the vector format needs option 'labels': vector files or glob patterns, one per annotator")
    files = annotation_paths(labels)
    stack = RasterStack.open(image_paths(Path(src), images, set()))
    annotators = [read_polygons(path, stack.crs) for path in files]
    threshold = consensus_threshold(len(annotators), min_votes)

    def label_fn(row: int, col: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        transform = window_transform(Window(col, row, size, size), stack.transform)
        votes = vote_counts(annotators, (size, size), transform, all_touched)
        return (votes >= threshold).astype(np.uint8), {VOTES_PLANE: votes}

    name = stack.paths[0].stem
    chips = stack_chips(stack, label_fn, name, chip_size, stride, "vector", str(stack.paths[0]), region, year, split)
    attrs = {
        "annotators": [str(p.resolve()) for p in files],
        "n_annotators": len(files),
        "min_votes": threshold,
        "images": [str(p.resolve()) for p in stack.paths],
        "pixel_size_m": pixel_size_m(stack.transform, stack.crs),
    }
    total = len(resolve_tiling(stack.height, stack.width, chip_size, stride))
    return Source(bands=band_table(stack, band_names, modality, optical), chips=chips, total=total, attrs=attrs)

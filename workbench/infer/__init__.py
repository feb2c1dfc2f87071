"""Inference: a trained model bundle applied to chips, in-memory images and georeferenced rasters.

- `windows`: Gaussian-blended sliding-window logits over an image of any size, at one or several
  scales, and calibrated probabilities from a bundle (`predict_array`);
- `blocks`: the block plan of a raster (each block reads a halo so the result does not depend on the
  block size), block sizes from a memory limit, and block execution, locally or on a dask cluster;
- `vectorize`: probabilities to a class mask, polygons merged across block seams, areas, GeoJSON;
- `raster`: `predict_raster`, a GeoTIFF or DataArray predicted block by block into
  probability.tif, mask.tif (Cloud-Optimized GeoTIFFs) and polygons.geojson, after band mapping
  and input sanity checks; `predict_input` also reads the ingest readers' formats;
- `tta`: test-time augmentation over flips and 90-degree rotations (logits averaged);
- `chips`: the logits of every chip of a split, predicted once per run and stored as Zarr.

Modules import only downwards in that order (windows < blocks < vectorize < raster; tta below
windows and chips), and never from `workbench.evaluate` or `workbench.train`.
"""

from workbench.infer.blocks import DEFAULT_MEMORY_LIMIT_MB, PeakMemory, block_size_for_memory, plan_blocks
from workbench.infer.chips import load_predictions, write_predictions
from workbench.infer.raster import (
    InputMismatchError,
    PredictionResult,
    RasterInputError,
    open_raster,
    predict_input,
    predict_raster,
)
from workbench.infer.tta import TTA_MODES, predict_with_tta
from workbench.infer.vectorize import polygons_geojson, probability_to_mask
from workbench.infer.windows import (
    DEFAULT_WINDOW,
    gaussian_weight,
    logits_to_probabilities,
    predict_array,
    sliding_window_logits,
)

__all__ = [
    "DEFAULT_MEMORY_LIMIT_MB",
    "DEFAULT_WINDOW",
    "TTA_MODES",
    "InputMismatchError",
    "PeakMemory",
    "PredictionResult",
    "RasterInputError",
    "block_size_for_memory",
    "gaussian_weight",
    "load_predictions",
    "logits_to_probabilities",
    "open_raster",
    "plan_blocks",
    "polygons_geojson",
    "predict_array",
    "predict_input",
    "predict_raster",
    "predict_with_tta",
    "probability_to_mask",
    "sliding_window_logits",
    "write_predictions",
]

"""`workbench predict` with a softmax model: class raster with the class colours, per-class probabilities,
polygons per class with metric areas, calibrated decisions (per-class temperatures, class-of-interest threshold)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from scipy import ndimage
from torch import nn

from workbench.data.normalize import NormalizationStats
from workbench.infer import predict_raster
from workbench.infer.vectorize import probability_to_mask
from workbench.models.bundle import load_bundle, save_bundle, write_calibration
from workbench.params import ClassSpec, ModelParams

BANDS = ["B03", "B08"]
PIXEL = 10.0
ORIGIN = (500_000.0, 4_800_000.0)  # UTM 43N
CLASSES = [
    ClassSpec(name="other", color="#102030"),
    ClassSpec(name="lake", color="#0000ff"),
    ClassSpec(name="snow", color="#e0e0e0"),
]


class TwoBandLogits(nn.Module):
    """Logits (0, band 0, band 1): a pixel is lake where band 0 is highest, snow where band 1 is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1], x[:, 1:2]], dim=1)


def scene() -> np.ndarray:
    image = np.full((2, 96, 80), -4.0, dtype=np.float32)
    image[0, 10:30, 10:25] = 4.0  # a lake
    image[0, 60:70, 50:75] = 4.0  # another lake
    image[1, 40:52, 5:20] = 4.0  # snow
    image[1, 80:90, 60:70] = 0.3  # faint snow: p_snow ~ 0.57 before, decided by the class threshold after
    return image


def write_scene(path: Path, image: np.ndarray) -> Path:
    profile = {"driver": "GTiff", "height": image.shape[1], "width": image.shape[2], "count": 2, "dtype": "float32"}
    profile.update(crs="EPSG:32643", transform=from_origin(*ORIGIN, PIXEL, PIXEL))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)
        dst.descriptions = tuple(BANDS)
    return path


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    stats = NormalizationStats(bands=BANDS, method="none")
    params = ModelParams(num_classes=3, classes=CLASSES)
    save_bundle(tmp_path / "model", TwoBandLogits(), params, BANDS, ["S2L2A"] * 2, stats)
    calibration = {"decision": "argmax", "classes": ["other", "lake", "snow"], "temperature": [1.0, 2.0, 0.5]}
    write_calibration(tmp_path / "model", {**calibration, "class_thresholds": {"snow": 0.9}}, params)
    return tmp_path / "model"


def test_class_raster_colours_probabilities_and_polygon_areas(model_dir: Path, tmp_path: Path) -> None:
    image = scene()
    bundle = load_bundle(model_dir, lambda params, c: TwoBandLogits(), require_calibration=True)
    result = predict_raster(bundle, write_scene(tmp_path / "scene.tif", image), tmp_path / "out", window=32)
    with rasterio.open(result.mask) as src:
        mask = src.read(1)
        colormap = src.colormap(1)
        assert src.dtypes[0] == "uint8" and src.descriptions == ("class",)
    for index, spec in enumerate(CLASSES):  # GDAL colour table = the class colours
        rgb = tuple(int(spec.color[i : i + 2], 16) for i in (1, 3, 5))
        assert colormap[index] == (*rgb, 255)
    # independent decision: softmax(logit / T_c); snow wherever p_snow >= 0.9, else the argmax
    logits = np.stack([np.zeros_like(image[0]), image[0], image[1]]).astype(np.float64)
    prob = softmax(logits / np.array([1.0, 2.0, 0.5])[:, None, None])
    expected = prob.argmax(0)
    expected[prob[2] >= 0.9] = 2
    np.testing.assert_array_equal(mask, expected)
    assert (mask[80:90, 60:70] == 2).all()  # faint snow: p_snow after T = 0.5 is ~0.63 -> argmax snow
    with rasterio.open(result.probability) as src:
        assert src.count == 3 and src.descriptions == ("other", "lake", "snow") and src.dtypes[0] == "float32"
        np.testing.assert_allclose(src.read(), prob, atol=1e-5)
    # polygons per class: name and area = pixel count (independent scipy labelling) x 100 m2
    features = json.loads(result.polygons.read_text())["features"]
    for index, name in ((1, "lake"), (2, "snow")):
        areas = sorted(f["properties"]["area_m2"] for f in features if f["properties"]["class_name"] == name)
        labelled, _count = ndimage.label(expected == index)
        sizes = sorted(np.bincount(labelled.ravel())[1:] * PIXEL * PIXEL)
        assert areas == pytest.approx(sizes, rel=1e-9)
        assert {f["properties"]["class"] for f in features if f["properties"]["class_name"] == name} == {index}
    assert not any(f["properties"]["class_name"] == "other" for f in features)  # background not vectorised


def test_without_probabilities_only_the_class_raster_and_polygons(model_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(model_dir, lambda params, c: TwoBandLogits())
    out = tmp_path / "out"
    result = predict_raster(bundle, write_scene(tmp_path / "scene.tif", scene()), out, window=32, probabilities=False)
    assert result.probability is None and set(result.paths) == {"mask", "polygons"}
    assert sorted(p.name for p in out.iterdir()) == ["mask.tif", "polygons.geojson"]


def test_class_threshold_decision_matches_predict_classes() -> None:
    from workbench.evaluate.calibration import class_probabilities, predict_classes

    logits = np.random.default_rng(1).normal(0, 2, (3, 16, 16))
    calibration = {"decision": "argmax", "temperature": [1.0, 2.0, 0.5], "class_thresholds": {"snow": 0.4}}
    prob = class_probabilities(logits, calibration)
    mask = probability_to_mask(prob, 0.5, {2: 0.4})
    np.testing.assert_array_equal(mask, predict_classes(logits, calibration, ["other", "lake", "snow"]))

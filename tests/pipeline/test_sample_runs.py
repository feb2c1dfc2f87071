"""The real samples in ../shared/data as runs (params/samples_*.yaml), each in its smoke profile.

The data folder lives beside the repository; every test here skips when it is absent (fixture `shared_data`).
Each run ingests its raw data through `data.source: ingest` into a store under the test's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workbench.cli import main
from workbench.data.store import open_store, read_catalog, read_store_meta
from workbench.params import load_params
from workbench.run import NOTEBOOKS, RunLayout

PARAMS = Path(__file__).resolve().parents[2] / "params"
SAMPLES = sorted(path.stem for path in PARAMS.glob("samples_*.yaml"))
UKIS = "ukis-csmask"
PEEL = "rts-labeling-intercomparison"
PEEL_IMAGE = f"{PEEL}/01_Setup/Peel/data/S2_20210821T210019_20210821T210020_T08WMA.tif"


def test_sample_parameter_files_validate_and_name_their_data_from_the_project_root():
    assert {"samples_clouds", "samples_clouds_unet", "samples_peel_rts", "samples_terramesh"} <= set(SAMPLES)
    for name in SAMPLES:
        params = load_params(PARAMS / f"{name}.yaml")
        assert params.data.source == "ingest" and params.data.ingest is not None
        assert str(params.data.ingest.src).startswith("../shared/data/"), name


def test_the_unet_comparison_differs_from_the_cloud_recipe_only_in_the_model():
    recipe = yaml.safe_load((PARAMS / "samples_clouds.yaml").read_text())
    unet = yaml.safe_load((PARAMS / "samples_clouds_unet.yaml").read_text())
    assert recipe["model"]["architecture"] == "satunet" and unet["model"]["architecture"] == "Unet"
    for key in ("experiment", "description", "model"):
        recipe.pop(key), unet.pop(key)
    assert recipe == unet
    cloud38 = yaml.safe_load((PARAMS / "cloud38.yaml").read_text())
    assert recipe["train"]["loss"] == cloud38["train"]["loss"]
    assert recipe["data"]["normalize"] == cloud38["data"]["normalize"]


def _run(name: str, tmp_path: Path, overrides: list[str], notebooks: list[str] | None = None) -> Path:
    reports = tmp_path / "reports"
    args = ["run", str(PARAMS / f"{name}.yaml"), "--smoke", "--quiet", "--reports", str(reports)]
    args += [arg for item in overrides for arg in ("--set", item)]
    if notebooks:
        args += ["--notebooks", *notebooks]
    assert main(args) == 0
    experiment = load_params(PARAMS / f"{name}.yaml").experiment
    runs = [path for path in (reports / experiment).iterdir() if (path / "run.json").is_file()]
    source = [path for path in runs if "external" not in path.name]
    assert len(source) == 1
    return source[0]


@pytest.mark.slow
# the plain-Unet file differs only in its model (checked above), so one end-to-end run covers both
@pytest.mark.parametrize("name", ["samples_clouds"])
def test_clouds_train_on_landsat7_and_score_every_landsat5_chip(name: str, shared_data: Path, tmp_path: Path):
    l5 = shared_data / UKIS / "landsat5.npz"
    external = f"[{{store: {tmp_path / 'l5'}, ingest: {{format: ukis-csmask, src: {l5}, chip_size: 64}}}}]"
    run_dir = _run(
        name,
        tmp_path,
        [
            f"data.store={tmp_path / 'l7'}",
            f"data.ingest.src={shared_data / UKIS / 'landsat7.npz'}",
            f"evaluate.external={external}",
        ],
        ["01", "02", "03"],
    )
    info = json.loads((run_dir / "run.json").read_text())
    (scored,) = info["external"]
    external_run = Path(scored["run_dir"])
    table = pd.read_parquet(RunLayout(external_run).per_chip("test"))
    # every Landsat 5 chip is scored, and against the Landsat 5 reference: cloud (4) pixels are its positives
    mask = np.load(l5)["msk"][..., 0]
    assert len(table) == (512 // 64) ** 2 == len(read_catalog(tmp_path / "l5"))
    assert int((table["tp"] + table["fn"]).sum()) == int((mask == 4).sum())
    assert int(table[["tp", "fp", "fn", "tn"]].to_numpy().sum()) == mask.size
    assert json.loads((external_run / "run.json").read_text())["bands"] == {
        "Red": "Red", "Green": "Green", "Blue": "Blue", "NIR": "NIR"
    }  # fmt: skip
    assert scored["iou"] == pytest.approx(
        json.loads(RunLayout(external_run).metrics.read_text())["test.calibrated.iou"]
    )
    if name == "samples_clouds":  # the 38-Cloud patch through its own reader, scored by the same model
        _score_38cloud(run_dir, shared_data, tmp_path)
    # the row split written at ingest: train, val and test are row bands of the Landsat 7 scene
    catalog = pd.read_parquet(RunLayout(run_dir).catalog)
    rows = catalog.groupby("split")["row"].agg(["min", "max"])
    assert rows.loc["train", "max"] < rows.loc["val", "min"] <= rows.loc["val", "max"] < rows.loc["test", "min"]


def _score_38cloud(run_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    """Ingest the 38-Cloud patch (Landsat 8 digital numbers) and score it with store statistics."""
    import rasterio

    from workbench.data.ingest import ingest

    sample = shared_data / "38cloud-sample" / "sample"
    ingest("cloud38", sample, tmp_path / "c38", chip_size=64, progress=False)
    reports = tmp_path / "reports"
    args = ["evaluate", str(run_dir), str(tmp_path / "c38"), "--reports", str(reports), "--normalize", "store"]
    assert main(args) == 0
    (external,) = [p for p in (reports / run_dir.parent.name).iterdir() if p.name.endswith("external-c38")]
    info = json.loads((external / "run.json").read_text())
    assert info["bands"] == {"Red": "red", "Green": "green", "Blue": "blue", "NIR": "nir"}
    assert info["normalize"] == "store"
    with rasterio.open(next(sample.glob("gt_patch_*.TIF"))) as gt:
        cloud = gt.read(1) == 255
    assert abs(cloud.mean() - 0.307) < 0.001  # the sample's documented cloud fraction
    table = pd.read_parquet(RunLayout(external).per_chip("test"))
    assert len(table) == (384 // 64) ** 2 and int((table["tp"] + table["fn"]).sum()) == int(cloud.sum())


@pytest.mark.slow
def test_peel_consensus_is_the_experts_majority_and_the_review_ranks_the_12_experts(
    shared_data: Path, tmp_path: Path
) -> None:
    import geopandas as gpd
    import rasterio
    from rasterio.features import rasterize

    labels = str(shared_data / PEEL / "02_UserResults" / "#*" / "Peel_digitized.shp")
    run_dir = _run(
        "samples_peel_rts",
        tmp_path,
        [
            f"data.store={tmp_path / 'peel'}",
            f"data.ingest.src={shared_data / PEEL_IMAGE}",
            f"data.ingest.options.labels={labels}",
        ],
    )
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and list(info["notebooks"]) == NOTEBOOKS
    # independent majority vote: each expert's polygons burnt on the image grid, a pixel drawn by >= 7 of 12
    with rasterio.open(shared_data / PEEL_IMAGE) as image:
        shape, transform, crs = (image.height, image.width), image.transform, image.crs
    experts = sorted((shared_data / PEEL / "02_UserResults").glob("#*/Peel_digitized.shp"))
    assert len(experts) == 12
    votes = np.zeros(shape, np.int32)
    for path in experts:
        frame = gpd.read_file(path).to_crs(crs)
        geometries = [g for g in frame.geometry if g is not None and not g.is_empty]
        if geometries:
            votes += rasterize(geometries, out_shape=shape, transform=transform, fill=0, default_value=1, dtype="uint8")
    majority = votes >= 7
    store = tmp_path / "peel"
    catalog = read_catalog(store)
    ds = open_store(store, dask=False)
    checked = 0
    for position, chip in catalog.iterrows():
        row, col = int(chip["row"]), int(chip["col"])
        label = np.asarray(ds["label"][position].values)
        np.testing.assert_array_equal(label.astype(bool), majority[row : row + 32, col : col + 32])
        np.testing.assert_array_equal(np.asarray(ds["votes"][position].values), votes[row : row + 32, col : col + 32])
        checked += int(label.sum())
    assert checked > 0 and read_store_meta(store)["attrs"]["n_annotators"] == 12
    annotators = pd.read_csv(RunLayout(run_dir).review_annotators)
    assert len(annotators) == 12
    metrics = json.loads(RunLayout(run_dir).metrics.read_text())
    assert 0.0 <= metrics["test.iou"] <= 1.0  # the model scored against the consensus


@pytest.mark.slow
def test_terramesh_chips_feed_terramind_with_water_from_land_cover_class_1(shared_data: Path, tmp_path: Path):
    import rasterio

    root = shared_data / "terramesh-examples"
    run_dir = _run(
        "samples_terramesh",
        tmp_path,
        [f"data.store={tmp_path / 'tm'}", f"data.ingest.src={root}"],
        ["01", "02"],
    )
    store = tmp_path / "tm"
    meta = read_store_meta(store)
    modalities = [band["modality"] for band in meta["bands"]]
    assert modalities == ["S2L2A"] * 12 + ["S1RTC"] * 2 + ["DEM"]
    catalog = read_catalog(store)
    assert len(catalog) == 5 * 4  # five 224 px samples, 112 px tiles
    ds = open_store(store, dask=False)
    for position in (0, len(catalog) - 1):
        chip = catalog.iloc[position]
        lulc = sorted((root / "LULC").glob(f"{Path(str(chip['file'])).stem}*"))
        with rasterio.open(lulc[0]) as src:
            classes = src.read(1)
        row, col = int(chip["row"]), int(chip["col"])
        expected = (classes[row : row + 112, col : col + 112] == 1).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(ds["label"][position].values), expected)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["notebooks"]["02_train"]["status"] == "ok"
    bundle = json.loads((run_dir / "model" / "run_info.json").read_text())
    assert bundle["final_weights"]["weights"]
    frozen = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert frozen["model"]["architecture"] == "terramind" and frozen["model"]["terramind"]["size"] == "tiny"

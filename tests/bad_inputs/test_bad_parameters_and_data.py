"""Bad-input corpus for validation before compute and integrity (issue items 4 and 5): each case asserts the
message names the value and the fix, and that nothing is computed on wrong data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from reliability_helpers import first_channel, tiny_bundle, tiny_raster, tiny_store

from workbench.data.prepare import StoreChangedError, load_prepared, prepare_data
from workbench.data.store import StoreError, check_band_order, store_fingerprint
from workbench.data.validate import (
    LabelValueError,
    PreflightError,
    check_label_values,
    positive_pixel_warnings,
    preflight,
)
from workbench.evaluate.chips import pooled_metrics
from workbench.models.bundle import BundleIntegrityError, load_bundle
from workbench.params import Params, ParamsError, load_params
from workbench.run import CALIBRATION_FILE, STATS_FILE


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("bad") / "store")


def params_for(store: Path, *extra: str) -> Params:
    return load_params(
        None,
        ["experiment=bad", "data.source=store", f"data.store={store}", "data.split.method=catalog", *extra],
    )


# --------------------------------------------------------------------------- parameters


def test_a_boolean_is_not_taken_for_a_number() -> None:
    with pytest.raises(ParamsError, match=r"train\.max_epochs: .*a boolean \(true\) is not a valid value"):
        load_params(None, ["experiment=x", "train.max_epochs=true"])
    with pytest.raises(ParamsError, match=r"data\.batch_size: .*boolean"):
        load_params(None, ["experiment=x", "data.batch_size=false"])
    assert load_params(None, ["experiment=x", "train.compile=true"]).train.compile is True  # bools stay bools


def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text("experiment: x\ntrain:\n  max_epochs: 3\n  max_epochs: 30\n")
    with pytest.raises(ParamsError, match=r"p\.yaml.*duplicate key 'max_epochs' \(line 4; first on line 3\)"):
        load_params(file)


def test_unknown_review_split_fails_before_compute(store: Path) -> None:
    with pytest.raises(PreflightError, match=r"review\.splits names \['bogus'\].*splits \['test', 'train', 'val'\]"):
        preflight(params_for(store, "review.splits=[bogus]"), store)


def test_unknown_calibration_split_fails_before_compute(store: Path) -> None:
    with pytest.raises(PreflightError, match=r"calibrate\.split='bogus' is not a split of this run"):
        preflight(params_for(store, "calibrate.split=bogus"), store)


def test_missing_rgb_and_model_bands_fail_before_compute(store: Path) -> None:
    with pytest.raises(PreflightError) as error:
        preflight(params_for(store, "data.rgb_bands=[B04,B03,B01]", "data.bands=[B03,B08]"), store)
    text = str(error.value)
    assert "data.bands lists ['B08']" in text and "data.rgb_bands" in text and "['B01']" in text
    assert "the store has ['B02', 'B03', 'B04', 'B11']" in text


def test_good_parameters_pass_preflight_with_warnings_only(store: Path) -> None:
    report = preflight(params_for(store, "data.swir_band=B12"), store)
    assert report.splits == ["test", "train", "val"]
    assert any("swir_band='B12'" in text and "skipped" in text for text in report.warnings)


def test_unexpected_label_values_stop_the_run_with_count_and_fix(tmp_path: Path) -> None:
    from workbench.audit import allowed_label_values, scan_store
    from workbench.data.store import read_catalog

    store = tiny_store(tmp_path / "s7", label_value=7)
    catalog = read_catalog(store)
    scan = scan_store(
        store, catalog, ["B02", "B03", "B04", "B11"], allowed_labels=allowed_label_values(1), progress=False
    )
    with pytest.raises(LabelValueError) as error:
        check_label_values(store, scan.chips, num_classes=1)
    text = str(error.value)
    assert "128 valid pixels in 8 chip(s)" in text  # 4x4 squares of 7 in 8 chips
    assert "(7: 128 px" in text and "class map" in text and "255" in text and "model.num_classes" in text
    check_label_values(store, scan.chips.assign(unexpected_label_pixels=0), num_classes=1)  # clean: passes


def test_a_split_without_positive_pixels_warns_and_reports_undefined_metrics(tmp_path: Path) -> None:
    catalog = pd.DataFrame({"split": ["train", "val", "val"], "positive_fraction": [0.1, 0.0, 0.0]})
    (warning,) = positive_pixel_warnings(catalog)
    assert "split 'val' has no positive pixel in its 2 chip(s)" in warning and "NaN" in warning
    table = pd.DataFrame(
        {"tp": [0, 0], "fp": [5, 0], "fn": [0, 0], "tn": [95, 100], "iou": [0.0, np.nan], "flags": ["", ""]}
    )
    pooled = pooled_metrics(table)
    assert pooled["no_positive_pixels"] is True
    assert math.isnan(pooled["iou"]) and math.isnan(pooled["f1"]) and math.isnan(pooled["recall"])
    assert pooled["precision"] == 0.0 and pooled["accuracy"] == pytest.approx(195 / 200)  # still defined


# --------------------------------------------------------------------------- integrity


def test_store_json_band_order_differing_from_the_arrays_is_refused(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "s")
    meta = json.loads((store / "store.json").read_text())
    meta["bands"][0], meta["bands"][2] = meta["bands"][2], meta["bands"][0]
    (store / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"lists the bands \['B04', 'B03', 'B02', 'B11'\] but the arrays hold"):
        check_band_order(store)


def test_a_store_rewritten_between_stages_is_refused(tmp_path: Path) -> None:
    store = tiny_store(tmp_path / "shared")
    params = params_for(store)
    prepare_data(params.data, tmp_path / "run", seed=0)
    assert load_prepared(tmp_path / "run", params.data).store == store  # unchanged: fine
    before = store_fingerprint(store)
    tiny_store(tmp_path / "other", label_value=1, positives=False)
    import shutil

    shutil.rmtree(store)
    shutil.copytree(tmp_path / "other", store)  # another run regenerated the shared store
    assert store_fingerprint(store) != before
    with pytest.raises(StoreChangedError, match=r"changed since this run started.*data\.store"):
        load_prepared(tmp_path / "run", params.data)


def test_bundle_with_zero_std_is_refused(tmp_path: Path) -> None:
    model = tiny_bundle(tmp_path / "model", std=[1.0, 0.0])
    with pytest.raises(BundleIntegrityError, match=r"std must be positive.*\['B11'\]"):
        load_bundle(model, first_channel)


def test_edited_statistics_fail_the_checksum(tmp_path: Path) -> None:
    model = tiny_bundle(tmp_path / "model")
    stats = json.loads((model / STATS_FILE).read_text())
    stats["mean"] = [v + 0.5 for v in stats["mean"]]  # a shifted mean: still valid numbers
    (model / STATS_FILE).write_text(json.dumps(stats))
    with pytest.raises(BundleIntegrityError, match=r"normalization_stats\.json changed since the bundle was written"):
        load_bundle(model, first_channel)


def test_deleted_calibration_is_an_error_not_threshold_one_half(tmp_path: Path) -> None:
    model = tiny_bundle(tmp_path / "model")
    (model / CALIBRATION_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"calibration\.json is missing but .*checksums\.json records it"):
        load_bundle(model, first_channel)


def test_predict_refuses_an_uncalibrated_model_unless_asked(tmp_path: Path) -> None:
    from workbench.infer import predict_raster

    model = tiny_bundle(tmp_path / "model", calibrated=False)
    raster = tiny_raster(tmp_path / "scene.tif")
    with pytest.raises(FileNotFoundError, match=r"uncalibrated.*--uncalibrated"):
        predict_raster(model, raster, tmp_path / "out", window=32, progress=False, build_model=first_channel)
    result = predict_raster(
        model, raster, tmp_path / "out", window=32, progress=False, build_model=first_channel, allow_uncalibrated=True
    )
    import rasterio

    with rasterio.open(result.mask) as src:
        mask = src.read(1)
    assert mask[:, :32].all() and not mask[:, 32:].any()

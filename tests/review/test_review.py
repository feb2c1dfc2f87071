"""Label-noise review: agreement numbers, pre-filter, suspicion ranking, top-k scoring, decision log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench.arrays import IGNORE_INDEX
from workbench.data.agreement import (
    REASON_AGREES,
    REASON_EMPTY_DRY,
    REASON_EMPTY_WET,
    REASON_LOW_IOU,
    REASON_LOW_IOU_AND_EXCESS,
    REASON_WATER_EXCESS,
    ReviewInputError,
    chip_agreement,
    prefilter_decision,
    prefilter_table,
)
from workbench.data.store import BandSpec, Chip, StoreWriter, open_store
from workbench.params import ReviewParams
from workbench.review import (
    ReviewChip,
    iter_store_chips,
    noise_score,
    noise_terms,
    review_table,
    top_k_scores,
)

BANDS = ["B02", "B03", "B04", "B08", "B11"]
# Raw reflectance x 10000: (blue, green, red, nir, swir1).
LAND = (700, 900, 1000, 2500, 2200)  # MNDWI = (900 - 2200) / 3100 < 0
WATER = (900, 1100, 700, 300, 150)  # MNDWI = 950 / 1250 = 0.76
SNOW = (5800, 6000, 5900, 5500, 600)  # bright in green, dark in SWIR: MNDWI = 0.82, yet not water
SHADOW = (250, 300, 260, 400, 200)  # dark everywhere: MNDWI = 0.2 > 0, yet not water
MARGIN = (800, 1000, 900, 1500, 800)  # wet margin: MNDWI = 0.111


def scene(size: int, **surfaces: np.ndarray) -> np.ndarray:
    """A (5, size, size) image of land with the given surfaces painted on top (in argument order)."""
    image = np.empty((len(BANDS), size, size), dtype=np.float32)
    image[:] = np.array(LAND, dtype=np.float32)[:, None, None]
    spectra = {"water": WATER, "snow": SNOW, "shadow": SHADOW, "margin": MARGIN}
    for name, where in surfaces.items():
        image[:, where] = np.array(spectra[name], dtype=np.float32)[:, None]
    return image


def box(size: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


def hand_mndwi(image: np.ndarray) -> np.ndarray:
    green, swir = image[BANDS.index("B03")].astype(float), image[BANDS.index("B11")].astype(float)
    denominator = green + swir
    return np.where(denominator > 0, (green - swir) / np.where(denominator > 0, denominator, 1), 0.0)


# --------------------------------------------------------------------------- the 10 x 10 chip

LAKE = box(10, slice(2, 6), slice(2, 8))  # 4 x 6 = 24 pixels
HALF_LAKE = box(10, slice(2, 6), slice(2, 5))  # the label keeps 12 of them


@pytest.fixture
def half_labelled_chip() -> dict[str, np.ndarray]:
    image = scene(10, water=LAKE)
    prob = np.where(LAKE, 0.95, 0.02)
    return {
        "image": image,
        "label": HALF_LAKE.astype(np.uint8),
        "valid": np.ones((10, 10), dtype=bool),
        "prob": prob,
    }


def test_hand_built_spectra_have_the_expected_mndwi_sign() -> None:
    image = scene(10, water=LAKE)
    index = hand_mndwi(image)
    assert (index[LAKE] > 0.7).all() and (index[~LAKE] < 0).all()


def test_chip_agreement_matches_hand_computed_numbers(half_labelled_chip: dict[str, np.ndarray]) -> None:
    result = chip_agreement(
        half_labelled_chip["image"],
        BANDS,
        half_labelled_chip["label"],
        half_labelled_chip["valid"],
        half_labelled_chip["prob"],
        cfg=ReviewParams(),
    )
    water = hand_mndwi(half_labelled_chip["image"]) > 0
    label = half_labelled_chip["label"] > 0
    assert result["n_pixels"] == 100
    assert result["label_fraction"] == pytest.approx(12 / 100)
    assert result["water_fraction"] == pytest.approx(water.sum() / 100) == pytest.approx(0.24)
    assert result["iou_label_water"] == pytest.approx((label & water).sum() / (label | water).sum())
    assert result["iou_label_water"] == pytest.approx(12 / 24)
    assert result["water_label_ratio"] == pytest.approx(24 / 12)
    assert result["model_fraction"] == pytest.approx(0.24)
    assert result["iou_label_model"] == pytest.approx(0.5)
    assert result["iou_model_water"] == pytest.approx(1.0)
    assert result["prefilter_keep"] is True
    assert result["prefilter_reason"] == REASON_AGREES


def test_chip_agreement_counts_only_valid_labelled_pixels(half_labelled_chip: dict[str, np.ndarray]) -> None:
    valid = half_labelled_chip["valid"].copy()
    valid[9, :] = False  # a nodata row of land
    label = half_labelled_chip["label"].copy()
    label[2, 7] = IGNORE_INDEX  # one lake pixel left unlabelled
    result = chip_agreement(half_labelled_chip["image"], BANDS, label, valid, None)
    assert result["n_pixels"] == 89
    assert result["label_fraction"] == pytest.approx(12 / 89)
    assert result["water_fraction"] == pytest.approx(23 / 89)
    assert result["iou_label_water"] == pytest.approx(12 / 23)
    assert np.isnan(result["model_fraction"]) and np.isnan(result["iou_label_model"])


def test_water_threshold_parameter_excludes_a_wet_margin() -> None:
    margin = box(10, slice(6, 7), slice(2, 8))  # 6 pixels of MNDWI 0.11
    image = scene(10, water=LAKE, margin=margin)
    label = LAKE.astype(np.uint8)
    valid = np.ones((10, 10), dtype=bool)
    loose = chip_agreement(image, BANDS, label, valid, cfg=ReviewParams(water_index_threshold=0.0))
    strict = chip_agreement(image, BANDS, label, valid, cfg=ReviewParams(water_index_threshold=0.3))
    assert loose["water_fraction"] == pytest.approx(30 / 100)
    assert loose["iou_label_water"] == pytest.approx(24 / 30)
    assert strict["water_fraction"] == pytest.approx(24 / 100)
    assert strict["iou_label_water"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- pre-filter


def _decide(label: np.ndarray, image: np.ndarray) -> tuple[bool, str]:
    result = chip_agreement(image, BANDS, label.astype(np.uint8), np.ones(label.shape, dtype=bool))
    return result["prefilter_keep"], result["prefilter_reason"]


def test_prefilter_keeps_a_label_that_agrees_with_water() -> None:
    assert _decide(LAKE, scene(10, water=LAKE)) == (True, REASON_AGREES)


def test_prefilter_drops_a_label_away_from_the_water() -> None:
    elsewhere = box(10, slice(7, 10), slice(0, 4))  # 12 land pixels labelled; IoU 0, ratio 2
    assert _decide(elsewhere, scene(10, water=LAKE)) == (False, REASON_LOW_IOU)


def test_prefilter_drops_a_label_much_smaller_than_the_water() -> None:
    small = box(10, slice(2, 4), slice(2, 5))  # 6 of 24 lake pixels: IoU 0.25 passes, ratio 4 > 3 fails
    assert _decide(small, scene(10, water=LAKE)) == (False, REASON_WATER_EXCESS)


def test_prefilter_on_empty_labels_depends_on_the_water_fraction() -> None:
    empty = np.zeros((10, 10), dtype=bool)
    puddle = box(10, slice(0, 2), slice(0, 2))  # 4 % water
    assert _decide(empty, scene(10, water=puddle)) == (True, REASON_EMPTY_DRY)
    assert _decide(empty, scene(10, water=LAKE)) == (False, REASON_EMPTY_WET)  # 24 % water


def test_prefilter_thresholds_are_inclusive() -> None:
    cfg = ReviewParams()
    assert prefilter_decision(10, 30, 0.20, 0.3, cfg) == (True, REASON_AGREES)
    assert prefilter_decision(10, 31, 0.20, 0.3, cfg) == (False, REASON_WATER_EXCESS)
    assert prefilter_decision(10, 31, 0.19, 0.3, cfg) == (False, REASON_LOW_IOU_AND_EXCESS)
    assert prefilter_decision(0, 5, 0.0, 0.05, cfg) == (True, REASON_EMPTY_DRY)
    assert prefilter_decision(0, 6, 0.0, 0.06, cfg) == (False, REASON_EMPTY_WET)


# --------------------------------------------------------------------------- noise score


def test_noise_terms_follow_the_documented_formula(half_labelled_chip: dict[str, np.ndarray]) -> None:
    chip = half_labelled_chip
    terms = noise_terms(chip["image"], BANDS, chip["label"], chip["valid"], chip["prob"], smooth_pixels=8.0)
    # label 12 px inside the 24-px lake; model and index both find the whole lake.
    assert terms["model_disagreement"] == pytest.approx(1 - (12 + 8) / (24 + 8))
    assert terms["index_disagreement"] == pytest.approx(1 - (12 + 8) / (24 + 8))
    # every pixel is confident: 12 labelled lake (|0.95-1|), 12 unlabelled lake (0.95), 76 land (0.02)
    confident = (12 * 0.05 + 12 * 0.95 + 76 * 0.02) / 100
    assert terms["confident_error"] == pytest.approx(confident)
    cfg = ReviewParams()  # score = model_weight * model + index_weight * index + confident_weight (1) * confident
    assert terms["score"] == pytest.approx(cfg.model_weight * 0.375 + cfg.index_weight * 0.375 + 1.0 * confident)
    raw = noise_score(chip["image"], BANDS, chip["label"], chip["valid"], chip["prob"], smooth_pixels=0.0)
    assert raw == pytest.approx(cfg.model_weight * 0.5 + cfg.index_weight * 0.5 + confident)
    mine = ReviewParams(model_weight=1.0, index_weight=0.5)
    assert noise_terms(chip["image"], BANDS, chip["label"], chip["valid"], chip["prob"], mine, smooth_pixels=8.0)[
        "score"
    ] == pytest.approx(1.0 * 0.375 + 0.5 * 0.375 + 1.0 * confident)


def test_empty_label_and_empty_prediction_do_not_disagree() -> None:
    image = scene(10)
    empty = np.zeros((10, 10), dtype=np.uint8)
    terms = noise_terms(image, BANDS, empty, np.ones((10, 10), bool), np.full((10, 10), 0.3), smooth_pixels=0.0)
    assert terms["model_disagreement"] == 0.0
    assert terms["index_disagreement"] == 0.0
    assert terms["confident_error"] == 0.0  # no confident pixel at all


def test_noise_score_rejects_logits(half_labelled_chip: dict[str, np.ndarray]) -> None:
    chip = half_labelled_chip
    with pytest.raises(ReviewInputError, match="probability"):
        noise_score(chip["image"], BANDS, chip["label"], chip["valid"], chip["prob"] * 10 - 3)


N = 32


def model_prob(water: np.ndarray, uncertain: np.ndarray | None = None) -> np.ndarray:
    """A good model: 0.97 on water, 0.03 elsewhere, 0.3 on pixels it is unsure about."""
    prob = np.where(water, 0.97, 0.03)
    if uncertain is not None:
        prob = np.where(uncertain & ~water, 0.3, prob)
    return prob


def ranking_chips() -> list[ReviewChip]:
    lake = box(N, slice(8, 20), slice(10, 22))  # 144 px
    small_lake = box(N, slice(4, 9), slice(4, 10))  # 30 px
    snow = box(N, slice(0, 14), slice(0, 32))
    shadow = box(N, slice(16, 30), slice(2, 20))
    valid = np.ones((N, N), dtype=bool)
    # A clean outline differs from the model by one edge column.
    edge_miss = lake & ~box(N, slice(8, 20), slice(21, 22))
    strays = box(N, slice(28, 29), slice(28, 31))  # three stray false-positive pixels
    undersized = box(N, slice(10, 16), slice(12, 18))  # 36 of 144 px
    shifted = np.roll(lake, (5, 6), axis=(0, 1))
    cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, bool]] = [
        ("clean_lake", scene(N, water=lake), lake, model_prob(edge_miss), False),
        ("clean_small_lake", scene(N, water=small_lake), small_lake, model_prob(small_lake), False),
        ("clean_empty", scene(N), np.zeros((N, N), bool), np.where(strays, 0.8, 0.03), False),
        ("clean_snow", scene(N, snow=snow), np.zeros((N, N), bool), model_prob(np.zeros((N, N), bool), snow), False),
        ("clean_lake_snow", scene(N, snow=snow, water=lake), lake, model_prob(lake, snow), False),
        (
            "clean_shadow",
            scene(N, shadow=shadow),
            np.zeros((N, N), bool),
            model_prob(np.zeros((N, N), bool), shadow),
            False,
        ),
        ("omitted", scene(N, water=lake), np.zeros((N, N), bool), model_prob(lake), True),
        ("omitted_small", scene(N, water=small_lake), np.zeros((N, N), bool), model_prob(small_lake), True),
        ("undersized", scene(N, water=lake), undersized, model_prob(lake), True),
        ("shifted", scene(N, water=lake), shifted, model_prob(lake), True),
    ]
    chips = []
    for name, image, label, prob, noisy in cases:
        chips.append(
            ReviewChip(
                image=image,
                band_names=BANDS,
                label=label.astype(np.uint8),
                valid=valid,
                prob=prob,
                row={"chip_id": name, "region": "r", "year": 2023, "lat": 43.0, "lon": 77.0, "noisy": noisy},
            )
        )
    return chips


def test_hand_built_snow_and_shadow_look_like_water_to_mndwi() -> None:
    snow_index = hand_mndwi(scene(4, snow=np.ones((4, 4), bool)))
    shadow_index = hand_mndwi(scene(4, shadow=np.ones((4, 4), bool)))
    assert (snow_index > 0.3).all() and (shadow_index > 0).all()


def test_noise_score_ranks_label_errors_above_clean_chips() -> None:
    table = review_table(iter(ranking_chips()), ReviewParams(), progress=False)
    noisy = table[table["noisy"]]
    clean = table[~table["noisy"]]
    assert noisy["score"].min() > clean["score"].max(), table[["chip_id", "score"]].to_string()
    assert set(table.loc[table["rank"] <= len(noisy), "chip_id"]) == set(noisy["chip_id"])
    # where MNDWI is fooled (snow, shadow) but the model is right, the index term stays at zero
    fooled = table.set_index("chip_id").loc[["clean_snow", "clean_shadow"]]
    assert (fooled["index_disagreement"] == 0).all()
    assert (fooled["water_fraction"] > 0.2).all()
    # ... whereas the index-only pre-filter drops them: a known weakness the model-aware score avoids
    assert not fooled["prefilter_keep"].any()


def test_review_table_streams_chips_and_ranks_them() -> None:
    chips = ranking_chips()
    consumed: list[str] = []

    def stream():
        for chip in chips:
            consumed.append(chip.chip_id)
            yield chip

    table = review_table(stream(), progress=False)
    assert list(table["chip_id"]) == consumed == [chip.chip_id for chip in chips]
    assert sorted(table["rank"]) == list(range(1, len(chips) + 1))
    ordered = table.sort_values("rank")
    assert ordered["score"].is_monotonic_decreasing
    for column in ("region", "year", "lat", "lon", "label_fraction", "iou_label_model", "prefilter_keep", "score"):
        assert column in table.columns
    assert table["prefilter_keep"].dtype == bool


def test_review_table_accepts_mappings_and_names_bad_chips() -> None:
    chip = ranking_chips()[0]
    good = {"image": chip.image, "band_names": BANDS, "label": chip.label, "valid": chip.valid, "row": chip.row}
    table = review_table([good], progress=False)
    assert table["model_disagreement"].isna().all() and table["rank"].tolist() == [1]
    bad = dict(good, label=chip.label[:-1], row={"chip_id": "broken_chip"})
    with pytest.raises(ReviewInputError, match="broken_chip"):
        review_table([bad], progress=False)


def test_review_table_reads_a_chip_store(tmp_path: Path) -> None:
    chips = ranking_chips()[:4]
    bands = [BandSpec(name, "S2L2A", optical=True) for name in BANDS]
    with StoreWriter(tmp_path / "store", bands, source="test") as writer:
        for position, chip in enumerate(chips):
            split = "test" if position % 2 else "train"
            writer.append(
                Chip(chip.chip_id, chip.image, chip.label, chip.valid, lat=43.0, lon=77.0, region="r", split=split)
            )
    ds = open_store(tmp_path / "store")
    probabilities = np.stack([np.asarray(chip.prob) for chip in chips])
    table = review_table(iter_store_chips(ds, probabilities, splits=["test"]), progress=False)
    assert list(table["chip_id"]) == [chips[1].chip_id, chips[3].chip_id]
    direct = review_table([chips[1], chips[3]], progress=False)
    np.testing.assert_allclose(table["score"].to_numpy(), direct["score"].to_numpy())


# --------------------------------------------------------------------------- scoring and tables


def test_top_k_precision_and_recall_by_hand() -> None:
    table = pd.DataFrame(
        {
            "chip_id": list("abcdef"),
            "rank": [4, 1, 6, 2, 3, 5],
            "noisy": [False, True, True, False, True, False],
        }
    )
    # by rank: b(T) d(F) e(T) a(F) f(F) c(T)
    assert top_k_scores(table, 3) == {"k": 3, "precision": 2 / 3, "recall": 2 / 3, "n_true": 3, "hits": 2}
    assert top_k_scores(table, 1)["precision"] == 1.0
    everything = top_k_scores(table, 10)
    assert everything["k"] == 6 and everything["recall"] == 1.0 and everything["precision"] == 0.5
    with pytest.raises(ReviewInputError, match="missing_column"):
        top_k_scores(table, 3, truth_column="missing_column")


def test_prefilter_table_counts_chips_per_reason() -> None:
    table = pd.DataFrame(
        {
            "prefilter_keep": [True, True, False, False, False, True],
            "prefilter_reason": [
                REASON_AGREES,
                REASON_AGREES,
                REASON_LOW_IOU,
                REASON_LOW_IOU,
                REASON_EMPTY_WET,
                REASON_EMPTY_DRY,
            ],
            "iou_label_water": [0.8, 0.6, 0.01, 0.1, 0.0, 1.0],
        }
    )
    result = prefilter_table(table).set_index("reason")
    assert result.loc[REASON_AGREES, "n_chips"] == 2 and result.loc[REASON_AGREES, "decision"] == "kept"
    assert result.loc[REASON_LOW_IOU, "n_chips"] == 2 and result.loc[REASON_LOW_IOU, "decision"] == "dropped"
    assert result.loc[REASON_LOW_IOU, "n_iou_below"] == 1
    assert result.loc[REASON_LOW_IOU, "median_iou_label_water"] == pytest.approx(0.055)
    assert result["share"].sum() == pytest.approx(1.0)
    assert result.loc[REASON_EMPTY_WET, "share"] == pytest.approx(1 / 6)


# --------------------------------------------------------------------------- real imagery


S2L2A_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


def _terramesh(shared_data: Path, sample: str) -> tuple[np.ndarray, np.ndarray]:
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(shared_data / "terramesh-examples" / "S2L2A" / f"{sample}.tif") as source:
        image = source.read().astype(np.float32)
    with rasterio.open(shared_data / "terramesh-examples" / "LULC" / f"{sample}.tif") as source:
        land_cover = source.read(1)
    return image, land_cover


@pytest.mark.shared_data
def test_real_water_chip_agrees_with_mndwi(shared_data: Path) -> None:
    image, land_cover = _terramesh(shared_data, "282D_485L_3_3")
    label = (land_cover == 1).astype(np.uint8)  # land-cover class 1 = water
    valid = np.ones(label.shape, dtype=bool)
    result = chip_agreement(image, S2L2A_BANDS, label, valid, cfg=ReviewParams())
    green, swir = image[2].astype(float), image[10].astype(float)
    water = np.where(green + swir > 0, (green - swir) / np.maximum(green + swir, 1e-9), 0) > 0
    expected_iou = (water & (label > 0)).sum() / (water | (label > 0)).sum()
    assert result["iou_label_water"] == pytest.approx(expected_iou, rel=1e-6)
    assert result["label_fraction"] == pytest.approx(0.518, abs=0.001)
    assert result["prefilter_keep"]


@pytest.mark.shared_data
def test_real_snow_chip_fools_the_prefilter_but_not_the_score(shared_data: Path) -> None:
    image, land_cover = _terramesh(shared_data, "609U_541L_3_0")
    assert (land_cover == 7).all()  # the whole chip is snow/ice
    label = np.zeros(land_cover.shape, dtype=np.uint8)
    valid = np.ones(label.shape, dtype=bool)
    result = chip_agreement(image, S2L2A_BANDS, label, valid)
    assert result["water_fraction"] > 0.9  # snow has a high MNDWI
    assert result["prefilter_reason"] == REASON_EMPTY_WET
    dry_model = np.full(label.shape, 0.02)
    terms = noise_terms(image, S2L2A_BANDS, label, valid, dry_model)
    assert terms["index_disagreement"] == 0.0 and terms["model_disagreement"] == 0.0

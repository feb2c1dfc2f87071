"""The closed review loop: signals (cleanlab, index choice, votes), the ledger, the widget logic, the annotators."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench.data.ledger import Ledger, LedgerError, LedgerLockedError, LedgerWarning, apply_ledger, ledger_path
from workbench.data.store import BandSpec, Chip, StoreWriter, read_catalog
from workbench.params import ReviewParams

SIZE = 16


def make_store(path: Path, n: int = 6, bands: tuple[str, ...] = ("B02", "B03", "B04", "B11")) -> Path:
    rng = np.random.default_rng(0)
    specs = [BandSpec(name, "S2L2A", optical=True) for name in bands]
    with StoreWriter(path, specs, source="test") as writer:
        for i in range(n):
            label = np.zeros((SIZE, SIZE), np.uint8)
            label[4:10, 4:10] = 1
            image = rng.uniform(0.05, 0.3, (len(bands), SIZE, SIZE)).astype(np.float32)
            split = ["train", "val", "test"][i % 3]
            writer.append(
                Chip(
                    f"c{i}",
                    image,
                    label,
                    np.ones((SIZE, SIZE), bool),
                    lat=60.0 + i * 0.01,
                    lon=10.0,
                    region="r",
                    split=split,
                )
            )
    return path


# --------------------------------------------------------------------------- signals


def test_cleanlab_quality_is_batch_independent_and_ranks_a_wrong_label_low() -> None:
    from workbench.review.signals import cleanlab_quality

    rng = np.random.default_rng(1)
    labels = np.zeros((6, 16, 16), np.uint8)
    labels[:, 4:12, 4:12] = 1
    probs = np.where(labels > 0, 0.95, 0.05) + rng.uniform(-0.03, 0.03, labels.shape)
    labels[2] = 0  # chip 2's lake was omitted by the annotator
    scored = np.ones(labels.shape, bool)
    together = cleanlab_quality(labels, probs, scored)
    one_by_one = np.concatenate(
        [cleanlab_quality(labels[i : i + 1], probs[i : i + 1], scored[i : i + 1]) for i in range(6)]
    )
    np.testing.assert_allclose(together, one_by_one)
    assert int(np.argmin(together)) == 2
    # cleanlab's softmin: per-pixel self-confidence p[label] pooled with weights softmax((1 - p) / 0.1)
    confidence = np.where(labels[0] > 0, probs[0], 1 - probs[0]).ravel()
    weights = np.exp((1 - confidence) / 0.1)
    assert together[0] == pytest.approx(float((confidence * weights).sum() / weights.sum()), rel=1e-4)


def test_vote_signals_against_a_hand_count() -> None:
    from workbench.review.annotators import vote_signals

    votes = np.array([[0, 0, 1, 2], [4, 4, 4, 0], [2, 3, 0, 0]])
    result = vote_signals(votes, 4)
    marked = votes[votes > 0]  # 1 2 4 4 4 2 3
    assert result["contested_share"] == pytest.approx(4 / 7)
    h = {1: 0.811278, 2: 1.0, 3: 0.811278, 4: 0.0}
    assert result["vote_entropy"] == pytest.approx(sum(h[int(v)] for v in marked) / 7, abs=1e-5)


def test_annotator_table_finds_the_outlier() -> None:
    from workbench.review.annotators import annotator_table

    base = np.zeros((20, 20), bool)
    base[5:12, 5:12] = True
    shifted = np.zeros_like(base)
    shifted[12:18, 12:18] = True  # annotator "d" drew somewhere else
    table = annotator_table({"a": base, "b": base, "c": base, "d": shifted})
    assert table.iloc[0]["annotator"] == "d" and table.iloc[0]["iou_loo"] == 0.0
    assert table.iloc[0]["object_f1_loo"] == 0.0
    assert table.set_index("annotator").loc["a", "iou_loo"] == 1.0


def test_index_choice_expression_and_time_step_bands() -> None:
    from workbench.data.agreement import index_plane
    from workbench.indices import band_expression, resolve_band

    names = ["B02_t0", "B03_t0", "B08_t0", "B11_t0", "B03_t1"]
    image = np.stack([np.full((2, 2), v, np.float32) for v in (0.1, 0.3, 0.1, 0.2, 0.9)])
    assert resolve_band(names, "B03") == "B03_t0"
    assert index_plane(image, names, "mndwi")[0, 0] == pytest.approx((0.3 - 0.2) / 0.5)
    assert index_plane(image, names, "ndwi")[0, 0] == pytest.approx((0.3 - 0.1) / 0.4)
    assert band_expression(image, names, "(B03 - B08) / (B03 + B08)")[0, 0] == pytest.approx(0.5)
    assert index_plane(image, names, "none") is None
    with pytest.raises(ValueError, match="only band names"):
        band_expression(image, names, "__import__('os')")


def test_review_without_index_and_with_votes_in_the_table() -> None:
    from workbench.review import review_table
    from workbench.review.signals import ReviewChip

    label = np.zeros((16, 16), np.uint8)
    label[4:12, 4:12] = 1
    votes = label * 3
    votes[4:6, 4:12] = 1  # two contested rows
    chip = ReviewChip(
        image=np.ones((3, 16, 16), np.float32),
        band_names=["red", "green", "blue"],
        label=label,
        valid=np.ones((16, 16), bool),
        prob=np.where(label > 0, 0.9, 0.1),
        row={"chip_id": "x"},
        votes=votes,
        n_annotators=3,
    )
    table = review_table([chip], ReviewParams(index="none"), progress=False)
    row = table.iloc[0]
    assert np.isnan(row["index_disagreement"]) and row["contested_share"] == pytest.approx(16 / 64)
    cfg = ReviewParams()
    assert row["score"] == pytest.approx(
        cfg.model_weight * row["model_disagreement"]
        + cfg.confident_weight * row["confident_error"]
        + cfg.cleanlab_weight * (1 - row["cleanlab_quality"])
        + cfg.votes_weight * 16 / 64
    )


@pytest.mark.parametrize(
    "bands, rgb, index",
    [
        (["red", "green", "blue", "nir"], ("red", "green", "blue"), "none"),
        ([f"{b}_t{t}" for t in range(2) for b in ("B02", "B03", "B04", "B11")], ("B04", "B03", "B02"), "mndwi"),
    ],
)
def test_four_panel_for_other_recipes(bands: list[str], rgb: tuple[str, str, str], index: str) -> None:
    from workbench.figures import four_panel

    image = np.random.default_rng(0).uniform(0, 1, (len(bands), 16, 16)).astype(np.float32)
    label = np.zeros((16, 16), np.uint8)
    fig = four_panel(
        image,
        bands,
        label,
        np.full((16, 16), 0.2),
        np.ones((16, 16), bool),
        "t",
        rgb=rgb,
        index=index,
        votes=np.ones((16, 16), np.uint8),
        n_annotators=3,
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[1] == ("Model probability" if index == "none" else "MNDWI > 0: 0.0%") or titles[1].startswith("MNDWI")
    assert titles[-1] == "Annotator votes (of 3)" and titles[0].startswith("RGB (")


# --------------------------------------------------------------------------- ledger


def test_ledger_records_checks_and_survives_a_torn_line(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    ledger = Ledger.for_store(store)
    assert ledger.path == tmp_path / "store.review" / "decisions.jsonl"
    ledger.record("c0", "drop", note="cloud", reviewer="ana")
    with open(ledger.path, "ab") as handle:
        handle.write(b'{"chip_id": "c1", "decis')  # a crash mid-line
    fixed = np.zeros((SIZE, SIZE), np.uint8)
    fixed[0:3, 0:3] = 1
    ledger.record("c1", "fix", reviewer="ben", corrected=fixed)
    ledger.record("c0", "keep", reviewer="ben")
    with pytest.warns(LedgerWarning, match=":3: skipped"):
        latest = ledger.latest()
    assert {k: v.decision for k, v in latest.items()} == {"c0": "keep", "c1": "fix"}
    np.testing.assert_array_equal(ledger.corrected_label("c1"), fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerWarning)
        conflicts = ledger.conflicts()
    assert list(conflicts["chip_id"]) == ["c0"] and conflicts.iloc[0]["current"] == "keep"
    assert conflicts.iloc[0]["decisions"] == ["drop", "keep"]


def test_ledger_bad_input_is_refused_with_clear_messages(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    ledger = Ledger.for_store(store)
    with pytest.raises(LedgerError, match="'nope' is not in the store's catalog"):
        ledger.record("nope", "keep")
    with pytest.raises(LedgerError, match=r"shape \(3, 3\), expected \(16, 16\)"):
        ledger.record("c1", "fix", corrected=np.zeros((3, 3), np.uint8))
    assert not ledger.path.exists()  # nothing written by refused decisions
    ledger.record("c1", "keep")
    other = make_store(tmp_path / "other", n=4)
    with pytest.raises(LedgerError, match="belongs to another store"):
        Ledger.for_store(other, ledger.path).read()
    with pytest.raises(LedgerError, match="belongs to another store"):
        Ledger.for_store(other, ledger.path).record("c1", "drop")


def test_ledger_refuses_unknown_decisions_and_keeps_appending_after_a_torn_line(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    ledger = Ledger.for_store(store)
    with pytest.raises(LedgerError, match="decision must be one of"):
        ledger.record("c0", "delete")
    with pytest.raises(LedgerError, match="chip_id must be a non-empty string"):
        ledger.record("", "keep")
    with pytest.raises(LedgerError, match="only a 'fix' carries a corrected label"):
        ledger.record("c0", "drop", corrected=np.zeros((SIZE, SIZE), np.uint8))
    assert ledger.latest() == {} and not ledger.path.exists()
    ledger.record("c0", "keep", note="looks fine", reviewer="ana")
    with open(ledger.path, "ab") as handle:
        handle.write(b'{"chip_id": "c2", "decis')  # torn last line, no newline
    ledger.record("c2", "unsure")  # must start a line of its own
    lines = ledger.path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[-1])["chip_id"] == "c2" and len(lines) == 4  # header, c0, torn, c2
    with pytest.warns(LedgerWarning):
        table = ledger.table()
    assert sorted(table["chip_id"]) == ["c0", "c2"]
    assert table.set_index("chip_id").loc["c0", "note"] == "looks fine"
    assert list(table.columns) == ["chip_id", "decision", "note", "reviewer", "time", "corrected", "sha256", "line"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_ledger_keeps_the_decision_pending(tmp_path: Path) -> None:
    from workbench.review.widget import ReviewSession

    store = make_store(tmp_path / "store")
    ledger = Ledger.for_store(store)
    ledger.record("c0", "keep")
    table = pd.DataFrame({"chip_id": ["c2", "c0"], "score": [0.9, 0.1], "rank": [1, 2]})
    session = ReviewSession(table, ledger)
    ledger.path.chmod(0o444)
    try:
        assert not session.decide("drop", note="smoke", reviewer="ana")
        assert "not writable" in session.message and len(session.pending) == 1
    finally:
        ledger.path.chmod(0o644)
    assert session.retry() and not session.pending
    assert ledger.latest()["c2"].decision == "drop"


def test_locked_ledger_is_reported_and_the_decision_kept_pending(tmp_path: Path) -> None:
    import fcntl

    from workbench.review.widget import ReviewSession

    store = make_store(tmp_path / "store")
    ledger = Ledger.for_store(store)
    ledger.record("c0", "keep")
    session = ReviewSession(pd.DataFrame({"chip_id": ["c1"], "score": [0.5], "rank": [1]}), ledger)
    with open(ledger.path, "ab") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        with pytest.raises(LedgerLockedError, match="another process"):
            ledger.record("c1", "drop")
        assert not session.decide("drop") and "still pending (1)" in session.message
    assert ledger.line_count() == 2
    assert session.retry() and ledger.latest()["c1"].decision == "drop" and ledger.line_count() == 3


def test_widget_buttons_append_one_line_each_and_fix_takes_the_model_mask(tmp_path: Path) -> None:
    pytest.importorskip("ipyleaflet")
    from workbench.review.maps import chip_footprints
    from workbench.review.widget import ReviewSession, ReviewWidget

    store = make_store(tmp_path / "store")
    catalog = read_catalog(store)
    table = catalog.assign(score=np.linspace(1, 0, len(catalog)), rank=np.arange(1, len(catalog) + 1))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[2:5, 2:5] = 1
    session = ReviewSession(table, Ledger.for_store(store), model_mask=lambda chip_id: mask)
    widget = ReviewWidget(session, chip_footprints(table, SIZE), overlays={"c0": "data:image/png;base64,AA=="})
    ledger = session.ledger
    widget.reviewer.value = "ana"
    widget.note.value = "lake missing"
    widget.buttons["drop"].click()
    assert ledger.line_count() == 2  # header + one decision
    assert json.loads(ledger.path.read_text().splitlines()[-1])["chip_id"] == "c0"
    assert session.chip_id == "c1"  # moved on
    widget.buttons["fix"].click()
    assert ledger.line_count() == 3
    np.testing.assert_array_equal(ledger.corrected_label("c1"), mask)
    widget.previous_button.click()
    assert session.chip_id == "c1"
    widget.show_noise.value = False
    assert all(layer is not widget.noise_layer for layer in widget.map.layers)
    widget.show_noise.value = True
    assert any(layer is widget.noise_layer for layer in widget.map.layers)
    widget._click(feature={"properties": {"chip_id": "c4"}})
    assert session.chip_id == "c4"
    widget._hover(feature={"properties": {"chip_id": "c4", "rank": 5, "score": 0.2}})
    assert "c4" in widget.hover.value


def test_applied_ledger_drops_chips_and_serves_corrected_labels(tmp_path: Path) -> None:
    from workbench.data.dataset import ChipDataset

    store = make_store(tmp_path / "store")
    ledger = Ledger.for_store(store)
    fixed = np.zeros((SIZE, SIZE), np.uint8)
    fixed[1:3, 1:3] = 1
    ledger.record("c0", "drop")
    ledger.record("c3", "fix", corrected=fixed)
    catalog, state = apply_ledger(store, read_catalog(store))
    assert state is not None and state.dropped == [0]
    assert catalog.loc[0, "split"] == "dropped" and "c0" not in set(catalog.loc[catalog["split"] == "train", "chip_id"])
    assert state.provenance["lines"] == 3 and state.provenance["path"] == str(ledger_path(store).resolve())
    dataset = ChipDataset(store, [3, 1], corrections=state.corrections)
    np.testing.assert_array_equal(dataset.read_raw(0)[1], fixed)
    assert dataset.read_raw(1)[1].sum() == 36  # the original label of an untouched chip
    untouched, none = apply_ledger(store, read_catalog(store), enabled=False)
    assert none is None and "dropped" not in set(untouched["split"])


def test_review_map_html_is_offline_and_toggles(tmp_path: Path) -> None:
    from workbench.review.maps import chip_footprints, noise_image, png_data_url, review_map_html

    table = pd.DataFrame(
        {"chip_id": ["a", "b"], "score": [0.9, 0.1], "rank": [1, 2], "lat": [60.0, 60.01], "lon": [10.0, 10.0]}
    )
    label = np.zeros((4, 4), np.uint8)
    label[0, 0] = 1
    image = noise_image(label, np.eye(4)[::-1], np.ones((4, 4), bool))
    assert tuple(image[0, 0]) == (255, 140, 0, 200) and tuple(image[0, 3]) == (220, 0, 220, 200)
    text = review_map_html(table, chip_footprints(table, 64), {"a": png_data_url(image)})
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert text.count("<polygon") == 2 and "a · rank 1 · score 0.900" in text and "layer-noise" in text


# --------------------------------------------------------------------------- the Peel thaw-slump intercomparison


@pytest.mark.shared_data
def test_peel_annotators_and_contested_share_against_the_vote_raster(shared_data: Path, tmp_path: Path) -> None:
    from workbench.data.ingest import ingest
    from workbench.data.store import open_store
    from workbench.review.annotators import annotator_masks_from_files, annotator_table, vote_signals
    from workbench.stages.review import annotator_review

    root = shared_data / "rts-labeling-intercomparison"
    image = root / "01_Setup" / "Peel" / "data" / "S2_20210821T210019_20210821T210020_T08WMA.tif"
    experts = sorted((root / "02_UserResults").glob("*/Peel_digitized.shp"))
    ingest("vector", image, tmp_path / "store", labels=[str(p) for p in experts], progress=False)
    votes = open_store(tmp_path / "store")["votes"].values[0].astype(int)
    masks = annotator_masks_from_files(image, [str(p) for p in experts])
    stack = np.stack([m > 0 for m in masks.values()])
    np.testing.assert_array_equal(stack.sum(axis=0), votes)  # the vote raster is the count of the 12 masks
    # independent count of contested pixels: marked by some but not all of the 12 experts
    union, everyone = int((votes > 0).sum()), int((votes == 12).sum())
    assert vote_signals(votes, 12)["contested_share"] == pytest.approx((union - everyone) / union)
    assert 0.5 < (union - everyone) / union < 1.0
    table = annotator_review(tmp_path / "store")
    assert table is not None and len(table) == 12 and list(table["rank"]) == list(range(1, 13))
    for name, mask in masks.items():  # leave-one-out IoU by hand for each expert
        others = votes - (mask > 0)
        consensus = others >= 6  # strict majority of the other 11
        own = mask > 0
        expected = (own & consensus).sum() / (own | consensus).sum()
        assert table.set_index("annotator").loc[name, "iou_loo"] == pytest.approx(expected)
    assert table["iou_loo"].is_monotonic_increasing
    assert annotator_table(masks).equals(table)


def test_next_run_honours_the_ledger(tmp_path: Path) -> None:
    """A dropped chip leaves the train split the loader draws from; a fixed chip trains on its corrected label."""
    from workbench.data.loading import build_datamodule
    from workbench.data.prepare import load_prepared, prepare_data
    from workbench.params import DataParams, Params

    store = make_store(tmp_path / "store", n=9)
    params = Params(
        experiment="t",
        data=DataParams(source="store", store=store, split={"method": "catalog"}, normalize={"method": "none"}),
    )
    prepare_data(params.data, tmp_path / "run")
    ledger = Ledger.for_store(store)
    fixed = np.zeros((SIZE, SIZE), np.uint8)
    fixed[0, :] = 1
    ledger.record("c0", "drop", reviewer="ana")  # c0, c3, c6 are train chips
    ledger.record("c3", "fix", reviewer="ana", corrected=fixed)
    prepared = load_prepared(tmp_path / "run", params.data)
    train = build_datamodule(params, prepared).dataset("train")
    ids = read_catalog(store)["chip_id"].to_numpy()
    assert sorted(ids[train.indices]) == ["c3", "c6"]
    labels = {ids[int(sample["index"])]: sample["label"].numpy() for sample in (train[0], train[1])}
    np.testing.assert_array_equal(labels["c3"], fixed)
    assert labels["c6"].sum() == 36
    record = json.loads((tmp_path / "run" / "data" / "ledger.json").read_text())
    assert record["lines"] == 3 and record["dropped"] == 1 and record["fixed"] == 1 and len(record["sha256"]) == 64
    off = load_prepared(tmp_path / "run", params.data, decisions=False)
    assert "dropped" not in set(off.catalog["split"]) and not off.corrections


def test_label_corrected_table_by_hand() -> None:
    from workbench.evaluate.chips import label_corrected_table

    table = pd.DataFrame(
        {
            "region": ["a", "a", "b"],
            "tp": [8, 5, 4], "fp": [2, 0, 0], "fn": [0, 5, 0],
            "tp_raw": [8, 0, 4], "fp_raw": [2, 5, 0], "fn_raw": [0, 10, 0],
            "dropped": [False, False, True], "fixed": [False, True, False],
        }
    )  # fmt: skip
    result = label_corrected_table(table).set_index("region")
    assert result.loc["all", "iou_raw"] == pytest.approx(12 / (12 + 7 + 10))
    assert result.loc["all", "iou_corrected"] == pytest.approx(13 / (13 + 2 + 5))
    assert result.loc["b", "n_dropped"] == 1 and result.loc["a", "n_fixed"] == 1


def test_review_benchmark_scores_every_chip_with_cleanlab_included() -> None:
    from workbench.bench.review import bench_review

    result = bench_review(n_chips=60, block=20)
    assert result["scored_rows"] == result["n_chips"] == 60
    assert result["chips_per_s"] > 0 and result["peak_rss_mb"] > 0

"""The chip store: round trip, lazy per-chip reads, and refusals of bad chips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workbench.data.store import (
    BandSpec,
    Chip,
    StoreError,
    StoreWriter,
    open_store,
    positive_fraction,
    read_catalog,
    write_catalog,
)

BANDS = [BandSpec("B03", "S2L2A", True), BandSpec("B11", "S2L2A", True), BandSpec("VV", "S1GRD", False)]


def make_chip(i: int, size: int = 8, rng: np.random.Generator | None = None) -> Chip:
    rng = rng or np.random.default_rng(i)
    label = (rng.random((size, size)) > 0.7).astype(np.uint8)
    valid = np.ones((size, size), bool)
    valid[0, :2] = False
    return Chip(
        chip_id=f"chip-{i}",
        image=rng.normal(size=(3, size, size)).astype(np.float32),
        label=label,
        valid=valid,
        lat=43.0 + i * 0.01,
        lon=77.0,
        region="ile_alatau",
        year=2021 + i % 2,
        extra={"noisy": bool(i % 3 == 0)},
    )


def test_roundtrip_values_and_coordinates(tmp_path: Path) -> None:
    chips = [make_chip(i) for i in range(40)]
    with StoreWriter(tmp_path / "s", BANDS, source="unit", flush_every=16) as writer:
        for chip in chips:
            writer.append(chip)
    ds = open_store(tmp_path / "s")
    assert ds.sizes == {"chip": 40, "band": 3, "y": 8, "x": 8}
    assert list(ds["band"].values) == ["B03", "B11", "VV"]
    assert list(ds["modality"].values) == ["S2L2A", "S2L2A", "S1GRD"]
    for i in (0, 17, 39):
        expected = np.where(chips[i].valid[None], chips[i].image, 0)
        np.testing.assert_array_equal(ds["image"][i].values, expected)
        np.testing.assert_array_equal(ds["label"][i].values, chips[i].label)
        assert ds["region"].values[i] == "ile_alatau"
    catalog = read_catalog(tmp_path / "s")
    assert list(catalog["chip_id"]) == [c.chip_id for c in chips]
    hand = [c.label[c.valid].mean() for c in chips]
    np.testing.assert_allclose(catalog["positive_fraction"], hand)
    assert catalog["noisy"].sum() == sum(i % 3 == 0 for i in range(40))
    assert ds["image"].chunks[0][0] == 1  # one chunk per chip: a batch reads only its chips


def test_positive_fraction_ignores_invalid_and_ignore_index() -> None:
    label = np.array([[1, 0], [255, 1]], dtype=np.uint8)
    valid = np.array([[True, True], [True, False]])
    assert positive_fraction(label, valid) == pytest.approx(0.5)


def test_wrong_band_count_names_chip_and_bands(tmp_path: Path) -> None:
    chip = make_chip(0)
    chip.image = chip.image[:2]
    chip.extra["file"] = "image_7.h5"
    with pytest.raises(StoreError, match=r"image_7\.h5.*expected \(3, y, x\)"), StoreWriter(tmp_path / "s", BANDS) as w:
        w.append(chip)
    assert not (tmp_path / "s").exists()  # nothing half-written


def test_nan_inside_valid_and_all_nodata_are_refused(tmp_path: Path) -> None:
    chip = make_chip(0)
    chip.image[0, 3, 3] = np.nan
    with pytest.raises(StoreError, match="non-finite"), StoreWriter(tmp_path / "a", BANDS) as w:
        w.append(chip)
    chip = make_chip(1)
    chip.valid[:] = False
    with pytest.raises(StoreError, match="no valid pixel"), StoreWriter(tmp_path / "b", BANDS) as w:
        w.append(chip)


def test_shape_mismatch_and_duplicates(tmp_path: Path) -> None:
    chip = make_chip(0)
    chip.label = chip.label[:4]
    with pytest.raises(StoreError, match="label has shape"), StoreWriter(tmp_path / "a", BANDS) as w:
        w.append(chip)
    with pytest.raises(StoreError, match="duplicate"), StoreWriter(tmp_path / "b", BANDS) as w:
        w.append(make_chip(0))
        w.append(make_chip(0))


def test_empty_store_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no chips"), StoreWriter(tmp_path / "s", BANDS):
        pass
    assert not (tmp_path / "s").exists()


def test_existing_store_is_kept_unless_overwrite(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", BANDS) as w:
        w.append(make_chip(0))
    with pytest.raises(FileExistsError), StoreWriter(tmp_path / "s", BANDS) as w:
        w.append(make_chip(1))
    assert list(read_catalog(tmp_path / "s")["chip_id"]) == ["chip-0"]


def test_open_missing_store_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="workbench ingest"):
        open_store(tmp_path)


def test_write_catalog_keeps_order(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", BANDS) as w:
        for i in range(3):
            w.append(make_chip(i))
    catalog = read_catalog(tmp_path / "s")
    catalog["split"] = ["train", "val", "test"]
    write_catalog(tmp_path / "s", catalog)
    assert list(open_store(tmp_path / "s")["split"].values) == ["train", "val", "test"]
    with pytest.raises(StoreError, match="same order"):
        write_catalog(tmp_path / "s", catalog.iloc[::-1])


def test_open_store_without_dask_reads_selected_chips_through_the_chip_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workbench.data.store import ChipReader

    chips = [make_chip(i) for i in range(12)]
    with StoreWriter(tmp_path / "s", BANDS, source="unit", shard_chips=5) as writer:
        for chip in chips:
            writer.append(chip)
    eager = open_store(tmp_path / "s")
    fast = open_store(tmp_path / "s", dask=False)
    assert fast["image"].chunks is None and eager["image"].chunks is not None
    assert set(fast.coords) == set(eager.coords) and fast["image"].dtype == np.float32
    selections = [
        {"chip": [7, 2, 11]},
        {"chip": 4},
        {"chip": slice(3, 9, 2), "band": [2, 0]},
        {"chip": [1], "y": slice(2, 6), "x": 5},
    ]
    for selection in selections:
        for name in ("image", "label", "valid"):
            if name != "image" and "band" in selection:
                continue
            np.testing.assert_array_equal(fast[name].isel(selection).values, eager[name].isel(selection).values)
    np.testing.assert_array_equal(fast["image"].sel(band="VV").isel(chip=0).values, chips[0].image[2] * chips[0].valid)
    read: list[list[int]] = []
    original = ChipReader.read_batch

    def spy(self: ChipReader, indices: object, out: object = None) -> np.ndarray:
        read.append([int(i) for i in np.asarray(indices)])
        return original(self, indices, out)  # type: ignore[arg-type]

    monkeypatch.setattr(ChipReader, "read_batch", spy)
    labels = fast["label"].isel(chip=[10, 3]).values
    assert labels.shape == (2, 8, 8)
    assert read == [[3, 10]] or read == [[10, 3]]  # only the selected chips are read

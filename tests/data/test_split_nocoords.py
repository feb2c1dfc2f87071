"""Splits that need no coordinates, the audit of stores without them, ingest's split option, the CPU
fallback of GPU recipes and the one-chip remainder batch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_fakes

from workbench.cli import build_parser
from workbench.data.formats import FORMAT_NAMES
from workbench.data.ingest import FORMATS, ingest
from workbench.data.loading import merge_single_remainder
from workbench.data.split import SplitError, assign_splits, has_coordinates
from workbench.data.store import read_catalog
from workbench.params import SplitConfig, load_params

fakes = load_fakes()


def nowhere(n: int, **columns: object) -> pd.DataFrame:
    return pd.DataFrame({"chip_id": [f"c{i}" for i in range(n)], "lat": np.nan, "lon": np.nan, **columns})


def test_random_split_exact_shares_fixed_by_its_own_seed():
    catalog = nowhere(50)
    cfg = SplitConfig(method="random", train_percent=70, val_percent=20, seed=3)
    first = assign_splits(catalog, cfg, seed=1)
    assert first.value_counts().to_dict() == {"train": 35, "val": 10, "test": 5}
    assert (assign_splits(catalog, cfg, seed=99) == first).all()  # the training seed never moves a chip
    other = assign_splits(catalog, cfg.model_copy(update={"seed": 4}))
    assert not (other == first).all()


def test_source_split_keeps_each_scene_in_one_split():
    files = np.repeat([f"scene{k}.tif" for k in range(10)], 4)
    catalog = nowhere(40, file=files)
    splits = assign_splits(catalog, SplitConfig(method="source", train_percent=60, val_percent=20))
    per_scene = pd.DataFrame({"file": files, "split": splits}).groupby("file")["split"].nunique()
    assert (per_scene == 1).all()
    counts = splits.value_counts().to_dict()
    assert counts == {"train": 24, "val": 8, "test": 8}
    with pytest.raises(SplitError, match="group_column"):
        assign_splits(catalog, SplitConfig(method="source", group_column="scene"))


def test_row_bands_of_one_scene_are_disjoint_with_a_buffer():
    rows = np.repeat(np.arange(0, 416, 32), 3)  # one scene 416 rows high, 32 px chips, 3 per chip row
    catalog = nowhere(len(rows), file="scene.npz", row=rows)
    cfg = SplitConfig(method="rows", train_percent=50, val_percent=25, buffer_px=32)
    splits = assign_splits(catalog, cfg, chip_size=32).to_numpy()
    band = {name: sorted(set(rows[splits == name])) for name in ("train", "val", "test", "buffer")}
    # boundaries at rows 208 and 312; every chip keeps half the buffer (16 px) from a boundary
    assert band == {
        "train": [0, 32, 64, 96, 128, 160],
        "val": [224, 256],
        "test": [352, 384],
        "buffer": [192, 288, 320],
    }
    assert min(band["val"]) - (max(band["train"]) + 32) >= cfg.buffer_px  # no pixel row shared, a 32+ px gap
    with pytest.raises(SplitError, match="chip size"):
        assign_splits(catalog, SplitConfig(method="rows"))


def test_catalog_split_fills_a_missing_val_split_from_train():
    catalog = nowhere(20, split=["train"] * 16 + ["test"] * 4)
    splits = assign_splits(catalog, SplitConfig(method="catalog", train_percent=80, val_percent=10))
    assert splits.value_counts().to_dict() == {"train": 14, "val": 2, "test": 4}  # 10/90 of 16 ≈ 2
    assert (splits[16:] == "test").all()


def test_coordinate_splits_refuse_a_store_without_coordinates_and_name_the_alternatives():
    catalog = nowhere(10, region="r")
    assert not has_coordinates(catalog)
    with pytest.raises(SplitError, match="random"):
        assign_splits(catalog, SplitConfig(method="block"))


def test_ingest_writes_a_split_and_help_lists_every_format(tmp_path, capsys):
    assert set(FORMAT_NAMES) == set(FORMATS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "--help"])
    helptext = capsys.readouterr().out
    for name in FORMATS:
        assert name in helptext
    fakes.make_npz(tmp_path / "raw", size=128)
    ingest(
        "ukis-csmask",
        tmp_path / "raw",
        tmp_path / "store",
        chip_size=32,
        progress=False,
        split="rows",
        split_options={"train_percent": 50, "val_percent": 25, "buffer_px": 0},
    )
    catalog = read_catalog(tmp_path / "store")
    assert catalog.groupby("split")["row"].agg(["min", "max"]).to_dict() == {
        "min": {"test": 96, "train": 0, "val": 64},
        "max": {"test": 96, "train": 32, "val": 64},
    }
    with pytest.raises(ValueError, match="split"):
        ingest("ukis-csmask", tmp_path / "raw", tmp_path / "other", progress=False, split="nonsense")


def test_one_chip_remainder_is_merged_not_dropped():
    batches = [list(range(i, min(i + 8, 17))) for i in range(0, 17, 8)]
    merged = list(merge_single_remainder(iter(batches)))
    assert [len(b) for b in merged] == [8, 9] and sorted(i for b in merged for i in b) == list(range(17))
    assert [len(b) for b in merge_single_remainder(iter([[0, 1], [2, 3]]))] == [2, 2]


def test_gpu_recipe_on_a_cpu_machine_falls_back_with_a_warning(monkeypatch):
    import torch

    from workbench.train.fit import CpuFallbackWarning, resolve_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    params = load_params(Path(__file__).parents[2] / "params" / "landslide4sense.yaml")
    with pytest.warns(CpuFallbackWarning, match="no such device"):
        resolved = resolve_hardware(params)
    assert (resolved.train.accelerator, resolved.train.precision, resolved.train.devices) == ("cpu", "32-true", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu = load_params(Path(__file__).parents[2] / "params" / "demo.yaml")
        assert resolve_hardware(cpu) is cpu

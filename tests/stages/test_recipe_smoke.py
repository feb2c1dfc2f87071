"""Every recipe runs all four notebooks with the smoke profile through `workbench run`, on small data
written in that data set's real layout (tests/fakes.py) and ingested as a user would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import load_fakes

from workbench.cli import main
from workbench.data.ingest import ingest
from workbench.data.store import read_catalog
from workbench.run import NOTEBOOKS

fakes = load_fakes()
PARAMS = Path(__file__).resolve().parents[2] / "params"


def landslide4sense(raw: Path, store: Path) -> list[str]:
    fakes.make_landslide4sense(raw, n=16, extra_masks=0, size=32)  # TrainData only: val and test are carved
    ingest("landslide4sense", raw, store, progress=False)
    return []


def cloud38(raw: Path, store: Path) -> list[str]:
    fakes.make_cloud38(raw, splits=("train",), n=16, size=32)  # 38-Cloud has no val split and no coordinates
    ingest("cloud38", raw, store, progress=False)
    return []


def thaw_slumps(raw: Path, store: Path) -> list[str]:
    grid = fakes.make_geotiff(raw / "img", height=128, width=96, bands=3)
    squares = [  # three annotators; the consensus (2 of 3 votes) has a slump in each row band
        [(10, 20, 12), (70, 40, 10), (100, 10, 12)],
        [(11, 21, 12), (70, 40, 9), (101, 10, 12)],
        [(10, 20, 11), (100, 11, 11)],
    ]
    labels = fakes.make_vector_labels(raw / "labels", grid, squares)
    ingest(
        "vector",
        raw / "img" / "image.tif",
        store,
        chip_size=32,
        stride=32,
        labels=[str(p) for p in labels],
        band_names=["red", "green", "blue"],
        optical=True,
        progress=False,
        split="rows",  # one small scene: row bands with a buffer instead of 0.15-degree blocks
        split_options={"train_percent": 50, "val_percent": 25, "buffer_px": 0},
    )
    return ["data.split.method=catalog"]


def impactmesh_flood(raw: Path, store: Path) -> list[str]:
    written = fakes.make_impactmesh(raw, size=128)
    ingest(
        "geotiff",
        raw,
        store,
        chip_size=64,
        stride=32,
        images=[p.name for p in written["files"]],
        label="label.tif",
        band_names=written["bands"],
        progress=False,
        split="random",
        split_options={"train_percent": 60, "val_percent": 20},
    )
    return []


def cryosentinel(raw: Path, store: Path) -> list[str]:
    fakes.make_cryosentinel(raw, regions=("zhetysu", "ile", "tien_shan"), rows_per_shard=3, size=64)
    ingest("cryosentinel", raw, store, progress=False)
    return ["data.split.method=catalog"]  # the released split: a few fake chips fill no 0.15-degree blocks


def demo(raw: Path, store: Path) -> list[str]:
    return []


RECIPES: dict[str, Callable[[Path, Path], list[str]]] = {
    "demo": demo,
    "landslide4sense": landslide4sense,
    "cloud38": cloud38,
    "thaw_slumps": thaw_slumps,
    "impactmesh_flood": impactmesh_flood,
    "cryosentinel": cryosentinel,
}


# parameter files whose smoke run lives in a test of its own
SMOKE_ELSEWHERE = {
    "demo_multiclass": "tests/stages/test_multiclass_demo.py",
    "ukis_csmask_multiclass": "tests/stages/test_ukis_multiclass.py",
}


def test_every_parameter_file_has_a_smoke_run():
    # the real samples (samples_*) run on ../shared/data: tests/pipeline/test_sample_runs.py
    stems = {path.stem for path in PARAMS.glob("*.yaml") if not path.stem.startswith(("real_", "samples_"))}
    assert stems <= set(RECIPES) | set(SMOKE_ELSEWHERE)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_smoke_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    extra = RECIPES[name](tmp_path / "raw", store)
    reports = tmp_path / "reports"
    code = main(
        ["run", str(PARAMS / f"{name}.yaml"), "--smoke", "--quiet", "--reports", str(reports),
         "--set", f"data.store={store}", *[arg for item in extra for arg in ("--set", item)]]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    run_dir = next((reports / name).iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and list(run["notebooks"]) == NOTEBOOKS
    frozen = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert frozen["profile"] == "smoke" and frozen["train"]["accelerator"] == "cpu"
    assert frozen["train"]["max_epochs"] == (2 if frozen["train"]["optimizer"]["freeze_backbone_epochs"] else 1)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test.iou"] <= 1.0 or np.isnan(metrics["test.iou"])
    assert metrics["calibration.temperature"] > 0
    assert metrics["data.has_coordinates"] == (name not in {"cloud38", "landslide4sense"})
    if name != "demo":
        catalog = read_catalog(store)
        assert metrics["data.n_chips"] == len(catalog)
    assert (run_dir / "model" / "model.pt").is_file()
    final = json.loads((run_dir / "model" / "run_info.json").read_text())["final_weights"]
    candidates = {row["candidate"] for row in final["candidates"]}
    if name == "cryosentinel":  # EMA + SWA + soup: none of them is discarded before the choice
        assert candidates == {"best", "swa", "ema", "soup"}
    assert final["weights"] in candidates

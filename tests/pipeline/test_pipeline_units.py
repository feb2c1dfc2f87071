"""Pipeline pieces that need no kernel: metric merging, the runs index, multi-seed summaries, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench import pipeline, run
from workbench.cli import main
from workbench.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]


def fake_run(reports: Path, experiment: str, run_id: str, status: str, metrics: dict[str, float]) -> Path:
    run_dir = reports / experiment / run_id
    write_json_atomic(
        run_dir / "run.json",
        {"experiment": experiment, "run_id": run_id, "status": status, "started": run_id, "params_file": "p.yaml"},
    )
    write_json_atomic(run_dir / "metrics.json", metrics)
    (run_dir / "02_train.html").write_text("<html></html>")
    return run_dir


def test_merge_metrics_later_stages_win(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "metrics" / "audit_data.json", {"a": 1, "shared": 1})
    write_json_atomic(tmp_path / "metrics" / "review.json", {"b": 2, "shared": 4})
    assert pipeline.merge_metrics(tmp_path) == {"a": 1, "shared": 4, "b": 2}


def test_index_lists_runs_newest_first_with_status_and_links(tmp_path: Path) -> None:
    fake_run(tmp_path, "demo", "20260101-000000", "complete", {"test.iou": 0.91234, "wall_seconds": 120.0})
    fake_run(tmp_path, "demo", "20260102-000000", "failed", {"wall_seconds": 3.0})
    page = pipeline.write_index(tmp_path).read_text()
    assert page.index("20260102-000000") < page.index("20260101-000000")
    assert '<span class="failed">failed</span>' in page and '<span class="complete">complete</span>' in page
    assert "0.9123" in page
    assert 'href="demo/20260101-000000/02_train.html"' in page


def test_run_seeds_writes_mean_and_std_and_keeps_every_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def fake_pipeline(params_file, overrides, reports, run_id=None, **options):  # type: ignore[no-untyped-def]
        calls.append({"overrides": list(overrides), "run_id": run_id, **options})
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
        return pipeline.RunResult(tmp_path / str(seed), {"test.iou": 0.8 + seed / 1000, "status_text": "x"}, "complete")

    monkeypatch.setattr(pipeline, "run_pipeline", fake_pipeline)
    results, table_path = pipeline.run_seeds(
        ROOT / "params" / "demo.yaml",
        [42, 43, 44],
        ["train.max_epochs=1"],
        tmp_path,
        notebooks=["01_data_audit", "02_train"],
        cell_timeout=600,
        run_id="job7",
    )
    assert [c["overrides"][-1] for c in calls] == ["seed=42", "seed=43", "seed=44"]
    assert all("train.max_epochs=1" in c["overrides"] for c in calls)  # type: ignore[operator]
    assert all(c["notebooks"] == ["01_data_audit", "02_train"] and c["cell_timeout"] == 600 for c in calls)
    assert [c["run_id"] for c in calls] == ["job7-s42", "job7-s43", "job7-s44"]
    table = pd.read_csv(table_path, index_col=0)
    values = np.array([0.842, 0.843, 0.844])
    assert table.loc["test.iou", "mean"] == pytest.approx(values.mean())
    assert table.loc["test.iou", "std"] == pytest.approx(values.std(ddof=1))
    assert len(results) == 3


def test_select_notebooks_by_name_prefix_and_start() -> None:
    assert pipeline.select_notebooks(None, "03") == ["03_calibrate", "04_label_noise_review"]
    assert pipeline.select_notebooks(["02", "01_data_audit"]) == ["01_data_audit", "02_train"]
    assert pipeline.select_notebooks(["01", "02", "04"], "02_train") == ["02_train", "04_label_noise_review"]
    with pytest.raises(ValueError, match=r"unknown notebook '\.\./\.\./x'"):
        pipeline.select_notebooks(["../../x"])


def test_run_id_comes_from_the_launcher_so_every_rank_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "SLURM_NTASKS", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert run.launcher_run_id({"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "0"}) == "slurm-812.0"
    assert run.launcher_run_id({"TORCHELASTIC_RUN_ID": "abc"}) == "torchrun-abc"
    assert run.launcher_run_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    assert run.launcher_rank({"RANK": "3", "SLURM_PROCID": "1"}) == 3
    assert run.launcher_rank({"SLURM_PROCID": "1"}) == 1 and run.launcher_rank({}) == 0
    assert pipeline.resolve_run_id("given") == "given"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--run-id"):
        pipeline.resolve_run_id()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r9")
    assert pipeline.resolve_run_id() == "torchrun-r9"
    with pytest.raises(ValueError, match="plain folder name"):
        pipeline.resolve_run_id("../x")


def test_cli_params_prints_resolved_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", str(ROOT / "params" / "demo.yaml"), "--set", "train.max_epochs=3"]) == 0
    assert "max_epochs: 3" in capsys.readouterr().out


def test_cli_reports_bad_parameters_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", str(ROOT / "params" / "demo.yaml"), "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "train.nope" in err and "max_epochs" in err


def test_new_run_ids_are_unique_and_sortable() -> None:
    ids = [run.new_run_id() for _ in range(5)]
    assert len(set(ids)) == 5 and ids == sorted(ids)


def test_run_json_records_commit_and_versions() -> None:
    versions = run.package_versions()
    assert versions["torch"].startswith("2.1") and "python" in versions
    assert run.git_commit(ROOT) is None or len(run.git_commit(ROOT) or "") == 40


def test_index_survives_runs_without_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "x" / "r1"
    write_json_atomic(run_dir / "run.json", {"experiment": "x", "run_id": "r1", "status": "running"})
    assert "r1" in pipeline.write_index(tmp_path).read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"


def test_cli_ingest_writes_a_store_and_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fakes", ROOT / "tests" / "fakes.py")
    assert spec is not None and spec.loader is not None
    fakes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fakes)
    fakes.make_npz(tmp_path / "src")
    code = main(["ingest", "npz", str(tmp_path / "src"), str(tmp_path / "store"), "--chip-size", "32"])
    assert code == 0
    assert "4 chips from npz" in capsys.readouterr().out  # a 64 px array tiles into four 32 px chips
    from workbench.data.store import read_catalog

    assert len(read_catalog(tmp_path / "store")) == 4


def test_cli_ingest_unknown_format_lists_the_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", "tiffs", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "landslide4sense" in capsys.readouterr().err

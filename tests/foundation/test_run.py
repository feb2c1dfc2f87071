"""The run directory: its file names, and the parameters frozen into it that every notebook and stage reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from workbench import notebook
from workbench.io import read_json
from workbench.notebook import open_run
from workbench.params import ParamsError, load_params
from workbench.run import NOTEBOOKS, STAGES, RunLayout, new_run_id

REPO = Path(__file__).resolve().parents[2]


def test_layout_names_the_files_of_a_run(tmp_path: Path) -> None:
    layout = RunLayout.at(tmp_path, "demo", "r1")
    assert layout.root == tmp_path / "demo" / "r1"
    assert layout.params == layout.root / "params.yaml" and layout.info == layout.root / "run.json"
    assert layout.stage_metrics(STAGES[1]) == layout.root / "metrics" / "train.json"
    assert layout.calibration == layout.root / "model" / "calibration.json"
    assert layout.last_checkpoint == layout.root / "checkpoints" / "last.ckpt"
    assert layout.training_log == layout.root / "logs" / "metrics.csv"
    assert layout.predictions("val") == layout.root / "predictions" / "val.zarr"
    assert layout.fold(2).predictions("heldout") == layout.root / "folds" / "fold-2" / "predictions" / "heldout.zarr"
    assert sorted(NOTEBOOKS) == NOTEBOOKS and [s.notebook for s in STAGES] == NOTEBOOKS
    assert sorted(path.stem for path in (REPO / "notebooks").glob("*.py")) == NOTEBOOKS
    assert not layout.root.exists()


def source_file(tmp_path: Path, **changes: object) -> Path:
    """A copy of params/demo.yaml with top-level sections updated."""
    tree = yaml.safe_load((REPO / "params" / "demo.yaml").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    path = tmp_path / "source.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def tiny_overrides(tmp_path: Path) -> list[str]:
    return [
        f"data.store={tmp_path / 'store'}",
        "data.synthetic.n_chips=48",
        "data.synthetic.chip_size=32",
        "data.batch_size=8",
        "train.progress_bar=false",
    ]


def test_open_run_reads_the_frozen_params_after_the_source_file_changes(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path)
    source = source_file(tmp_path)
    layout = RunLayout.at(tmp_path / "reports", "demo", new_run_id())
    layout.freeze_params(load_params(source, overrides))  # what `workbench run` does before the first notebook
    frozen_text = layout.params.read_text()
    source_file(tmp_path, seed=7, train__max_epochs=3, data__normalize={"method": "percentile"})

    params, path = open_run(str(source), overrides, str(layout.root))
    assert path == layout.root
    assert params.seed == 42 and params.train.max_epochs == 20 and params.data.normalize.method == "zscore"
    assert params.data.batch_size == 8  # the overrides the run was created with are part of the frozen copy
    assert layout.params.read_text() == frozen_text
    # a different parameter file changes nothing either
    other = tmp_path / "other.yaml"
    other.write_text("experiment: other\n")
    assert open_run(str(other), [], str(layout.root))[0] == params


def test_open_run_refuses_overrides_that_change_the_frozen_params(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path)
    source = source_file(tmp_path)
    layout = RunLayout(tmp_path / "run")
    layout.freeze_params(load_params(source, overrides))
    with pytest.raises(ParamsError, match=r"would change train\.max_epochs"):
        open_run(str(source), [*overrides, "train.max_epochs=3"], str(layout.root))
    assert open_run(str(source), [*overrides, "train.max_epochs=20"], str(layout.root))[0].train.max_epochs == 20


def test_open_run_freezes_a_new_run_directory(tmp_path: Path) -> None:
    source = source_file(tmp_path)
    (tmp_path / "fresh").mkdir()
    params, path = open_run(str(source), ["seed=5"], str(tmp_path / "fresh"))
    assert path == tmp_path / "fresh" and load_params(path / "params.yaml") == params and params.seed == 5


def test_interactive_notebooks_share_the_frozen_params_and_warn_when_the_file_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notebook, "project_root", lambda: tmp_path)
    monkeypatch.chdir(tmp_path)
    source = source_file(tmp_path)
    params, path = open_run("source.yaml", [], "")
    assert path == tmp_path / "reports" / "demo" / "interactive"
    assert load_params(path / "params.yaml") == params
    source_file(tmp_path, seed=7)
    with pytest.warns(UserWarning, match="seed"):
        again, _ = open_run(str(source), [], "")
    assert again.seed == 42


def test_stages_refuse_params_that_differ_from_the_frozen_ones(tmp_path: Path) -> None:
    from workbench.stages import run_calibration, run_data_audit, run_review, run_training

    source = source_file(tmp_path)
    layout = RunLayout(tmp_path / "run")
    layout.freeze_params(load_params(source))
    edited = load_params(source_file(tmp_path, seed=7))
    for stage in (run_data_audit, run_training, run_calibration, run_review):
        with pytest.raises(ParamsError, match=r"differ from those frozen .* in seed"):
            stage(edited, layout.root)


@pytest.mark.slow
def test_data_audit_stage_uses_the_frozen_params_when_the_source_file_changed(tmp_path: Path) -> None:
    from workbench.stages import run_data_audit

    overrides = tiny_overrides(tmp_path)
    source = source_file(tmp_path)
    layout = RunLayout(tmp_path / "run")
    layout.freeze_params(load_params(source, overrides))
    source_file(tmp_path, data__batch_size=2, data__normalize={"method": "percentile"})

    params, path = open_run(str(source), overrides, str(layout.root))
    result = run_data_audit(params, path, check_batches=2, progress=False)
    assert read_json(layout.normalization_stats)["method"] == "zscore"
    assert result.tables["check_data"]["n_samples"].max() == 8

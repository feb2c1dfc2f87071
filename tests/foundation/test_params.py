"""Parameter files: every shipped file validates; unknown keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.params import Params, ParamsError, apply_overrides, load_params

PARAMS_DIR = Path(__file__).resolve().parents[2] / "params"


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_file_validates(path: Path) -> None:
    params = load_params(path)
    assert isinstance(params, Params)
    assert params.experiment == path.stem or params.experiment


def test_override_sets_nested_value_with_yaml_types() -> None:
    params = load_params(PARAMS_DIR / "demo.yaml", ["train.max_epochs=3", "data.augment.hflip=0.25", "seed=7"])
    assert params.train.max_epochs == 3
    assert params.data.augment.hflip == 0.25
    assert params.seed == 7


def test_override_of_list_value() -> None:
    params = load_params(PARAMS_DIR / "demo.yaml", ["evaluate.prevalences=[10, 20]"])
    assert params.evaluate.prevalences == [10, 20]


def test_unknown_key_names_file_key_and_allowed(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("experiment: x\ntrain:\n  max_epoch: 3\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message
    assert "train.max_epoch" in message
    assert "max_epochs" in message  # the close match and the allowed list


def test_bad_literal_lists_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("experiment: x\ntrain:\n  precision: float8\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "train.precision" in str(info.value)
    assert "bf16-mixed" in str(info.value)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(path)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("experiment: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_apply_overrides_refuses_value_as_section() -> None:
    with pytest.raises(ParamsError, match="is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
    with pytest.raises(ParamsError, match=r"section\.key=value"):
        apply_overrides({}, ["novalue"])


def test_split_percentages_cannot_exceed_100() -> None:
    with pytest.raises(ParamsError, match="must not exceed 100"):
        load_params(PARAMS_DIR / "demo.yaml", ["data.split.train_percent=95", "data.split.val_percent=10"])

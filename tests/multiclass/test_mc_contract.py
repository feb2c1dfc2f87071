"""Multiclass parameters, the softmax primitive and the chip-prediction layout."""

import numpy as np
import pytest
import torch

from workbench.arrays import softmax
from workbench.infer.chips import load_predictions, save_predictions
from workbench.params import ClassSpec, ParamsError, load_params, resolve_classes


def test_softmax_matches_torch_and_survives_large_logits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 3, 5)) * 10
    np.testing.assert_allclose(softmax(x), torch.softmax(torch.from_numpy(x), dim=1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(softmax(x[0], axis=0), torch.softmax(torch.from_numpy(x[0]), dim=0).numpy())
    big = softmax(np.array([[1000.0, 0.0, -1000.0]]), axis=1)
    np.testing.assert_allclose(big, [[1.0, 0.0, 0.0]])
    assert softmax(x, dtype=np.float32).dtype == np.float32


def test_resolve_classes_defaults_and_given():
    binary = load_params(None, ["experiment=x"])
    assert [c.name for c in resolve_classes(binary.model)] == ["background", "foreground"]
    assert [t.name for t in binary.train.loss] == ["bce", "dice"]  # binary default unchanged
    three = load_params(None, ["experiment=x", "model.num_classes=3"])
    specs = resolve_classes(three.model)
    assert [c.name for c in specs] == ["class_0", "class_1", "class_2"] and specs[0].color == "#000000"
    assert len({c.color for c in specs}) == 3
    assert [t.name for t in three.train.loss] == ["ce", "dice"]  # softmax default loss
    named = load_params(
        None,
        [
            "experiment=x",
            "model.num_classes=2",
            'model.classes=[{name: clear, color: "#AABBCC"}, {name: cloud, color: "#ffffff"}]',
        ],
    )
    assert resolve_classes(named.model) == [
        ClassSpec(name="clear", color="#aabbcc"),
        ClassSpec(name="cloud", color="#ffffff"),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['model.classes=[{name: a, color: "#000000"}]', "model.num_classes=3"], "needs exactly 3"),
        (['model.classes=[{name: a, color: "#000000"}]'], "needs exactly 2"),
        (['model.classes=[{name: a, color: "red"}, {name: b, color: "#000000"}]'], "color"),
        (["model.num_classes=3", "train.loss=[{name: ce, class_weights: [1, 2]}]"], "3 classes"),
        (["model.num_classes=3", "train.loss=[{name: bce}]"], "binary"),
        (["train.loss=[{name: ce}]"], "num_classes >= 2"),
        (["model.num_classes=3", "calibrate.class_of_interest=snow"], "class_0"),
    ],
)
def test_bad_multiclass_parameters_name_the_file_and_the_fix(tmp_path, overrides, message):
    path = tmp_path / "p.yaml"
    path.write_text("experiment: x\n")
    with pytest.raises(ParamsError, match=message) as info:
        load_params(path, overrides)
    assert str(path) in str(info.value)


def test_predictions_layout_binary_and_multiclass(tmp_path):
    binary = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4) / 10
    save_predictions(tmp_path, "val", np.array([3, 7]), binary)
    ds = load_predictions(tmp_path, "val")
    assert ds["logit"].dims == ("chip", "y", "x") and "num_classes" not in ds.attrs
    multi = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)
    save_predictions(tmp_path, "test", np.array([1, 2]), multi)
    ds = load_predictions(tmp_path, "test")
    assert ds["logit"].dims == ("chip", "class", "y", "x") and ds.attrs["num_classes"] == 3
    np.testing.assert_allclose(ds["logit"].values, multi.astype(np.float16))
    assert ds["chip_index"].values.tolist() == [1, 2]

"""The per-class metrics table the notebooks show for softmax models."""

from __future__ import annotations

import math

from workbench.params import Params
from workbench.stages.classes import class_table, per_class_metrics


def test_per_class_table_reads_flat_metrics_and_marks_absent_classes() -> None:
    params = Params.model_validate(
        {
            "experiment": "t",
            "model": {
                "num_classes": 3,
                "classes": [
                    {"name": "clear", "color": "#2ca02c"},
                    {"name": "cloud", "color": "#BFE6FF"},
                    {"name": "shadow", "color": "#3b3b98"},
                ],
            },
        }
    )
    metrics = {
        "test.iou.clear": 0.9,
        "test.f1.clear": 0.95,
        "test.precision.clear": 0.93,
        "test.recall.clear": 0.97,
        "test.iou.cloud": 0.5,
        "test.iou.shadow": math.nan,
        "test.absent_classes": "shadow",
        "test.miou": 0.7,
        "test.miou_no_background": 0.5,
        "test.overall_accuracy": 0.92,
    }
    table = per_class_metrics(metrics, params, "test").reset_index(drop=True)
    assert table["class"].tolist() == ["clear", "cloud", "shadow", "miou", "miou_no_background", "overall_accuracy"]
    assert table.loc[0, "f1"] == 0.95 and table.loc[1, "iou"] == 0.5 and math.isnan(table.loc[1, "f1"])
    assert table["absent"].tolist()[:3] == [False, False, True]
    assert table.loc[3:, "iou"].tolist() == [0.7, 0.5, 0.92]
    assert class_table(params)["color"].tolist() == ["#2ca02c", "#bfe6ff", "#3b3b98"]

"""The four stages of a run, each reading its inputs from and writing its outputs to the run directory.

Notebooks call these functions and show what they return; `workbench run` executes the
notebooks in order. Stages never share Python state: everything they hand over is a file under
`<run_dir>` (data/, model/, predictions/, diagnostics/, metrics/, figures/).
"""

from workbench.stages.audit import run_data_audit
from workbench.stages.base import StageResult, save_stage_figure, write_stage_metrics
from workbench.stages.calibration import run_calibration
from workbench.stages.review import run_review
from workbench.stages.training import evaluate_split, prediction_splits, run_training

__all__ = [
    "StageResult",
    "evaluate_split",
    "prediction_splits",
    "run_calibration",
    "run_data_audit",
    "run_review",
    "run_training",
    "save_stage_figure",
    "write_stage_metrics",
]

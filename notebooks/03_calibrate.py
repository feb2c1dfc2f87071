# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Calibrate
#
# Segmentation networks trained with focal or Dice terms are rarely calibrated. A single
# temperature T is fitted on the calibration split (spatially disjoint from train and test) by
# minimising the negative log-likelihood of sigmoid(logit / T); the operating threshold is chosen
# afterwards on the calibrated probabilities and saved with the model as `calibration.json`.

# %% tags=["parameters"]
params_file = "../params/demo.yaml"
overrides: list[str] = []
run_dir = ""

# %%
from IPython.display import display

from workbench.notebook import open_run, show_figures, show_metrics
from workbench.stages import run_calibration

params, run_path = open_run(params_file, overrides, run_dir)
calibration = run_calibration(params, run_path)
show_metrics(calibration.metrics)

# %%
show_figures(calibration.figures)
display(calibration.tables["threshold_sweep"])

# %%
display(calibration.tables["per_region"])
display(calibration.tables["worst_chips"])

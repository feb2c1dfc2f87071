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
# # 02 · Train
#
# Train the segmentation model chosen in the parameters with a Lightning task. The model card
# below lists every optimiser group with its effective learning rate: an encoder learning rate
# thousands of times below the decoder's silently freezes the backbone, so check it before a
# long run. After training, every needed split is predicted once and stored under
# `predictions/`; calibration and review read those files.

# %% tags=["parameters"]
params_file = "../params/demo.yaml"
overrides: list[str] = []
run_dir = ""

# %%
from IPython.display import display

from workbench.notebook import open_run, show_figures, show_metrics
from workbench.stages import run_training

params, run_path = open_run(params_file, overrides, run_dir)
print(params.model.model_dump_json(indent=2))

# %%
training = run_training(params, run_path)
display(training.tables["param_groups"])

# %% [markdown]
# ## Curves and scores
# Pooled IoU over valid pixels at threshold 0.5 on the validation and test splits.

# %%
show_figures(training.figures)
show_metrics({k: v for k, v in training.metrics.items() if k.startswith(("val.", "test.", "train."))})

# %%
display(training.tables["per_chip_test"].sort_values("iou").head(10))

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
# # 01 · Data audit
#
# Before any GPU hour is spent, look at the chips: where they are, how the splits fall on the map,
# how much of each split is positive, and whether the labels agree with an independent physical
# signal (the water index MNDWI = (B03 − B11) / (B03 + B11)). This stage also assigns the spatial
# split and computes the normalisation statistics on the train split; later stages read both from
# the run directory.

# %% tags=["parameters"]
params_file = "../params/demo.yaml"
overrides: list[str] = []
run_dir = ""

# %%
from IPython.display import display

from workbench.notebook import open_run, show_figures, show_metrics
from workbench.stages import run_data_audit

params, run_path = open_run(params_file, overrides, run_dir)
audit = run_data_audit(params, run_path)
show_metrics(audit.metrics)

# %% [markdown]
# ## Splits
# Chips are assigned to train / val / test by hashing 0.15° blocks; chips near a block edge fall in
# a buffer and are left out, so no lake is shared between splits. The leakage table gives the
# smallest distance between chips of two different splits.

# %%
display(audit.tables["split_summary"])
display(audit.tables["leakage"])

# %%
display(audit.tables["region_summary"])
show_figures(audit.figures)

# %% [markdown]
# # 04 · Label-noise review
#
# Where the model, the water index and the label disagree, the label is often the one that is
# wrong (a lake omitted, undersized or misplaced). Each chip gets a suspicion score from
# model-label disagreement and index-label disagreement where model and index agree; the
# top-ranked chips are drawn as four panels: S2 RGB | MNDWI | label | prediction.
#
# A model partly memorises the labels it trained on, corrupted ones included, so it scores its own
# training chips too kindly. With `review.out_of_fold: true` the training stage also trains one model
# per spatial fold of the train split (`data.split.n_folds`) and each train chip is scored by the
# model that never saw it; the metric `review.out_of_fold` says which predictions were used.

# %% tags=["parameters"]
params_file = "../params/demo.yaml"
overrides: list[str] = []
run_dir = ""

# %%
from IPython.display import display

from workbench.notebook import open_run, show_figures, show_metrics
from workbench.stages import run_review

params, run_path = open_run(params_file, overrides, run_dir)
review = run_review(params, run_path)
show_metrics(review.metrics)

# %%
display(review.tables["ranking"])
display(review.tables["prefilter"])

# %% [markdown]
# ## Most suspicious chips

# %%
show_figures(review.figures)

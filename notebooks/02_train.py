# %% [markdown]
# # 02 · Train
#
# Train the segmentation model chosen in the parameters with a Lightning task, then predict every
# needed split once (stored under `predictions/`; calibration and review read those files).
#
# The run is reproducible (seeds for Python, NumPy, torch and hashing; `train.deterministic`) and
# resumable: `checkpoints/last.ckpt` is rewritten at every epoch end and every
# `train.checkpoint_every_n_steps` steps, and re-running this notebook on the same run directory
# continues from it exactly where it stopped. `model/run_info.json` records the parameters,
# git commit and package versions the model came from.

# %% tags=["parameters"]
params_file = "../params/demo.yaml"
overrides: list[str] = []
run_dir = ""

# %%
from IPython.display import Markdown, display

from workbench.notebook import open_run, show_figures, show_metrics
from workbench.stages import run_training

params, run_path = open_run(params_file, overrides, run_dir)
print(params.model.model_dump_json(indent=2))

# %%
training = run_training(params, run_path)

# %% [markdown]
# ## Data and sampler
# Chips per split and how many of them hold the target (a chip is positive when its labelled
# foreground fraction reaches `data.sampler.positive_threshold`). The sampler table shows what one
# training epoch draws: for a curriculum, one row per stage, with the negatives drawn per positive.

# %%
display(training.tables["split_summary"])
display(training.tables["sampler_composition"])

# %% [markdown]
# ## Model card
# Parameters per part of the network, and every optimiser group with its effective learning rate.
# An encoder learning rate thousands of times below the decoder's silently freezes the backbone,
# so any such group is flagged below.

# %%
display(training.tables["model_parts"])
display(training.tables["param_groups"])

# %% [markdown]
# ## Warnings
# Tiny learning rates, and the overfitting signs of the training curves: train loss falling while
# validation loss rises over the last epochs, or train IoU above 0.9 with validation IoU below 0.5.

# %%
warnings = training.tables["warnings"]
if warnings.empty:
    display(Markdown("No warnings: learning rates and train/validation curves look consistent."))
else:
    display(Markdown("\n".join(f"- ⚠️ **{row.kind}**: {row.warning}" for row in warnings.itertuples())))

# %% [markdown]
# ## Curves and scores
# Loss and IoU per epoch, then the pooled scores over valid pixels at threshold 0.5 on the
# validation and test splits. During training, validation also logs PR-AUC at realistic chip
# prevalences (`val/pr_auc_200` ...), which early stopping can monitor.

# %%
show_figures({"training_curves": training.figures["training_curves"]})
show_metrics({k: v for k, v in training.metrics.items() if k.startswith(("val.", "test.", "train."))})

# %% [markdown]
# ### Per class (softmax models)
# For a model with several classes: IoU, F1, precision and recall of each class on the validation
# split, decided by the argmax of the uncalibrated probabilities (notebook 03 scores the calibrated
# ones), and the confusion matrix (rows: label class, columns: predicted class). A class absent from
# both label and prediction is NaN and marked `absent`, not scored 0 or 1.

# %%
from workbench.stages.classes import confusion_figures, is_multiclass, per_class_metrics

if is_multiclass(params):
    display(per_class_metrics(training.metrics, params, "val").round(3))
    confusion_figures(params, run_path, training, splits=("val",))
    show_figures({"confusion_val": training.figures["confusion_val"]})

# %% [markdown]
# ## Final weights
# The candidates for the saved model (the best checkpoint, the last weights or the SWA average, the
# EMA averages, the model soup: whichever the run has) scored on the validation split by the
# checkpoint metric; `train.final_weights` picks one (default `best_val`: the best score). The bundle's
# `run_info.json` records which weights it holds.

# %%
if "final_weights" in training.tables:
    display(training.tables["final_weights"])

# %% [markdown]
# ## Predictions on validation chips
# RGB, label and predicted probability (cyan contour at the decision threshold) for validation
# chips from the worst to the best IoU, followed by chips without a label where the model predicts
# the most (false alarms).

# %%
if "val_predictions" in training.figures:
    show_figures({"val_predictions": training.figures["val_predictions"]})

# %% [markdown]
# The test chips with the lowest IoU (pixel accuracy for softmax models):

# %%
per_chip_test = training.tables["per_chip_test"]
display(per_chip_test.sort_values("iou" if "iou" in per_chip_test else "accuracy").head(10))

# %% [markdown]
# ### Raw against label-corrected metrics
# When the store's review ledger is applied (`review.decisions`), validation and test are scored twice at
# the fixed threshold: against the store's labels (raw) and with the reviewers' decisions (dropped chips
# left out, fixed chips on their corrected label), per split and region (`diagnostics/label_corrected.csv`).

# %%
if "label_corrected" in training.tables:
    display(training.tables["label_corrected"].round(4))
else:
    print("no review ledger applied: raw labels only")

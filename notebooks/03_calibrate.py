# %% [markdown]
# # 03 · Calibrate and evaluate
#
# A segmentation network outputs a **logit** per pixel; the sigmoid turns it into a number between 0
# and 1 that looks like a probability but rarely is one. Networks trained with Dice or focal terms
# are typically *over-confident*: among pixels scored 0.9, far fewer than 90 % are really water.
# This notebook
#
# 1. fits **temperature scaling** on the calibration split,
# 2. chooses the **operating threshold** on the calibrated probabilities,
# 3. scores the **test split** with both: pixel, per-region, per-year, object-level and
#    rare-class (prevalence) metrics, and
# 4. compares **test-time augmentation** (TTA) settings.
#
# Everything is computed from the logits the training stage stored under `predictions/`: each split
# is read once, and only the TTA comparison runs the model again.
#
# **Why a separate calibration split.** The temperature and the threshold are fitted on
# `calibrate.split` (the validation split by default). With the block split of notebook 01, train,
# validation and test chips come from different spatial blocks separated by a buffer, so the
# calibration data are spatially disjoint from both the training and the test data, and test
# scores stay honest estimates for unseen areas.

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
tables = calibration.tables
print(f"calibration split: {params.calibrate.split}; threshold rule: {params.calibrate.threshold_rule}")

# %% [markdown]
# ## 1 · Temperature scaling
#
# One number, the temperature T, divides every logit before the sigmoid: p = sigmoid(logit / T).
# T is chosen to minimise the negative log-likelihood of the calibration pixels.
#
# * **T > 1** softens the probabilities (the model was over-confident),
# * **T < 1** sharpens them (under-confident), T = 1 changes nothing.
#
# Dividing by a positive number never changes the *order* of the pixels, so the PR curve, PR-AUC and
# the set of masks reachable by some threshold are unchanged; what changes is what a probability
# *means*. The reliability diagrams plot the observed fraction of water pixels against the mean
# predicted probability in bins: a calibrated model lies on the diagonal. Equal-width bins follow the
# probability axis; equal-mass bins hold the same number of pixels each, which matters at low
# prevalence, where almost all pixels sit in the lowest equal-width bin. ECE is the pixel-weighted
# mean distance to the diagonal, MCE the largest one, the Brier score the mean squared error of the
# probabilities. The test row is held out: it shows whether the calibration carries over.

# %%
show_metrics({k: v for k, v in calibration.metrics.items() if k.startswith("calibration.")})

# %%
if "calibration_quality" in tables:
    display(tables["calibration_quality"])
if "reliability" in calibration.figures:
    show_figures({"reliability": calibration.figures["reliability"]})

# %% [markdown]
# ## Per class (softmax models)
#
# A model with several classes is calibrated with one temperature on every logit (or one per class,
# `calibrate.per_class_temperature`) before the softmax, and decides each pixel by the argmax of the
# calibrated probabilities (`calibrate.class_of_interest` gives one class its own probability threshold
# first). The table lists IoU, F1, precision and recall per class on the test split, then mIoU with and
# without the background class and the overall accuracy; a class absent from both label and prediction
# is NaN and marked `absent`. The confusion matrix counts test pixels by label class (rows) and predicted
# class (columns), beside it each row's shares (recall on the diagonal). The reliability diagrams treat
# each class one-vs-rest: the probability of the class against how often the label is that class,
# before (T = 1, dotted) and after calibration (solid, in the class colour).

# %%
from workbench.stages.classes import confusion_figures, is_multiclass, per_class_metrics, reliability_figure

multiclass = is_multiclass(params)
if multiclass:
    display(per_class_metrics(calibration.metrics, params, "test").round(3))
    confusion_figures(params, run_path, calibration, splits=("test",))
    reliability_figure(params, run_path, calibration, split="test")
    show_figures({name: calibration.figures[name] for name in ("confusion_test", "reliability_classes")})
    for name in ("confusion_test_region", "class_metrics_test"):
        if name in tables:
            display(tables[name].round(3))

# %% [markdown]
# ## 2 · The operating threshold, chosen after calibration
#
# A threshold is a cut on the probability axis, so it only means something for one temperature: the
# threshold that gives the best IoU at T = 1 is not the one that gives it after scaling (compare the
# first two rows below). Choosing the threshold on calibrated probabilities keeps the saved pair
# (T, threshold) consistent, lets a rule such as "precision >= 0.8" be read directly on the
# calibrated scale, and makes the threshold comparable between models and regions. Both are saved in
# `model/calibration.json` and used by `workbench predict`. With `calibrate.per_region`, each region
# gets its own threshold (regions absent from the calibration split fall back to the global one).
#
# The sweep lists pooled counts and scores at each candidate threshold on the calibration split and,
# for reference only, on the test split (never used to choose).

# %%
if "thresholds" in tables:
    display(tables["thresholds"])
if "threshold_sweep" in tables:
    sweep = tables["threshold_sweep"]
    display(sweep.pivot_table(index="threshold", columns="split", values=["iou", "precision", "recall"]).round(3))

# %% [markdown]
# ## 3 · Test scores at the chosen threshold
#
# Pooled scores sum the confusion counts of every valid, labelled test pixel before taking ratios;
# mIoU averages the IoU of water and background, pixel accuracy is the share of correct pixels (the
# set reported on the TerraMind model card). Means per chip weight each chip equally, so small
# lakes count as much as large ones. The PR curves use calibrated probabilities; the dashed line is
# the score of a detector with no skill (precision = share of water pixels).

# %%
if "test_summary" in tables:
    display(tables["test_summary"])
if "pr_curves" in calibration.figures:
    show_figures({"pr_curves": calibration.figures["pr_curves"]})

# %% [markdown]
# ### Per region and per year
# Pooled counts per group; `*_chip_mean` columns average over chips. Large differences between
# regions are the signal for region-specific thresholds or more training data from that region;
# differences between years point to changing conditions (snow, turbidity, sensor state).

# %%
for name in ("per_region", "per_year"):
    if name in tables:
        display(tables[name].round(3))

# %% [markdown]
# ### Raw against label-corrected metrics
# With the store's review ledger applied, the temperature and thresholds are fitted and the test split
# scored on the label-corrected data (dropped chips left out, fixed chips on their corrected label); the
# table puts the same calibrated predictions scored against the store's original labels beside them, per
# split and region (`diagnostics/label_corrected_calibrated.csv`; `run.json` names the ledger used).

# %%
if "label_corrected" in tables:
    display(tables["label_corrected"].round(4))
else:
    print("no review ledger applied: raw labels only")

# %% [markdown]
# ## 4 · Scores at realistic prevalence
#
# Evaluation splits usually hold far more lake chips than a real scene does. The scores below
# re-weight the test chips to **1 positive chip per N negative chips** (N = 200, 500, 1000) from the
# same single inference pass: every chip without water enters N x (positive chips) / (negative
# chips) times. Recall does not depend on N (it only counts water pixels); precision does, because
# false alarms on the many empty chips pile up. With prevalence pi, true-positive rate TPR and
# false-positive rate FPR, precision is TPR*pi / (TPR*pi + FPR*(1-pi)).
#
# **Reading the PR curves:** a detector whose scores carry no information has a flat PR curve at
# precision = pi, so its average precision (AP, the PR-AUC) **equals the prevalence** (dashed
# lines). At 1:1000 an AP of 0.05 can therefore be a strong result; compare each curve with its own
# dashed line, not with 1 (precision is on a log axis). `upweighted = True` means the test split
# had fewer empty chips than the ratio needs, so each one counts many times and the estimate rests
# on few chips.

# %%
if "prevalence" in tables:
    display(tables["prevalence"].round(5))
if "prevalence_pr" in calibration.figures:
    show_figures({"prevalence_pr": calibration.figures["prevalence_pr"]})

# %% [markdown]
# ## 5 · Object-level scores
#
# Each connected group of water pixels is one object (a lake). Predicted objects are matched one to
# one to labelled lakes when their IoU reaches 0.5 (standard), 0.3 (preferred for small, irregular
# objects) or 0.1 (relaxed: "found it, outline rough"). Object precision is the share of predicted
# lakes that match, object recall the share of labelled lakes found. Size bins are object areas in
# pixels (at 10 m: 10 px = 0.001 km2, 100 px = 0.01 km2); recall in a bin counts labelled lakes of
# that size, precision counts predicted objects of that size.

# %%
if "objects" in tables:
    display(tables["objects"].round(3))

# %% [markdown]
# ## 6 · Test-time augmentation
#
# TTA runs the model on flipped and rotated copies of each chip, maps the outputs back and averages
# the logits: `minimal` = identity + horizontal flip (2 passes), `standard` = + vertical flip and
# 180 degree rotation (4), `full` = all 8 flips and rotations. It costs that many forward passes; the
# table shows whether the IoU gain on validation chips is worth it. The temperature and threshold
# above were fitted on logits made with `evaluate.tta`; the other modes reuse them.

# %%
if "tta" in tables:
    display(tables["tta"].round(4))

# %% [markdown]
# ## 7 · Worst test chips
# The lowest-IoU chips at the chosen threshold: the first places to look for label errors, missed
# small lakes, or conditions (cloud shadow, frozen lakes) the model has not learnt. Notebook 04
# ranks label suspicion systematically.

# %%
if "worst_chips" in tables:
    display(tables["worst_chips"])

# %% [markdown]
# # 04 · Label-noise review
#
# Where the model, an index of the imagery and the label disagree, the label is often the one that is
# wrong (an object omitted, undersized or misplaced). Each chip gets one suspicion score
# (`workbench.review.signals.combined_score`) from its signals, each a column of the ranking:
#
# * `model_disagreement` and `confident_error`: the label against the model's probability, scored out of
#   sample (`scored_by` says which predictions: `train_oof` are out-of-fold models that never saw the chip);
# * `cleanlab_quality`: cleanlab's confident-learning label-quality score (lower = more suspicious);
# * `index_disagreement`: the label against the index of `review.index` (MNDWI for water, none elsewhere);
# * `vote_entropy` and `contested_share`: how much the annotators of multi-annotator stores disagree.
#
# For a softmax model (`model.num_classes >= 2`) the model terms compare label and predicted classes
# (`workbench.review.signals.class_noise_terms`): `disagree.<class>` is 1 - IoU of that class between
# label and prediction, `model_disagreement` their mean over the non-background classes,
# `mismatch_share` the share of pixels whose label class differs from the predicted class, and
# cleanlab scores the chip from the softmax probabilities of every class; the figures draw label and
# prediction in the class colours.
#
# Decisions taken on the map below go to the store's review ledger (`<store>.review/decisions.jsonl`),
# which later runs apply: dropped chips leave their split, fixed chips train and score on the corrected label.

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

# %% [markdown]
# ## The ranking (rank 1 = review first)

# %%
display(review.tables["ranking"].head(25))
if "prefilter" in review.tables:
    display(review.tables["prefilter"])

# %% [markdown]
# ## Annotators, decisions so far and conflicting decisions

# %%
for name in ("annotators", "decisions", "conflicts"):
    if name in review.tables and len(review.tables[name]):
        print(name)
        display(review.tables[name])

# %% [markdown]
# ## The review map
#
# Footprints coloured by score (hover: chip id and score; click: review that chip), the label-noise layer
# of the current chip (orange: labelled but not predicted; magenta: predicted but not labelled), check
# boxes for the layers, next / previous through the ranking and the decision buttons. The map is centred
# on the chip under review (zoom out for the others) and its four panels are shown under the map.
# "fix" stores a polygon or rectangle drawn on the chip with the map's draw control as the chip's corrected
# label (burnt onto the chip's pixel grid), or the model's mask when nothing is drawn. Footprints are the
# chips' exact outlines where the store records each chip's CRS and bounds, otherwise squares around the
# chip centres (the legend says which). `figures/review_map.html` is the same map as a standalone file.

# %%
if params.model.num_classes == 1:
    from workbench.review.widget import review_widget

    review_map = review_widget(params, run_path, review.tables["ranking"])
    display(review_map.widget)
else:
    print("the review map draws binary masks; for this softmax model use the ranking and the figures")

# %% [markdown]
# ## Most suspicious chips

# %%
show_figures(review.figures)

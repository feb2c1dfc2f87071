# %% [markdown]
# # 01 · Data audit
#
# Before any GPU hour is spent, look at the chips: where they are, how the splits fall on the map,
# what the band values look like, how much of each split is nodata and how much is positive, and
# whether the labels agree with an independent physical signal (the water index
# MNDWI = (B03 − B11) / (B03 + B11)). The last section pushes a few batches through the real
# training loader (sampler, augmentation, normalisation) so a broken pipeline fails here, not after
# hours of training.
#
# This stage also assigns the spatial split and computes the normalisation statistics on the train
# split; later stages read both from the run directory. The parameters are frozen into the run
# directory's `params.yaml` when it is created; every notebook of the run reads that copy, not
# `params_file` again.

# %% tags=["parameters"]
params_file = "../params/demo.yaml"
overrides: list[str] = []
run_dir = ""

# %%
from IPython.display import display

from workbench.data.prepare import load_prepared
from workbench.data.store import read_store_meta
from workbench.notebook import open_run, show_figures, show_metrics
from workbench.run import RunLayout
from workbench.stages import run_data_audit

params, run_path = open_run(params_file, overrides, run_dir)
audit = run_data_audit(params, run_path)
prepared = load_prepared(run_path, params.data)
store_bands = [band["name"] for band in read_store_meta(prepared.store)["bands"]]
show_metrics(audit.metrics)

# %% [markdown]
# ## Splits
# Chips are assigned to train / val / test by `data.split.method`: hashed 0.15° blocks (chips near a
# block edge fall in a buffer and are left out, so no lake is shared between splits), held-out
# regions, the data set's own split, whole scenes or files, row bands of a scene, or a seeded random
# draw (the last three need no coordinates). When the chips have coordinates, the leakage table gives the
# smallest distance between chips of two different splits: it should be well above the size of a
# lake and its catchment (kilometres, not metres).

# %%
display(audit.tables["split_summary"])
if audit.metrics["data.has_coordinates"]:
    display(audit.tables["leakage"])
else:
    print(f"split method {audit.metrics['data.split_method']}: no coordinates, no leakage distances")

# %% [markdown]
# ## Where the chips are
# The static map is what HTML reports show. Opened in JupyterLab, the interactive map below it lets
# you zoom in, toggle splits and hover over a chip for its id. The same map is saved as
# `figures/split_map.html` in the run directory (it opens offline; its OpenStreetMap background is a
# layer to tick in the map's layer control, and needs internet access).
# Look for splits that cluster in one corner of the area: a test split drawn from one valley only
# measures that valley.

# %%
if "split_map" in audit.figures:
    show_figures([audit.figures["split_map"]])
else:
    print("the chips have no coordinates: no map")

# %%
try:
    from workbench.audit import split_map

    display(split_map(prepared.catalog, backend="leafmap"))
except (ImportError, RuntimeError, ValueError) as exc:
    print(f"interactive map not available here ({exc}); the static map above shows the same chips")

# %% [markdown]
# ## Band statistics
# Per band over valid pixels of every chip: minimum, 1st percentile, mean, median, 99th
# percentile, maximum, standard deviation, the nodata share and the share of valid pixels that are
# exactly 0. What to look for:
#
# * physical ranges: Sentinel-2 L2A reflectance is stored ×10 000 (water and shadow a few hundred,
#   snow and cloud above 5 000; values near 16 000 are saturation), Sentinel-1 backscatter in dB
#   (open water below about −18 dB in VV), the DEM in metres;
# * a maximum far beyond p99 means a few outliers that z-score normalisation will not tame;
# * a std of 0 is a constant band (a missing band filled with a constant); a large zero share in one
#   band but not the others is a band that dropped out in some scenes;
# * histograms with two modes are usually two surface types (snow and rock), not a problem.

# %%
display(audit.tables["band_stats"].round(3))
show_figures([audit.figures["band_histograms"]])

# %% [markdown]
# ## Nodata
# Share of pixels outside the valid mask (swath edges, clouds masked upstream, DEM voids) per
# split and region. Nodata pixels are left out of losses and metrics, but a split or region that is
# mostly nodata has fewer effective pixels than its chip count suggests.

# %%
display(audit.tables["nodata"].round(4))
show_figures([audit.figures["nodata"]])

# %% [markdown]
# ## Class balance per split and region
# A chip is positive when at least `data.sampler.positive_threshold` of its labelled pixels belong to
# the positive class. Compare the splits: a validation or test split with a very different positive
# share than train gives scores that will not transfer; a region with almost no positives will be
# hard to learn and noisy to evaluate.

# %%
display(audit.tables["positive_by_split_region"].round(4))
show_figures([audit.figures["class_balance"], audit.figures["positive_by_region"]])

# %% [markdown]
# ## Classes
# A softmax model (`model.num_classes >= 2`) gives each pixel one of the classes below (class 0 is the
# background by convention), drawn in these colours in every figure of the run. The table gives each
# class's share of the labelled valid pixels per split and the unlabelled share (label 255; in the
# multiclass demo the pixels under a cloud). A class much rarer in val or test than in train gives
# unstable per-class scores there; `class_weights: frequency` in a loss term up-weights rare classes.

# %%
from workbench.stages.classes import class_balance, class_table, is_multiclass, legend_figure

if is_multiclass(params):
    display(class_table(params))
    show_figures([legend_figure(params, run_path, audit)])
    display(class_balance(params, run_path).round(4))
else:
    print("binary model (model.num_classes = 1): one foreground class, balanced as above")

# %% [markdown]
# ## Water index versus label
# For each chip, the label fraction is compared with the fraction of MNDWI > threshold
# (`review.water_index_threshold`). The pre-filter keeps a chip when IoU(label, water) ≥
# `review.prefilter_min_iou` and the water area is at most `review.prefilter_max_ratio` times the
# label area; an empty label is kept when little water is seen. On real glacial-lake data this
# drops a large share of raw chips, most with IoU < 0.05 (misregistered or misdated labels). Snow,
# ice and cloud shadows also have a high MNDWI, so points above the diagonal are not all label
# errors: open the chip in the explorer below before dropping it. Nothing is dropped automatically.

# %%
if "prefilter" in audit.tables:
    display(audit.tables["prefilter"])
    show_figures([audit.figures["agreement_scatter"]])
else:
    display(audit.tables["audit_messages"])

# %%
import pandas as pd

chips = pd.read_parquet(RunLayout(run_path).data_audit_chips)
if "iou_label_water" in chips:
    columns = ["chip_id", "split", "region", "year", "label_fraction", "water_fraction", "iou_label_water"]
    display(chips[chips["label_fraction"] > 0].nsmallest(10, "iou_label_water")[columns].round(3))

# %% [markdown]
# ## Chip explorer
# Pick a split and a chip (drop-down or slider) and a band composite: true colour (B04/B03/B02),
# false colour (B08/B04/B03, vegetation red), SWIR (B12/B8A/B04, water black, snow cyan), SAR
# (VV, VH and their dB ratio), a DEM hillshade, or any three bands. The label (positive light blue,
# unlabelled light grey) and the valid mask are shown beside it. On a run that already has predictions
# (`run_dir` set to a finished run, or `workbench lab RUN`), the model's calibrated probability (label
# outlined in white) and the chip's label-noise review score and rank are shown too. Only works in a live
# kernel; the HTML report keeps a snapshot of the first chip.

# %%
try:
    from workbench.audit.explorer import chip_explorer

    display(chip_explorer(prepared.store, prepared.catalog, store_bands, run=run_path))
except (ImportError, RuntimeError) as exc:
    print(f"chip explorer not available here ({exc})")

# %% [markdown]
# ## Loader pre-flight check
# A few batches of the real training loader (sampler, augmentation and normalisation as
# configured) are checked for shapes, dtypes, non-finite values, label values outside
# {0, 1, 255}, the valid mask's type and targets in [0, 1]. The table gives the positive pixel share
# and the share of positive chips per batch: with a balanced sampler the latter should sit near
# `data.sampler.positive_fraction`. For z-score inputs, the normalised band means should be near 0
# and the standard deviations near 1.

# %%
verdict = "passed" if audit.metrics["data.check_ok"] else "FAILED: fix the problems below before training"
print(f"loader check {verdict}")
if len(audit.tables["audit_messages"]):
    display(audit.tables["audit_messages"])
display(audit.tables["check_data"].round(4))
display(audit.tables["check_bands"].round(3).set_index("band").T)

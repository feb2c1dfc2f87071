"""Typed experiment parameters loaded from YAML.

Every section rejects unknown keys, so a typo in a parameter file fails loudly with the
file, the key and the allowed names instead of silently falling back to a default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from workbench.io import write_text_atomic


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean (bool itself, Any, or a union holding one of them)."""
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) in (list, tuple, dict, set):
        return False
    return any(_accepts_bool(arg) for arg in get_args(annotation))


def _element_type(annotation: Any) -> Any | None:
    """The element type of a list/tuple field (None for other types)."""
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) in (list, tuple):
            args = [arg for arg in get_args(candidate) if arg is not Ellipsis]
            return args[0] if args else None
    return None


class StrictModel(BaseModel):
    """Base for every parameter section: unknown keys are errors, assignments are validated.

    A boolean is never taken for a number (`max_epochs: true` would otherwise become 1).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        if isinstance(value, bool) and not _accepts_bool(field.annotation):
            raise ValueError(f"a boolean ({str(value).lower()}) is not a valid value here; write a number or a name")
        element = _element_type(field.annotation)
        listed = isinstance(value, list | tuple) and element is not None and not _accepts_bool(element)
        if listed and any(isinstance(item, bool) for item in value):
            raise ValueError(f"the list {list(value)} holds a boolean; write numbers or names")
        return value


# --------------------------------------------------------------------------- data


class SyntheticConfig(StrictModel):
    """Deterministic generator of multimodal glacial-lake chips (the embedded demo data)."""

    n_chips: int = Field(240, ge=8, description="number of chips generated")
    chip_size: int = Field(64, ge=16, description="chip side in pixels (10 m pixels)")
    regions: list[str] = ["tien_shan", "ile_alatau", "zhetysu_alatau"]
    years: list[int] = [2017, 2021, 2022, 2023]
    noise_fraction: float = Field(0.06, ge=0.0, le=0.5, description="fraction of chips with a corrupted label")
    lake_fraction: float = Field(0.75, ge=0.0, le=1.0, description="fraction of chips holding at least one lake")
    cloud_fraction: float = Field(0.15, ge=0.0, le=1.0, description="fraction of chips with a cloud and its shadow")
    seed: int = 0
    multiclass: bool = Field(
        False,
        description="label three classes (0 other, 1 lake, 2 snow_ice; cloud-covered pixels unlabelled) instead "
        "of lake / background; the images are the same",
    )


class SplitConfig(StrictModel):
    """How chips are assigned to train / val / test."""

    method: Literal["block", "region", "catalog", "random", "source", "rows"] = Field(
        "block",
        description="block / region: by coordinates; catalog: the data set's own split; random: seeded chip "
        "shuffle; source: whole scenes or source files (group_column); rows: contiguous row bands of each scene",
    )
    block_deg: float = Field(0.15, gt=0)
    buffer_deg: float = Field(0.02, ge=0)
    salt: str = "cryosentinel-blocks-v1"
    train_percent: int = Field(80, ge=0, le=100)
    val_percent: int = Field(10, ge=0, le=100)
    holdout_regions: list[str] = Field(default_factory=list, description="test regions for method=region")
    n_folds: int = Field(5, ge=2, description="spatial folds for out-of-sample predictions")
    seed: int = Field(0, description="seed of method=random / source (fixed, independent of the training seed)")
    group_column: str = Field("file", description="catalog column naming a chip's scene (method=source / rows)")
    buffer_px: int = Field(32, ge=0, description="pixels left out between row bands (method=rows)")


class NormalizeConfig(StrictModel):
    """Per-band normalisation computed on valid pixels of the train split."""

    method: Literal["zscore", "percentile", "none"] = "zscore"
    percentiles: tuple[float, float] = (1.0, 99.0)
    stats_file: Path | None = Field(None, description="use these statistics instead of computing them")


class CurriculumStage(StrictModel):
    """From `epoch` on (0-based), draw `negatives_per_positive` negative chips per positive chip."""

    epoch: int = Field(ge=0)
    negatives_per_positive: float = Field(ge=0)


class SamplerConfig(StrictModel):
    """Which chips a training epoch draws."""

    kind: Literal["random", "balanced", "hard_negative", "curriculum"] = "random"
    positive_fraction: float = Field(0.5, gt=0, lt=1, description="for kind=balanced")
    positive_threshold: float = Field(0.002, ge=0, description="a chip is positive above this label fraction")
    hard_negative_ratio: float = Field(3.0, gt=0, description="positive:negative weight ratio, kind=hard_negative")
    curriculum: list[CurriculumStage] = Field(default_factory=list)
    epoch_size: int | None = Field(None, ge=1, description="chips per epoch; default: the train split size")


class AugmentConfig(StrictModel):
    """Augmentations applied identically to image, label and valid mask (probabilities per sample)."""

    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rot90: float = Field(0.0, ge=0, le=1)
    spectral_jitter: float = Field(0.0, ge=0, le=1)
    jitter_eps: dict[str, float] = Field(default_factory=lambda: {"S2L2A": 0.03, "S1GRD": 0.07, "DEM": 0.02})
    brightness: float = Field(0.0, ge=0, le=1, description="probability of a brightness/contrast change (optical)")
    brightness_limit: float = Field(0.2, ge=0)
    multiscale: float = Field(0.0, ge=0, le=1)
    scale_range: tuple[float, float] = (0.8, 1.2)
    copy_paste: float = Field(0.0, ge=0, le=1)
    copy_paste_min_pixels: int = Field(32, ge=1)
    slide_mix: float = Field(0.0, ge=0, le=1, description="probability of a Sat-SlideMix roll per sample")
    slide_mix_copies: int = Field(1, ge=1, description="augmented copies per original (gamma)")
    boundary: Literal["none", "ignore", "soft"] = "none"
    boundary_width: int = Field(3, ge=1)
    soft_label_value: float = Field(0.05, ge=0, le=0.5)


class IngestConfig(StrictModel):
    """Raw data in an external format that the run ingests into `data.store` (data.source=ingest).

    Paths (`src` and the reader options `labels` / `images`) are taken from the project root; the store is
    written once and reused while its recorded format, source and tiling match these values.
    """

    format: str = Field(description="a `workbench ingest` format, e.g. ukis-csmask, cloud38, vector, terramesh")
    src: Path = Field(description="the raw data (file or folder), relative to the project root or absolute")
    chip_size: int | None = Field(None, ge=8, description="tile rasters into chips of this size")
    stride: int | None = Field(None, ge=1)
    split: str | None = Field(None, description="split method written at ingest (random, source, rows, ...)")
    split_options: dict[str, Any] = Field(default_factory=dict, description="options of that split method")
    options: dict[str, Any] = Field(default_factory=dict, description="the reader's options (--option key=value)")


class DataParams(StrictModel):
    """Where the chips come from and how they are fed to the model."""

    source: Literal["synthetic", "store", "ingest"] = "synthetic"
    store: Path = Field(
        Path("data-cache/demo"), description="chip store directory (created for source=synthetic / ingest)"
    )
    ingest: IngestConfig | None = Field(None, description="raw data ingested into `store` when source=ingest")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    bands: list[str] | None = Field(None, description="band subset fed to the model; default: all bands")
    rgb_bands: tuple[str, str, str] = ("B04", "B03", "B02")
    green_band: str = "B03"
    swir_band: str = "B11"
    split: SplitConfig = Field(default_factory=SplitConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    batch_size: int = Field(16, ge=1)
    num_workers: int = Field(0, ge=0)


# --------------------------------------------------------------------------- model


class TerraMindConfig(StrictModel):
    """TerraMind v1 backbone built through terratorch."""

    size: Literal["tiny", "small", "base", "large"] = "tiny"
    modalities: list[Literal["S2L2A", "S2L1C", "S1GRD", "S1RTC", "DEM"]] = ["S2L2A", "S1GRD", "DEM"]
    decoder: Literal["UperNet", "UNet"] = "UperNet"
    decoder_channels: int | list[int] = 256
    tap_indices: list[int] | None = Field(None, description="ViT blocks fed to the decoder; default spread evenly")
    checkpoint: Path | None = Field(None, description="local TerraMind checkpoint (.pt/.safetensors)")
    timesteps: int = Field(
        1, ge=1, description="time steps per chip: the bands hold this many consecutive groups, names ending _t<k>"
    )
    temporal_pooling: Literal["concat", "mean", "max"] = Field(
        "concat", description="how the encoder's per-time-step features are combined before the decoder"
    )


# Class colours: background black, then the matplotlib tab10 cycle (distinct, colour-blind tolerable order).
CLASS_PALETTE = [
    "#000000",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


class ClassSpec(StrictModel):
    """One class of the label: a name (used in metric names and legends) and a colour "#rrggbb"."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="letters, digits, _ . - (used in metric names)")
    color: str = Field(pattern=r"^#[0-9a-fA-F]{6}$", description='"#rrggbb"')

    @field_validator("color")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class ModelParams(StrictModel):
    """Architecture selection."""

    architecture: str = Field("Unet", description="an smp architecture, 'terramind', 'satunet' or 'late_fusion'")
    encoder: str = "resnet18"
    encoder_depth: int = Field(5, ge=3, le=5)
    decoder_channels: list[int] | None = None
    encoder_weights: Path | None = Field(None, description="local encoder weights file (3-channel ImageNet is adapted)")
    num_classes: int = Field(
        1, ge=1, description="1 = binary (one logit, sigmoid); >= 2 = C logits, softmax, class 0 = background"
    )
    classes: list[ClassSpec] | None = Field(
        None,
        description="class names and colours, one per class (2 for a binary model: background, foreground); "
        "default: background/foreground or class_0..class_{C-1} with a fixed palette",
    )
    terramind: TerraMindConfig = Field(default_factory=TerraMindConfig)
    fusion_groups: list[list[str]] = Field(default_factory=list, description="band groups for late_fusion")
    base_channels: int = Field(32, ge=4, description="width of satunet")

    @model_validator(mode="after")
    def _classes_match(self) -> ModelParams:
        if self.classes is not None:
            expected = max(self.num_classes, 2)
            if len(self.classes) != expected:
                what = "background and foreground" if self.num_classes == 1 else f"model.num_classes={self.num_classes}"
                raise ValueError(
                    f"model.classes lists {len(self.classes)} classes but {what} needs exactly {expected}; "
                    f"give one name and colour per class or drop model.classes for the defaults"
                )
            names = [spec.name for spec in self.classes]
            if len(set(names)) != len(names):
                raise ValueError(f"model.classes repeats a name: {names}; class names must be unique")
        return self


def resolve_classes(model: ModelParams) -> list[ClassSpec]:
    """The model's classes: `model.classes`, else background/foreground (binary) or class_0..class_{C-1}.

    A binary model (one logit) has two classes: 0 = background, 1 = foreground.
    """
    if model.classes is not None:
        return list(model.classes)
    if model.num_classes == 1:
        return [
            ClassSpec(name="background", color=CLASS_PALETTE[0]),
            ClassSpec(name="foreground", color=CLASS_PALETTE[1]),
        ]
    return [ClassSpec(name=f"class_{i}", color=CLASS_PALETTE[i % len(CLASS_PALETTE)]) for i in range(model.num_classes)]


# --------------------------------------------------------------------------- train


class LossTerm(StrictModel):
    """One weighted term of the training loss; options not used by `name` are ignored."""

    name: Literal["bce", "ce", "dice", "generalized_dice", "focal", "tversky", "lovasz", "boundary", "ohem_bce"] = (
        Field(description="bce/ohem_bce/boundary: binary only; ce: softmax only; the others both")
    )
    weight: float = Field(1.0, ge=0)
    pos_weight: float | Literal["data", "batch"] | None = Field(
        None, description="BCE positive weight: a number, 'data' (from the train split) or 'batch' (per-batch clamp)"
    )
    pos_weight_max: float = Field(100.0, gt=0)
    class_weighting: Literal["none", "linear", "sqrt", "log"] = "none"
    alpha: float = Field(0.25, ge=0)
    beta: float = Field(0.75, ge=0)
    gamma: float = Field(2.0, ge=0)
    smooth: float = Field(1.0, ge=0)
    keep_ratio: float = Field(0.5, gt=0, le=1)
    min_kept: int = Field(4096, ge=1)
    class_weights: list[float] | Literal["frequency"] | None = Field(
        None,
        description="per-class weights (softmax models, ce / focal / dice): one number per class, or 'frequency' "
        "= inverse pixel frequency of each class in the train split, normalised to mean 1 and capped",
    )
    class_weight_max: float = Field(10.0, gt=0, description="cap of the 'frequency' class weights")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of ce")

    @field_validator("class_weights")
    @classmethod
    def _non_negative(cls, value: list[float] | str | None) -> list[float] | str | None:
        if isinstance(value, list) and (not value or any(w < 0 for w in value)):
            raise ValueError(f"class_weights must be non-negative numbers, one per class, got {value}")
        return value


class OptimizerConfig(StrictModel):
    """AdamW with backbone / decoder groups and optional layer-wise decay."""

    lr: float = Field(1e-3, gt=0, description="decoder (base) learning rate")
    backbone_lr_mult: float = Field(1.0, gt=0)
    layer_decay: float = Field(1.0, gt=0, le=1, description="ViT layer-wise lr decay (1 = off)")
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    freeze_backbone_epochs: int = Field(0, ge=0)
    frozen_lr: float | None = Field(None, gt=0, description="decoder lr while the backbone is frozen")
    scheduler: Literal["constant", "cosine", "plateau"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_factor: float = Field(0.01, gt=0, le=1)
    min_lr: float = Field(1e-6, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(5, ge=0)


class EmaConfig(StrictModel):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)


class SwaConfig(StrictModel):
    enabled: bool = False
    start_fraction: float = Field(0.4, ge=0, le=1)
    lr: float = Field(1e-5, gt=0)
    anneal_epochs: int = Field(3, ge=0)
    soup_snapshots: int = Field(0, ge=0, description="uniform soup of this many snapshots (0 = off)")


class EarlyStoppingConfig(StrictModel):
    enabled: bool = False
    monitor: str = "val/iou"
    mode: Literal["max", "min"] = "max"
    patience: int = Field(10, ge=1)
    min_delta: float = Field(0.0, ge=0)
    start_epoch: int = Field(0, ge=0)
    window: int = Field(1, ge=1, description="moving average over this many validations")


class TrackingConfig(StrictModel):
    uri: str | None = Field(None, description="MLflow tracking URI; CSV logs are always written")
    experiment: str | None = None


class TrainParams(StrictModel):
    """Optimisation, precision and scale-out."""

    max_epochs: int = Field(8, ge=1)
    max_steps: int = Field(-1, ge=-1)
    loss: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="bce"), LossTerm(name="dice")])
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = "cpu"
    devices: int | str = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    compile: bool = False
    deterministic: bool = False
    ema: EmaConfig = Field(default_factory=EmaConfig)
    swa: SwaConfig = Field(default_factory=SwaConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    final_weights: Literal["best_val", "best", "last", "ema", "swa", "soup"] = Field(
        "best_val",
        description="weights saved in model/: best_val = the candidate (best checkpoint, last, EMA, SWA, soup) "
        "scoring best on the validation split by the checkpoint metric, or one candidate by name",
    )
    checkpoint_every_n_steps: int | None = Field(None, ge=1)
    val_every_n_epochs: int = Field(1, ge=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    progress_bar: bool = True


# --------------------------------------------------------------------------- evaluate / calibrate / review


class ExternalStore(StrictModel):
    """An external test store that the run ingests first when it does not exist (see IngestConfig)."""

    store: Path
    ingest: IngestConfig


class EvaluateParams(StrictModel):
    threshold: float = Field(0.5, gt=0, lt=1)
    tta: Literal["none", "minimal", "standard", "full"] = "none"
    prevalences: list[int] = Field(default_factory=lambda: [200, 500, 1000], description="1:N positive:negative")
    object_iou: list[float] = Field(default_factory=lambda: [0.5, 0.3, 0.1])
    sweep_thresholds: list[float] = Field(default_factory=lambda: [round(0.1 + 0.05 * i, 2) for i in range(17)])
    histogram_bins: int = Field(1000, ge=10)
    external: list[Path | ExternalStore] = Field(
        default_factory=list,
        description="other chip stores the run's model is scored on after calibration: a store path, or "
        "{store: PATH, ingest: {format, src, ...}} to ingest raw data into PATH first",
    )


class CalibrateParams(StrictModel):
    split: str = Field("val", description="calibration split, spatially disjoint from train and test")
    ece_bins: int = Field(15, ge=2)
    threshold_rule: Literal["best_iou", "best_f1", "target_precision", "fixed"] = "best_iou"
    target_precision: float = Field(0.8, gt=0, le=1)
    per_region: bool = False
    per_class_temperature: bool = Field(False, description="softmax models: one temperature per class (vector scaling)")
    class_of_interest: str | None = Field(
        None,
        description="softmax models: a class name decided by its own probability threshold (threshold_rule on "
        "the calibration split, one-vs-rest) before the argmax of the others",
    )


class ReviewParams(StrictModel):
    water_index_threshold: float = Field(0.0, description="MNDWI above this is water (seed docs 0, code 0.3)")
    prefilter_min_iou: float = Field(0.20, ge=0, le=1)
    prefilter_max_ratio: float = Field(3.0, gt=0)
    prefilter_empty_max_water: float = Field(0.05, ge=0, le=1)
    model_weight: float = Field(
        0.25, ge=0, description="weight of model-label disagreement in the score (a tie-breaker: see combined_score)"
    )
    index_weight: float = Field(
        0.25, ge=0, description="weight of index-label disagreement in the score (a tie-breaker: see combined_score)"
    )
    splits: list[str] = Field(default_factory=lambda: ["train", "val", "test"])
    top_k: int | None = Field(None, ge=1, description="default: the number of injected corruptions, else 20")
    n_figures: int = Field(8, ge=0)
    out_of_fold: bool | None = Field(
        None,
        description="score train chips with out-of-fold predictions: one model per spatial fold "
        "(data.split.n_folds) trained without it (costs n_folds extra trainings); default (null): on when "
        "the train split is reviewed and holds at least 2 x n_folds spatial blocks",
    )
    out_of_fold_epochs: int | None = Field(None, ge=1, description="epochs per fold model (default train.max_epochs)")
    index: str = Field(
        "mndwi",
        description="index compared with the label: 'mndwi' (data.green_band, data.swir_band), 'ndwi' "
        "(data.green_band, review.nir_band), 'none', or a band expression such as '(B03 - B08) / (B03 + B08)'",
    )
    nir_band: str = Field("B08", description="near-infrared band of the 'ndwi' index")
    confident_weight: float = Field(1.0, ge=0, description="weight of the confident-error term in the score")
    cleanlab_weight: float = Field(
        4.0, ge=0, description="weight of 1 - cleanlab's label-quality score (softmin) in the score, the main term"
    )
    votes_weight: float = Field(1.0, ge=0, description="weight of the contested-pixel share (annotator votes)")
    batch_size: int = Field(64, ge=1, description="chips scored together by cleanlab (bounds memory)")
    decisions: bool | None = Field(
        None,
        description="apply the store's review ledger (drop/fix decisions) to training and evaluation; "
        "default (null): on when the ledger exists",
    )
    ledger: Path | None = Field(None, description="review ledger file; default <store>.review/decisions.jsonl")

    @field_validator("index")
    @classmethod
    def _known_index(cls, value: str) -> str:
        """Known index names in lower case; a band expression is checked when the review evaluates it."""
        if value.strip().lower() in ("mndwi", "ndwi", "none"):
            return value.strip().lower()
        if not value.strip():
            raise ValueError("review.index is empty; use 'mndwi', 'ndwi', 'none' or a band expression")
        return value


class Params(StrictModel):
    """One experiment: everything a run needs besides the run directory."""

    experiment: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = 42
    profile: Literal["full", "smoke"] = Field(
        "full", description="smoke: the recipe shrunk to CPU minutes (see SMOKE_SETTINGS); overrides still win"
    )
    profile_applied: bool = Field(False, description="set once the profile's settings are written into these values")
    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    calibrate: CalibrateParams = Field(default_factory=CalibrateParams)
    review: ReviewParams = Field(default_factory=ReviewParams)

    @field_validator("experiment")
    @classmethod
    def _no_dots_only(cls, value: str) -> str:
        if set(value) <= {"."}:
            raise ValueError("experiment must name something")
        return value

    @model_validator(mode="after")
    def _ingest_given(self) -> Params:
        if self.data.source == "ingest" and self.data.ingest is None:
            raise ValueError("data.source=ingest needs data.ingest: {format: ..., src: ...} naming the raw data")
        return self

    @model_validator(mode="after")
    def _split_percent_sum(self) -> Params:
        split = self.data.split
        if split.train_percent + split.val_percent > 100:
            raise ValueError("data.split.train_percent + data.split.val_percent must not exceed 100")
        return self

    @model_validator(mode="after")
    def _multiclass_consistent(self) -> Params:
        n_classes = self.model.num_classes
        names = [spec.name for spec in resolve_classes(self.model)]
        if n_classes >= 2 and "loss" not in self.train.model_fields_set:  # the default loss, for softmax
            self.train.loss = [LossTerm(name="ce"), LossTerm(name="dice")]
        for term in self.train.loss:
            if isinstance(term.class_weights, list) and len(term.class_weights) != max(n_classes, 2):
                raise ValueError(
                    f"train.loss {term.name}: class_weights lists {len(term.class_weights)} numbers but the model "
                    f"has {max(n_classes, 2)} classes ({', '.join(names)})"
                )
            if n_classes == 1 and term.name == "ce":
                raise ValueError("train.loss ce needs model.num_classes >= 2; a binary model uses bce")
            if n_classes >= 2 and term.name in ("bce", "ohem_bce", "boundary"):
                raise ValueError(
                    f"train.loss {term.name} is for binary models (one logit) but model.num_classes={n_classes}; "
                    "use ce, dice, generalized_dice, focal, tversky or lovasz"
                )
        coi = self.calibrate.class_of_interest
        if coi is not None and coi not in names:
            raise ValueError(f"calibrate.class_of_interest {coi!r} is not a class; the classes are {names}")
        return self


# --------------------------------------------------------------------------- loading


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the file, key and fix."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (line {line}; first on line {seen[key]}); keep one of them",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """Parse YAML with the safe loader, refusing duplicate keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ParamsError(f"override {text!r} has an empty key")
    return path, safe_load_unique(raw) if raw.strip() else None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b.c=value` override in a nested dict (creating sections as needed)."""
    for override in overrides:
        path, value = parse_override(override)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ParamsError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at the parent of `loc` (for 'extra key' messages)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        annotation = field.annotation
        current = _first_model(annotation)
    return sorted(current.model_fields) if current is not None and hasattr(current, "model_fields") else []


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(error: ValidationError, source: str) -> str:
    """Render pydantic errors as one line per problem: file, dotted key, what is wrong, what is allowed."""
    lines = [f"invalid parameters in {source}:"]
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(part) for part in loc) or "<top level>"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_fields(Params, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {key}: unknown key{hint}; allowed keys: {', '.join(allowed)}")
        else:
            ctx = item.get("ctx") or {}
            expected = f"; expected {ctx['expected']}" if "expected" in ctx else ""
            lines.append(f"  {key}: {item['msg']}{expected} (got {item.get('input')!r})")
    return "\n".join(lines)


# The smoke profile: every recipe on a CPU in minutes, on a few small chips, keeping its architecture,
# losses, sampler, augmentation, split method, EMA / SWA and review (TerraMind at its smallest size).
SMOKE_SETTINGS = [
    "train.max_epochs=1",
    "train.max_steps=-1",
    "train.accelerator=cpu",
    "train.devices=1",
    "train.num_nodes=1",
    "train.strategy=auto",
    "train.precision=32-true",
    "train.compile=false",
    "train.val_every_n_epochs=1",
    "train.checkpoint_every_n_steps=null",
    "train.tracking.uri=null",
    "train.early_stopping.start_epoch=0",
    "train.optimizer.warmup_epochs=0",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.sampler.epoch_size=null",
    "model.terramind.size=tiny",
    "model.terramind.tap_indices=null",
    "model.terramind.checkpoint=null",
    "model.encoder_weights=null",
    "review.n_figures=2",
    "review.out_of_fold_epochs=1",
]
SMOKE_SYNTHETIC = ["data.synthetic.n_chips=48", "data.synthetic.chip_size=32"]


def smoke_settings(tree: dict[str, Any]) -> list[str]:
    """The overrides of the smoke profile for a parameter tree (a smaller synthetic store for synthetic data,
    at most one soup snapshot, one frozen-backbone epoch before one unfrozen)."""
    settings = list(SMOKE_SETTINGS)
    data = tree.get("data") or {}
    if data.get("source", "synthetic") == "synthetic":
        settings += [*SMOKE_SYNTHETIC, f"data.store={data.get('store', 'data-cache/demo')}-smoke"]
    swa = ((tree.get("train") or {}).get("swa")) or {}
    if swa.get("soup_snapshots"):
        settings.append("train.swa.soup_snapshots=1")
    optimizer = ((tree.get("train") or {}).get("optimizer")) or {}
    if optimizer.get("freeze_backbone_epochs"):  # one frozen epoch, then one with the backbone training
        settings += ["train.optimizer.freeze_backbone_epochs=1", "train.max_epochs=2"]
    return settings


def apply_profile(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Write the profile's settings into `tree` once (then the user's overrides again, so they win)."""
    if tree.get("profile") != "smoke" or tree.get("profile_applied"):
        return tree
    tree = apply_overrides(tree, smoke_settings(tree))
    tree = apply_overrides(tree, overrides)
    tree["profile_applied"] = True
    return tree


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read a YAML parameter file (safe loader), apply `--set` overrides and validate.

    With no path, the defaults are used and `experiment` must come from an override.
    """
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.is_file():
            raise ParamsError(f"parameter file {file} does not exist; pass a YAML file such as params/demo.yaml")
        try:
            loaded = safe_load_unique(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ParamsError(f"parameter file {file} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ParamsError(f"parameter file {file} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    if overrides:
        source += " with overrides " + " ".join(overrides)
        tree = apply_overrides(tree, list(overrides))
    tree = apply_profile(tree, list(overrides or []))
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, source)) from None


def dump_params(params: Params, path: str | Path) -> None:
    """Write parameters as YAML (atomically) so a run can be reproduced from its directory."""

    data = params.model_dump(mode="json")
    write_text_atomic(Path(path), yaml.safe_dump(data, sort_keys=False))

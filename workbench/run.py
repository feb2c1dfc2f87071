"""The run directory and the run's provenance: the one place that names the files of a run.

A run lives in `<reports>/<experiment>/<run-id>/`::

    params.yaml                     the parameters the run was created with (frozen; every stage reads them)
    run.json                        status, timings, git commit and dirty flag, package versions, per-notebook
                                    status and source hash
    index.html                      the run's landing page
    tracking.json                   the MLflow run every stage reports to (when train.tracking.uri is set)
    metrics.json                    the merged flat metrics of every stage
    <notebook>.ipynb / .html        the executed notebooks (`.inputs/` holds them while they are staged)
    metrics/<stage>.json            each stage's flat metrics
    data/                           catalog.parquet (with this run's split), normalization_stats.json,
                                    store.json (the store's path and content fingerprint at the start)
    figures/                        PNG figures (and split_map.html)
    diagnostics/                    per-chip Parquet files, per-region and threshold-sweep JSON, CSV tables
    predictions/<name>.zarr         logits of each predicted split
    model/                          the model bundle: model.pt, normalization_stats.json, calibration.json,
                                    run_info.json, input_profile.json
    checkpoints/                    resumable Lightning checkpoints (best-*.ckpt, last.ckpt)
    logs/metrics.csv                Lightning's CSV log
    failures/                       the chips of a batch whose loss was not finite
    snapshots/                      weight snapshots for a model soup
    folds/fold-<k>/                 one out-of-fold model's own run-like directory

`<reports>/index.html` lists every run. `STAGES` is the list of stages: their notebooks, in the
order a run executes them, and the names of their metric files. The provenance helpers
(project root, git commit, package versions, run ids) are what `run.json` and a bundle's
`run_info.json` record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from workbench.params import Params, ParamsError, dump_params, load_params

# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its notebook (without `.py`) and the name of its `metrics/<name>.json` file."""

    notebook: str
    metrics: str


DATA_AUDIT = Stage("01_data_audit", "audit_data")
TRAINING = Stage("02_train", "train")
CALIBRATION = Stage("03_calibrate", "calibration")
REVIEW = Stage("04_label_noise_review", "review")
STAGES = (DATA_AUDIT, TRAINING, CALIBRATION, REVIEW)
NOTEBOOKS = [stage.notebook for stage in STAGES]
STAGE_NAMES = [*NOTEBOOKS, *(name[:2] for name in NOTEBOOKS)]
"""Names a command line accepts for a stage: the notebook name or its two-digit prefix."""

# --------------------------------------------------------------------------- file and folder names

PARAMS_FILE = "params.yaml"
RUN_FILE = "run.json"
HEARTBEAT_FILE = "heartbeat.json"  # rewritten every few seconds by the process running the run
METRICS_FILE = "metrics.json"
INDEX_FILE = "index.html"
STAGED_DIR = ".inputs"
METRICS_DIR = "metrics"
DATA_DIR = "data"
CATALOG_FILE = "catalog.parquet"
STATS_FILE = "normalization_stats.json"  # in data/ (train-split statistics) and in a model bundle
STORE_RECORD_FILE = "store.json"  # in data/: the store the run started with and its content fingerprint
FIGURES_DIR = "figures"
DIAGNOSTICS_DIR = "diagnostics"
PREDICTIONS_DIR = "predictions"
MODEL_DIR = "model"
MODEL_FILE = "model.pt"
CALIBRATION_FILE = "calibration.json"
RUN_INFO_FILE = "run_info.json"
CHECKSUMS_FILE = "checksums.json"  # in a model bundle: sha256 of each of its files
INPUT_PROFILE_FILE = "input_profile.json"  # in a model bundle: chip size, pixel size, per-band value scale
TRACKING_FILE = "tracking.json"  # the MLflow run this run reports to (tracking URI, experiment, run id)
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # the name Lightning's ModelCheckpoint gives the resume point
LOGS_DIR = "logs"
LOG_FILE = "metrics.csv"  # what Lightning's CSVLogger writes in logs/
FAILURES_DIR = "failures"
SNAPSHOTS_DIR = "snapshots"
CANDIDATES_DIR = "candidates"
FINAL_WEIGHTS_TABLE = "train_final_weights.csv"  # in diagnostics/
FOLDS_DIR = "folds"
INTERACTIVE_RUN = "interactive"  # the run id of notebooks opened by hand
RUN_DIR_VARIABLE = "WORKBENCH_RUN_DIR"  # set by `workbench lab RUN`: the run notebooks opened by hand work in


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory (nothing is created by asking for a path)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def at(cls, reports: str | Path, experiment: str, run_id: str) -> RunLayout:
        """The run `<reports>/<experiment>/<run_id>`."""
        return cls(Path(reports) / experiment / run_id)

    # run records
    @property
    def params(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def info(self) -> Path:
        """run.json."""
        return self.root / RUN_FILE

    @property
    def heartbeat(self) -> Path:
        """heartbeat.json: the running process's id, host and last beat, so other hosts can tell it is alive."""
        return self.root / HEARTBEAT_FILE

    @property
    def metrics(self) -> Path:
        """metrics.json: the merged metrics of every stage."""
        return self.root / METRICS_FILE

    @property
    def tracking(self) -> Path:
        """tracking.json: the MLflow run of this run (written by `workbench.tracking`)."""
        return self.root / TRACKING_FILE

    @property
    def metrics_dir(self) -> Path:
        return self.root / METRICS_DIR

    def stage_metrics(self, stage: str | Stage) -> Path:
        """`metrics/<stage>.json` of one stage (a Stage or its metrics name)."""
        name = stage.metrics if isinstance(stage, Stage) else stage
        return self.metrics_dir / f"{name}.json"

    @property
    def landing(self) -> Path:
        """index.html: the run's landing page (its notebooks as HTML, figures, metrics)."""
        return self.root / INDEX_FILE

    # executed notebooks
    def notebook(self, name: str) -> Path:
        """The executed notebook `<name>.ipynb`."""
        return self.root / f"{name}.ipynb"

    def notebook_html(self, name: str) -> Path:
        """The executed notebook rendered as `<name>.html`."""
        return self.root / f"{name}.html"

    def staged_notebook(self, name: str) -> Path:
        """Where a notebook waits, converted from its percent script, while papermill executes it."""
        return self.root / STAGED_DIR / f"{name}.ipynb"

    # prepared data
    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def catalog(self) -> Path:
        """data/catalog.parquet: the store's catalog with this run's split."""
        return self.data / CATALOG_FILE

    @property
    def store_record(self) -> Path:
        """data/store.json: the chip store the run started with and its content fingerprint."""
        return self.data / STORE_RECORD_FILE

    @property
    def normalization_stats(self) -> Path:
        """data/normalization_stats.json: the train-split statistics."""
        return self.data / STATS_FILE

    # stage outputs
    @property
    def figures(self) -> Path:
        return self.root / FIGURES_DIR

    def figure(self, name: str, suffix: str = ".png") -> Path:
        """`figures/<name>.png` (`name` may hold a sub-folder)."""
        return self.figures / f"{name}{suffix}"

    @property
    def diagnostics(self) -> Path:
        return self.root / DIAGNOSTICS_DIR

    def diagnostic(self, name: str) -> Path:
        """`diagnostics/<name>` (a file name with its suffix)."""
        return self.diagnostics / name

    @property
    def data_audit_chips(self) -> Path:
        """diagnostics/data_audit_chips.parquet: the data audit's one row per chip."""
        return self.diagnostic("data_audit_chips.parquet")

    @property
    def review_ranking(self) -> Path:
        """diagnostics/review.parquet: the label-noise ranking, sorted by rank (rank, score, signals first)."""
        return self.diagnostic("review.parquet")

    @property
    def review_annotators(self) -> Path:
        """diagnostics/review_annotators.csv: each annotator against the leave-one-out consensus."""
        return self.diagnostic("review_annotators.csv")

    @property
    def review_map(self) -> Path:
        """figures/review_map.html: the standalone (offline) review map of chip footprints and label-noise layers."""
        return self.figure("review_map", ".html")

    @property
    def label_corrected(self) -> Path:
        """diagnostics/label_corrected.csv: raw and label-corrected metrics per split and region."""
        return self.diagnostic("label_corrected.csv")

    @property
    def label_corrected_calibrated(self) -> Path:
        """diagnostics/label_corrected_calibrated.csv: raw and label-corrected metrics at the calibrated thresholds."""
        return self.diagnostic("label_corrected_calibrated.csv")

    @property
    def ledger_record(self) -> Path:
        """data/ledger.json: which review ledger (path, line count, sha256) the run's stages applied."""
        return self.data / "ledger.json"

    def confusion(self, split: str, by: str | None = None) -> Path:
        """`diagnostics/confusion_<split>.csv` (counts [label, prediction] of a softmax model), or with `by`
        (region, year) `confusion_<split>_<by>.csv`: one confusion matrix per group, long format."""
        return self.diagnostic(f"confusion_{split}.csv" if by is None else f"confusion_{split}_{by}.csv")

    def reliability(self, split: str) -> Path:
        """`diagnostics/reliability_<split>.csv`: reliability bins of a softmax model (top-label and one-vs-rest
        per class, before and after temperature scaling), long format."""
        return self.diagnostic(f"reliability_{split}.csv")

    def class_metrics(self, split: str) -> Path:
        """`diagnostics/class_metrics_<split>.csv`: per-class IoU / F1 / precision / recall of a softmax model,
        pooled and per region and year."""
        return self.diagnostic(f"class_metrics_{split}.csv")

    def per_chip(self, split: str) -> Path:
        """`diagnostics/per_chip_<split>.parquet`: per-chip scores of a predicted split at the default threshold."""
        return self.diagnostic(f"per_chip_{split}.parquet")

    @property
    def predictions_dir(self) -> Path:
        return self.root / PREDICTIONS_DIR

    def predictions(self, name: str) -> Path:
        """`predictions/<name>.zarr`: the logits of a split (or of other named predictions)."""
        return self.predictions_dir / f"{name}.zarr"

    # the model bundle
    @property
    def model(self) -> Path:
        """model/: the bundle used by calibration, review and `workbench predict`."""
        return self.root / MODEL_DIR

    @property
    def weights(self) -> Path:
        return self.model / MODEL_FILE

    @property
    def model_stats(self) -> Path:
        """The bundle's copy of the normalisation statistics (of exactly the model's bands)."""
        return self.model / STATS_FILE

    @property
    def calibration(self) -> Path:
        return self.model / CALIBRATION_FILE

    @property
    def run_info(self) -> Path:
        return self.model / RUN_INFO_FILE

    @property
    def input_profile(self) -> Path:
        """What the model was trained on (chip size, pixel size, band value scale), checked by predict."""
        return self.model / INPUT_PROFILE_FILE

    # training
    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def training_log(self) -> Path:
        """logs/metrics.csv: Lightning's per-step and per-epoch metrics."""
        return self.logs / LOG_FILE

    @property
    def failures(self) -> Path:
        return self.root / FAILURES_DIR

    @property
    def snapshots(self) -> Path:
        return self.root / SNAPSHOTS_DIR

    @property
    def weight_candidates(self) -> Path:
        """checkpoints/candidates/<name>.pt: the candidates for the final weights (removed once one is chosen)."""
        return self.checkpoints / CANDIDATES_DIR

    @property
    def folds(self) -> Path:
        return self.root / FOLDS_DIR

    def fold(self, k: int) -> RunLayout:
        """The run-like directory of the out-of-fold model of fold `k`."""
        return RunLayout(self.folds / f"fold-{k}")

    def sweep_leftovers(self) -> list[str]:
        """Remove temporary files of dead writers in this run's folders; one line per finding (see io)."""
        from workbench.io import sweep_leftovers

        lines = []
        for folder in (
            self.root,
            self.data,
            self.model,
            self.checkpoints,
            self.figures,
            self.diagnostics,
            self.metrics_dir,
            self.predictions_dir,
            self.snapshots,
        ):
            summary = sweep_leftovers(folder).summary()
            if summary:
                lines.append(f"{folder}: {summary}")
        return lines

    # frozen parameters
    def freeze_params(self, params: Params) -> Path:
        """Write the run's parameters to params.yaml."""
        dump_params(params, self.params)
        return self.params

    def frozen_params(self, overrides: Sequence[str] = ()) -> Params | None:
        """The parameters frozen in params.yaml (None when there is none).

        `overrides` are checked against them: the ones the run was created with change nothing and
        pass; any that would change a value raise ParamsError, since the run's data, model and
        metrics come from the frozen values.
        """
        if not self.params.is_file():
            return None
        frozen = load_params(self.params)
        if overrides:
            changed = param_differences(frozen, load_params(self.params, list(overrides)))
            if changed:
                raise ParamsError(
                    f"run {self.root} was created with the parameters in {self.params}; the overrides "
                    f"{' '.join(overrides)} would change {', '.join(changed)}. Start a new run directory "
                    "to use other parameters"
                )
        return frozen

    def check_params(self, params: Params) -> None:
        """Raise ParamsError when the run has frozen parameters and `params` differ from them."""
        frozen = self.frozen_params()
        if frozen is None:
            return
        changed = param_differences(frozen, params)
        if changed:
            raise ParamsError(
                f"the parameters given differ from those frozen in {self.params} in {', '.join(changed)}; "
                "a stage works with the run's frozen parameters (read them with RunLayout.frozen_params), "
                "or start a new run directory"
            )


def mlflow_tracking_uri(uri: str) -> str:
    """The MLflow URI for `train.tracking.uri`; a plain path becomes an absolute `file:` URI.

    MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set, so it is set for file
    stores (the database stores need SQLAlchemy, which the skinny client does not install).
    """
    import os

    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def index_file(reports: str | Path) -> Path:
    """`<reports>/index.html`: the table of every run."""
    return Path(reports) / INDEX_FILE


def run_records(reports: str | Path) -> Iterator[Path]:
    """The run.json of every run under `reports`."""
    return Path(reports).glob(f"*/*/{RUN_FILE}")


def param_differences(a: Params, b: Params) -> list[str]:
    """Dotted keys whose values differ between two parameter sets."""
    left, right = flat_params(a), flat_params(b)
    return sorted(key for key in left.keys() | right.keys() if left.get(key) != right.get(key))


# Parameters a model's weights depend on: a checkpoint trained with other values of these is not resumed.
# train.max_epochs may grow between a finished run and its resumption (training for longer).
TRAINING_SECTIONS = ("seed", "data", "model", "train")
RESUMABLE_CHANGES = ("train.max_epochs",)


def flat_params(params: Params) -> dict[str, Any]:
    """The parameters as one flat dict of dotted keys (JSON values)."""

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            out: dict[str, Any] = {}
            for key, value in tree.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): tree}

    return flat(params.model_dump(mode="json"))


def training_params(params: Params) -> dict[str, Any]:
    """The flat parameters that decide a model's weights (`TRAINING_SECTIONS` less `RESUMABLE_CHANGES`)."""
    return {
        key: value
        for key, value in flat_params(params).items()
        if key.split(".")[0] in TRAINING_SECTIONS and key not in RESUMABLE_CHANGES
    }


def params_hash(values: dict[str, Any]) -> str:
    """sha256 of a flat parameter dict (key order does not matter)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the notebook sources a run executed)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- provenance

PACKAGES = ["torch", "lightning", "segmentation-models-pytorch", "terratorch", "xarray", "zarr", "papermill"]


def project_root() -> Path:
    """The repository root (the folder holding notebooks/ and params/)."""
    return Path(__file__).resolve().parents[1]


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def git_commit(root: Path) -> str | None:
    """The current commit of the project, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_dirty(root: Path) -> bool | None:
    """Whether tracked files of the project (package, notebooks, parameters) differ from the commit.

    None outside a git checkout. Untracked files do not count; a notebook cell added while exploring and
    autosaved into its tracked `.py` does.
    """
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def package_versions() -> dict[str, str]:
    """Python's version and those of the installed `PACKAGES`."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def new_run_id(seed: int | None = None) -> str:
    """Sortable, unique-enough run id: UTC time plus the seed when several seeds run."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    return f"{stamp}-s{seed}" if seed is not None else stamp


# --------------------------------------------------------------------------- launchers (torchrun, SLURM)


def launcher_run_id(env: Mapping[str, str] | None = None) -> str | None:
    """The run id a cluster launcher gives every process of one job, so all ranks share one run directory.

    SLURM: `slurm-<job id>` (plus `.<step id>` for a step of a batch job); torchrun: `torchrun-<rdzv id>`
    when a rendezvous id is set (`--rdzv-id`, or the one `--standalone` draws). None outside a launcher.
    """
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if job:
        step = env.get("SLURM_STEP_ID")
        return f"slurm-{job}.{step}" if step else f"slurm-{job}"
    elastic = env.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic.lower() != "none":
        return f"torchrun-{elastic}"
    return None


def launcher_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank under a launcher (RANK from torchrun, SLURM_PROCID from srun); 0 otherwise."""
    env = os.environ if env is None else env
    for name in ("RANK", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def launcher_world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes in the launched job (WORLD_SIZE from torchrun, SLURM_NTASKS from srun); 1 otherwise."""
    env = os.environ if env is None else env
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 1

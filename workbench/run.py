"""The run directory and the run's provenance: the one place that names the files of a run.

A run lives in `<reports>/<experiment>/<run-id>/`::

    params.yaml                     the parameters the run was created with (frozen; every stage reads them)
    run.json                        status, timings, git commit, package versions, per-notebook status
    metrics.json                    the merged flat metrics of every stage
    <notebook>.ipynb / .html        the executed notebooks (`.inputs/` holds them while they are staged)
    metrics/<stage>.json            each stage's flat metrics
    data/                           catalog.parquet (with this run's split), normalization_stats.json
    figures/                        PNG figures (and split_map.html)
    diagnostics/                    per-chip Parquet files, per-region and threshold-sweep JSON, CSV tables
    predictions/<name>.zarr         logits of each predicted split
    model/                          the model bundle: model.pt, normalization_stats.json, calibration.json,
                                    run_info.json
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

import platform
import subprocess
from collections.abc import Iterator, Sequence
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

# --------------------------------------------------------------------------- file and folder names

PARAMS_FILE = "params.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
INDEX_FILE = "index.html"
STAGED_DIR = ".inputs"
METRICS_DIR = "metrics"
DATA_DIR = "data"
CATALOG_FILE = "catalog.parquet"
STATS_FILE = "normalization_stats.json"  # in data/ (train-split statistics) and in a model bundle
FIGURES_DIR = "figures"
DIAGNOSTICS_DIR = "diagnostics"
PREDICTIONS_DIR = "predictions"
MODEL_DIR = "model"
MODEL_FILE = "model.pt"
CALIBRATION_FILE = "calibration.json"
RUN_INFO_FILE = "run_info.json"
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
    def metrics(self) -> Path:
        """metrics.json: the merged metrics of every stage."""
        return self.root / METRICS_FILE

    @property
    def metrics_dir(self) -> Path:
        return self.root / METRICS_DIR

    def stage_metrics(self, stage: str | Stage) -> Path:
        """`metrics/<stage>.json` of one stage (a Stage or its metrics name)."""
        name = stage.metrics if isinstance(stage, Stage) else stage
        return self.metrics_dir / f"{name}.json"

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


def index_file(reports: str | Path) -> Path:
    """`<reports>/index.html`: the table of every run."""
    return Path(reports) / INDEX_FILE


def run_records(reports: str | Path) -> Iterator[Path]:
    """The run.json of every run under `reports`."""
    return Path(reports).glob(f"*/*/{RUN_FILE}")


def param_differences(a: Params, b: Params) -> list[str]:
    """Dotted keys whose values differ between two parameter sets."""

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            out: dict[str, Any] = {}
            for key, value in tree.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): tree}

    left, right = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return sorted(key for key in left.keys() | right.keys() if left.get(key) != right.get(key))


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

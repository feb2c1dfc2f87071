"""Crash-safe training logs: Lightning's CSVLogger with every save of ``metrics.csv`` an atomic replacement.

Lightning's CSV experiment writer appends rows to ``metrics.csv`` in place and rewrites it in place
when a new column appears, so a kill or a full disk during a save leaves a torn row (or a truncated
file) under the final name. `AtomicCSVLogger` keeps the rows in memory and writes the whole file to
a temporary file in the same folder, fsyncs it and renames it over ``metrics.csv``
(`workbench.io.write_text_atomic`, with its free-space check): the file on disk is always the
complete log of the last save. On a resumed training run the rows already logged are kept (read
with `workbench.train.log.read_log_lines`, which drops a torn row) instead of being deleted.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from workbench.io import write_text_atomic
from workbench.train.log import read_log_lines


class AtomicExperimentWriter(ExperimentWriter):
    """The CSV experiment writer whose `save` replaces ``metrics.csv`` atomically with every row logged so far."""

    def __init__(self, log_dir: str, keep_existing: bool = False) -> None:
        self.keep_existing = keep_existing
        self.rows: list[dict[str, Any]] = []
        super().__init__(log_dir=log_dir)
        self.path = Path(self.metrics_file_path)
        if keep_existing and self.path.is_file():
            lines, _problems = read_log_lines(self.path)
            reader = csv.DictReader(io.StringIO("".join(lines)))
            self.rows = [dict(row) for row in reader]
            self.metrics_keys = sorted(reader.fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        if not self.keep_existing:  # a fresh run: Lightning's rule (an old metrics.csv is removed)
            super()._check_log_dir_exists()

    def save(self) -> None:
        """Write every row logged so far to a temporary file beside ``metrics.csv``, fsync, rename."""
        if not self.metrics:
            return
        self._record_new_keys()
        self.rows.extend(self.metrics)
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self.rows)
        os.makedirs(self.log_dir, exist_ok=True)
        write_text_atomic(self.path, buffer.getvalue())
        self.metrics = []


class AtomicCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing through `AtomicExperimentWriter`; `keep_existing` on a resumed run.

    The log is also saved after every checkpoint, so a run killed later resumes with every row up to
    its checkpoint on disk (the rows after it are logged again, with the same values, by the resumed run).
    """

    def __init__(self, *args: Any, keep_existing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_existing = keep_existing

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Save the rows logged so far together with each checkpoint (rank 0 only, like `save`)."""
        self.save()

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicExperimentWriter:  # type: ignore[override]
        """The run's experiment writer, created on first use (on rank 0 only, like Lightning's)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir, keep_existing=self.keep_existing)
        return self._experiment  # type: ignore[return-value]

"""The review ledger of a chip store: reviewers' decisions and corrected labels that later runs honour.

Where: beside the store, in ``<store>.review/`` (a store at ``data-cache/lakes`` has its ledger at
``data-cache/lakes.review/decisions.jsonl``), never inside a run directory, so every later run over the
same store sees it. ``review.ledger`` points elsewhere (for example when the store itself is read-only).

What: an append-only JSON-lines file. Its first line is a header naming the store it belongs to (a
fingerprint of the store's chip ids); each further line is one decision::

    {"chip_id": "...", "decision": "keep|drop|fix|unsure", "note": "...", "reviewer": "...",
     "time": "2024-05-01T12:00:00+00:00", "corrected": "corrected/<file>.npy" (fix only), "sha256": "..."}

Every line is written under an exclusive lock, flushed and fsynced before `Ledger.record` returns, so a
decision the review widget confirms is on disk; a crash loses at most the line being written, and a torn
line is reported and skipped without losing any other decision. Corrected labels ("fix") are stored as
their own planes, one ``.npy`` (uint8, the chip's height x width, 0/1) per correction in
``<store>.review/corrected/``, written atomically before the line that names them; the store's labels are
never rewritten.

Which decision counts: the latest line of a chip wins (file order, which is time order). When one chip
has different decisions (or the same decision by different reviewers), `Ledger.conflicts` lists them so
they can be settled by a new decision; the latest still wins until then.

Training and evaluation apply the ledger (`apply_ledger`): chips whose latest decision is "drop" leave
their split, chips whose latest decision is "fix" are trained and scored on their corrected label.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.io import append_line, fsync_path, write_bytes_atomic

DECISIONS = ("keep", "drop", "fix", "unsure")
LEDGER_FORMAT = "workbench-review-ledger"
LEDGER_VERSION = 1
DECISIONS_FILE = "decisions.jsonl"
CORRECTED_DIR = "corrected"
DROPPED_SPLIT = "dropped"


class LedgerError(ValueError):
    """The review ledger cannot be read or written as asked; the message names the file and the fix."""


class LedgerLockedError(LedgerError):
    """Another process holds the ledger's lock; the decision was not written."""


class LedgerWarning(UserWarning):
    """A line of a review ledger could not be read and was skipped."""


@dataclass(frozen=True)
class LedgerEntry:
    """One human decision about one chip, as stored in the ledger."""

    chip_id: str
    decision: str
    note: str = ""
    reviewer: str = ""
    time: str = ""
    corrected: str = ""  # path of the corrected label plane, relative to the ledger's folder (fix only)
    sha256: str = ""  # of the corrected label file
    line: int = 0  # line number in the ledger (1 = header)


def ledger_path(store: str | Path, override: str | Path | None = None) -> Path:
    """The ledger file of `store`: `override`, else ``<store>.review/decisions.jsonl`` beside the store."""
    if override is not None:
        return Path(override)
    store = Path(store)
    return store.parent / f"{store.name}.review" / DECISIONS_FILE


def store_fingerprint(chip_ids: Iterable[str]) -> str:
    """Identity of a store for its ledger: sha256 over its chip ids in store order (16 hex digits)."""
    digest = hashlib.sha256()
    for chip_id in chip_ids:
        digest.update(str(chip_id).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def _safe_name(chip_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", chip_id)[:80]
    return f"{stem}-{hashlib.sha256(chip_id.encode('utf-8')).hexdigest()[:8]}"


class Ledger:
    """The review ledger of one chip store (see the module docstring for where and what).

    `chip_ids` are the store's chip ids in store order and `chip_shape` its (height, width); both come from
    the store when `Ledger.for_store` opens it. Decisions for chips outside `chip_ids` are refused.
    """

    def __init__(
        self, path: str | Path, chip_ids: Iterable[str], chip_shape: tuple[int, int], store: str | Path = ""
    ) -> None:
        self.path = Path(path)
        self.root = self.path.parent
        self.store = str(store)
        self.chip_ids = [str(chip_id) for chip_id in chip_ids]
        self._known = set(self.chip_ids)
        self.chip_shape = (int(chip_shape[0]), int(chip_shape[1]))
        self.fingerprint = store_fingerprint(self.chip_ids)
        self.problems: list[str] = []

    @classmethod
    def for_store(cls, store: str | Path, path: str | Path | None = None) -> Ledger:
        """The ledger of a chip store (created on the first decision)."""
        from workbench.data.store import ChipReader, read_catalog

        store = Path(store)
        catalog = read_catalog(store)
        reader = ChipReader(store, "label")
        shape = reader.chip_shape
        reader.close()
        return cls(ledger_path(store, path), catalog["chip_id"].astype(str), (shape[0], shape[1]), store)

    # ------------------------------------------------------------------ writing
    def _header(self) -> dict[str, Any]:
        return {
            "ledger": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "store": self.store,
            "fingerprint": self.fingerprint,
            "n_chips": len(self.chip_ids),
            "chip_shape": list(self.chip_shape),
        }

    def check_chip(self, chip_id: str) -> None:
        """Refuse a chip id the store's catalog does not have."""
        if chip_id not in self._known:
            close = [known for known in self.chip_ids if chip_id and chip_id in known][:3]
            hint = f" (similar: {close})" if close else ""
            raise LedgerError(f"{self.path}: chip {chip_id!r} is not in the store's catalog{hint}")

    def record(
        self,
        chip_id: str,
        decision: str,
        note: str = "",
        reviewer: str = "",
        corrected: np.ndarray | None = None,
    ) -> LedgerEntry:
        """Append one decision; for "fix", `corrected` is the corrected label (height x width, 0/1).

        Returns only once the line (and a corrected label) is fsynced. Raises `LedgerError` (nothing
        written) for an unknown chip, a bad decision, a corrected label of the wrong shape or values, a
        ledger of another store, a read-only ledger, or `LedgerLockedError` when another writer holds it.
        """
        if not isinstance(chip_id, str) or not chip_id:
            raise LedgerError(f"{self.path}: chip_id must be a non-empty string, got {chip_id!r}")
        if decision not in DECISIONS:
            raise LedgerError(f"{self.path}: decision must be one of {DECISIONS}, got {decision!r}")
        self.check_chip(chip_id)
        if decision == "fix" and corrected is None:
            raise LedgerError(f"{self.path}: a 'fix' of chip {chip_id!r} needs the corrected label")
        if decision != "fix" and corrected is not None:
            raise LedgerError(f"{self.path}: only a 'fix' carries a corrected label (chip {chip_id!r})")
        label = None if corrected is None else self._check_label(chip_id, corrected)
        self._check_existing_header()
        entry = {
            "chip_id": chip_id,
            "decision": decision,
            "note": str(note),
            "reviewer": str(reviewer),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with self._locked() as handle:
            if label is not None:
                relative, digest = self._write_label(chip_id, label)
                entry["corrected"], entry["sha256"] = relative, digest
            append_line(handle, json.dumps(entry, ensure_ascii=False))
        lines = self.line_count()
        return LedgerEntry(**{key: str(value) for key, value in entry.items()}, line=lines)

    def _check_label(self, chip_id: str, corrected: np.ndarray) -> np.ndarray:
        label = np.asarray(corrected)
        if label.shape != self.chip_shape:
            raise LedgerError(
                f"{self.path}: corrected label of chip {chip_id!r} has shape {label.shape}, "
                f"expected {self.chip_shape} like the store's chips"
            )
        if label.dtype == bool:
            return label.astype(np.uint8)
        if not np.isin(label, (0, 1)).all():
            raise LedgerError(
                f"{self.path}: corrected label of chip {chip_id!r} must hold 0/1 values, got {np.unique(label)[:8]}"
            )
        return label.astype(np.uint8)

    def _locked(self) -> Any:
        ledger = self

        class _Lock:
            def __enter__(self) -> Any:
                import fcntl

                try:
                    ledger.root.mkdir(parents=True, exist_ok=True)
                    created = not ledger.path.exists()
                    self.handle = open(ledger.path, "a+b")
                except PermissionError:
                    raise LedgerError(
                        f"{ledger.path}: the review ledger is not writable; make it writable or set "
                        "review.ledger to a writable file (the decision was not recorded)"
                    ) from None
                except OSError as error:
                    raise LedgerError(f"{ledger.path}: cannot open the review ledger ({error})") from None
                try:
                    fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as error:
                    self.handle.close()
                    if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise LedgerLockedError(
                            f"{ledger.path}: another process is writing the review ledger; "
                            "try again (the decision was not recorded)"
                        ) from None
                    raise
                if created or self.handle.seek(0, os.SEEK_END) == 0:
                    append_line(self.handle, json.dumps(ledger._header(), ensure_ascii=False))
                    fsync_path(ledger.root)
                return self.handle

            def __exit__(self, *exc: Any) -> None:
                import fcntl

                fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
                self.handle.close()

        return _Lock()

    def _write_label(self, chip_id: str, label: np.ndarray) -> tuple[str, str]:
        import io

        buffer = io.BytesIO()
        np.save(buffer, label, allow_pickle=False)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{CORRECTED_DIR}/{_safe_name(chip_id)}-{digest[:12]}.npy"
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, data)
        return relative, digest

    # ------------------------------------------------------------------ reading
    def _check_existing_header(self) -> None:
        if not self.path.exists():
            return
        try:
            with open(self.path, encoding="utf-8") as handle:
                first = handle.readline()
        except PermissionError:
            raise LedgerError(f"{self.path}: the review ledger is not readable; check its permissions") from None
        if not first.strip():
            return
        self._check_header(first)

    def _check_header(self, text: str) -> None:
        try:
            header = json.loads(text)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("ledger") != LEDGER_FORMAT:
            raise LedgerError(
                f"{self.path}: the first line is not a review-ledger header; this file is not a review ledger "
                "(move it away or set review.ledger to another file)"
            )
        if header.get("fingerprint") != self.fingerprint:
            raise LedgerError(
                f"{self.path}: this ledger belongs to another store ({header.get('store') or 'unknown'}, "
                f"{header.get('n_chips')} chips, fingerprint {header.get('fingerprint')}), not to "
                f"{self.store or 'this store'} ({len(self.chip_ids)} chips, fingerprint {self.fingerprint}); "
                "point review.ledger at the right file"
            )

    def read(self) -> list[LedgerEntry]:
        """All readable decisions in file order; torn or invalid lines are warned about and skipped.

        Raises `LedgerError` when the file belongs to another store.
        """
        self.problems = []
        if not self.path.exists():
            return []
        entries: list[LedgerEntry] = []
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for number, text in enumerate(handle, start=1):
                if number == 1:
                    self._check_header(text)
                    continue
                if not text.strip():
                    continue
                try:
                    entries.append(self._parse(text, number))
                except (ValueError, TypeError, KeyError) as exc:
                    problem = f"{self.path}:{number}: skipped unreadable review decision ({exc})"
                    self.problems.append(problem)
                    warnings.warn(problem, LedgerWarning, stacklevel=2)
        return entries

    def _parse(self, text: str, number: int) -> LedgerEntry:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        chip_id, decision = record.get("chip_id"), record.get("decision")
        if not isinstance(chip_id, str) or not chip_id:
            raise ValueError("chip_id missing")
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r} is not one of {DECISIONS}")
        if chip_id not in self._known:
            raise ValueError(f"chip {chip_id!r} is not in the store's catalog")
        if decision == "fix" and not record.get("corrected"):
            raise ValueError("a 'fix' without its corrected label")
        fields = ("note", "reviewer", "time", "corrected", "sha256")
        return LedgerEntry(
            chip_id=chip_id, decision=decision, line=number, **{key: str(record.get(key, "")) for key in fields}
        )

    def latest(self) -> dict[str, LedgerEntry]:
        """The latest decision of each chip (later lines win)."""
        return {entry.chip_id: entry for entry in self.read()}

    def conflicts(self) -> pd.DataFrame:
        """Chips with different decisions, or one decision by different reviewers, and which one counts now.

        Columns: chip_id, decisions (in file order), reviewers, lines, current (the latest decision).
        """
        by_chip: dict[str, list[LedgerEntry]] = {}
        for entry in self.read():
            by_chip.setdefault(entry.chip_id, []).append(entry)
        rows = []
        for chip_id, entries in by_chip.items():
            decisions = [entry.decision for entry in entries]
            reviewers = [entry.reviewer for entry in entries]
            if len(set(decisions)) > 1 or len(set(reviewers)) > 1:
                rows.append(
                    {
                        "chip_id": chip_id,
                        "decisions": decisions,
                        "reviewers": reviewers,
                        "lines": [entry.line for entry in entries],
                        "current": decisions[-1],
                    }
                )
        return pd.DataFrame(rows, columns=["chip_id", "decisions", "reviewers", "lines", "current"])

    def table(self) -> pd.DataFrame:
        """The latest decision per chip as a table (chip_id, decision, note, reviewer, time, corrected, line)."""
        columns = ["chip_id", "decision", "note", "reviewer", "time", "corrected", "sha256", "line"]
        return pd.DataFrame([asdict(entry) for entry in self.latest().values()], columns=columns)

    def dropped(self) -> set[str]:
        """Chips whose latest decision is "drop"."""
        return {chip_id for chip_id, entry in self.latest().items() if entry.decision == "drop"}

    def fixed(self) -> dict[str, Path]:
        """Chips whose latest decision is "fix", with the file of their corrected label."""
        return {
            chip_id: self.root / entry.corrected for chip_id, entry in self.latest().items() if entry.decision == "fix"
        }

    def corrected_label(self, chip_id: str) -> np.ndarray:
        """The corrected label of a fixed chip (checked against its recorded hash and the chip shape)."""
        entry = self.latest().get(chip_id)
        if entry is None or entry.decision != "fix":
            raise LedgerError(f"{self.path}: chip {chip_id!r} has no 'fix' decision")
        return load_corrected(self.root / entry.corrected, self.chip_shape, entry.sha256)

    def line_count(self) -> int:
        """Number of lines in the ledger file (header included); 0 when it does not exist."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as handle:
            return sum(1 for _ in handle)

    def provenance(self) -> dict[str, Any]:
        """Which ledger a run used: path, line count and sha256 of the file."""
        if not self.path.exists():
            return {"path": str(self.path), "lines": 0, "sha256": None}
        data = self.path.read_bytes()
        return {
            "path": str(self.path.resolve()),
            "lines": data.count(b"\n"),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


def load_corrected(path: Path, shape: tuple[int, int], sha256: str = "") -> np.ndarray:
    """Read a corrected label plane; a missing, altered or misshaped file is a `LedgerError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise LedgerError(f"{path}: corrected label missing or unreadable ({error})") from None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise LedgerError(f"{path}: corrected label does not match the hash its ledger line recorded")
    import io

    label = np.load(io.BytesIO(data), allow_pickle=False)
    if label.shape != tuple(shape):
        raise LedgerError(f"{path}: corrected label has shape {label.shape}, expected {tuple(shape)}")
    return label


@dataclass
class LedgerState:
    """What a run takes from a ledger: dropped store positions, corrected label files, provenance."""

    dropped: list[int]
    corrections: dict[int, Path]
    provenance: dict[str, Any]
    conflicts: int


def apply_ledger(
    store: str | Path, catalog: pd.DataFrame, enabled: bool | None = None, path: str | Path | None = None
) -> tuple[pd.DataFrame, LedgerState | None]:
    """Apply a store's ledger to a run's catalog: dropped chips move to split "dropped".

    `enabled` None means: when the ledger exists. Returns the (copied) catalog and the ledger state
    (None when not applied); the state's `corrections` map store positions to corrected label files.
    """
    store = Path(store)
    file = ledger_path(store, path)
    if enabled is False or (enabled is None and not file.exists()):
        return catalog, None
    if not file.exists():
        raise LedgerError(f"review.decisions is on but the ledger {file} does not exist; record decisions first")
    from workbench.data.store import ChipReader

    reader = ChipReader(store, "label")
    shape = reader.chip_shape
    reader.close()
    ids = catalog["chip_id"].astype(str)
    ledger = Ledger(file, ids, (shape[0], shape[1]), store)
    latest = ledger.latest()
    position = {chip_id: index for index, chip_id in enumerate(ids)}
    dropped = sorted(position[c] for c, entry in latest.items() if entry.decision == "drop")
    corrections = {position[c]: ledger.root / e.corrected for c, e in latest.items() if e.decision == "fix"}
    for index, file_path in corrections.items():
        load_corrected(file_path, (shape[0], shape[1]), latest[ids.iloc[index]].sha256)
    updated = catalog.copy()
    if dropped:
        split = updated["split"].to_numpy(dtype=object).copy()
        split[dropped] = DROPPED_SPLIT
        updated["split"] = split
    state = LedgerState(dropped, corrections, ledger.provenance(), len(ledger.conflicts()))
    return updated, state

"""Human decisions of the label-noise review and the metrics they change.

`ReviewLog` keeps the decisions taken while looking at the ranked chips (keep, drop, fix, unsure) in an
append-only JSON-lines file that survives crashes; `review_decisions` reads the latest one per chip.
`corrected_metrics` recomputes the pooled IoU after dropping the chips judged mislabelled.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.data.agreement import require_columns
from workbench.functional import iou_score
from workbench.io import append_line_to

DECISIONS = ("keep", "drop", "fix", "unsure")


class ReviewLogWarning(UserWarning):
    """A line of a review log could not be read and was skipped."""


@dataclass(frozen=True)
class ReviewDecision:
    """One human decision about one chip."""

    chip_id: str
    decision: str
    note: str = ""
    reviewer: str = ""
    time: str = ""


def _parse_decision(text: str) -> ReviewDecision:
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    chip_id = record.get("chip_id")
    decision = record.get("decision")
    if not isinstance(chip_id, str) or not chip_id:
        raise ValueError("chip_id missing")
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r} is not one of {DECISIONS}")
    return ReviewDecision(
        chip_id=chip_id,
        decision=decision,
        note=str(record.get("note", "")),
        reviewer=str(record.get("reviewer", "")),
        time=str(record.get("time", "")),
    )


class ReviewLog:
    """Append-only JSON-lines file of review decisions; the latest line per chip wins.

    Every decision is written as one line, flushed and fsynced before `record` returns, so a crash loses
    at most the line being written. A damaged line (for example a half-written last line) is reported with
    a `ReviewLogWarning`, listed in `problems`, and skipped; the lines before and after it survive.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.problems: list[str] = []

    def record(self, chip_id: str, decision: str, note: str = "", reviewer: str = "") -> ReviewDecision:
        """Append one decision ("keep", "drop", "fix" or "unsure") for `chip_id`."""
        if not isinstance(chip_id, str) or not chip_id:
            raise ValueError(f"{self.path}: chip_id must be a non-empty string, got {chip_id!r}")
        if decision not in DECISIONS:
            raise ValueError(f"{self.path}: decision must be one of {DECISIONS}, got {decision!r}")
        entry = ReviewDecision(
            chip_id=chip_id,
            decision=decision,
            note=note,
            reviewer=reviewer,
            time=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._append(json.dumps(asdict(entry), ensure_ascii=False))
        return entry

    def _append(self, line: str) -> None:
        append_line_to(self.path, line)  # a damaged last line cannot swallow this decision

    def read(self) -> list[ReviewDecision]:
        """All readable decisions in file order; unreadable lines are warned about and skipped."""
        self.problems = []
        if not self.path.exists():
            return []
        decisions = []
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    decisions.append(_parse_decision(text))
                except (ValueError, TypeError) as exc:
                    problem = f"{self.path}:{number}: skipped unreadable review decision ({exc})"
                    self.problems.append(problem)
                    warnings.warn(problem, ReviewLogWarning, stacklevel=2)
        return decisions

    def latest(self) -> dict[str, ReviewDecision]:
        """The latest decision for each chip (later lines override earlier ones)."""
        return {decision.chip_id: decision for decision in self.read()}

    def chip_ids(self, decision: str = "drop") -> set[str]:
        """Chips whose latest decision is `decision`."""
        return {chip_id for chip_id, entry in self.latest().items() if entry.decision == decision}


def review_decisions(path: str | Path) -> pd.DataFrame:
    """The latest decision per chip in a review log as a table (chip_id, decision, note, reviewer, time)."""
    latest = ReviewLog(path).latest()
    columns = ["chip_id", "decision", "note", "reviewer", "time"]
    return pd.DataFrame([asdict(entry) for entry in latest.values()], columns=columns)


# --------------------------------------------------------------------------- corrected metrics


def _pooled_iou(stats: pd.DataFrame) -> float:
    tp, fp, fn = (float(stats[c].sum()) for c in ("tp", "fp", "fn"))
    return float(iou_score(tp, fp, fn, 0.0))


def corrected_metrics(
    per_chip_stats: pd.DataFrame, dropped: Iterable[str], group_column: str | None = None
) -> dict[str, Any]:
    """Pooled IoU = sum TP / sum (TP + FP + FN) before and after dropping the chips judged mislabelled.

    Returns iou, iou_corrected, delta, n_chips, n_dropped (dropped ids found in the table), n_kept and
    unmatched (dropped ids not in the table). With `group_column` (e.g. "region") also per_group:
    {group: {iou, iou_corrected, n_chips, n_dropped}}.
    """
    needed = ["chip_id", "tp", "fp", "fn"] + ([group_column] if group_column else [])
    require_columns(per_chip_stats, needed, "corrected_metrics")
    dropped_ids = {str(chip_id) for chip_id in dropped}
    is_dropped = per_chip_stats["chip_id"].astype(str).isin(dropped_ids)
    kept = per_chip_stats[~is_dropped]
    matched = set(per_chip_stats.loc[is_dropped, "chip_id"].astype(str))
    iou = _pooled_iou(per_chip_stats)
    iou_corrected = _pooled_iou(kept)
    result: dict[str, Any] = {
        "iou": iou,
        "iou_corrected": iou_corrected,
        "delta": iou_corrected - iou,
        "n_chips": len(per_chip_stats),
        "n_dropped": int(is_dropped.sum()),
        "n_kept": len(kept),
        "unmatched": sorted(dropped_ids - matched),
    }
    if group_column:
        per_group = {}
        for group, stats in per_chip_stats.groupby(group_column, sort=True):
            group_dropped = is_dropped.loc[stats.index]
            per_group[str(group)] = {
                "iou": _pooled_iou(stats),
                "iou_corrected": _pooled_iou(stats[~group_dropped]),
                "n_chips": len(stats),
                "n_dropped": int(group_dropped.sum()),
            }
        result["per_group"] = per_group
    return result

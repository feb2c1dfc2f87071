"""Which weights a run keeps: every candidate scored on the validation split, and a rule that picks one.

The candidates are the best checkpoint (with its EMA averages when EMA is on, since those were the
weights validated), the last step's weights (or, with SWA, the SWA average Lightning puts in their
place), the EMA averages and the uniform soup of the snapshots, whichever the run has. Each is loaded
into the task and run through one validation pass; `train.final_weights` picks the saved one:
``best_val`` (default) the best score by the checkpoint metric (`checkpoint_monitor`), or a candidate
by name. Without a validation split nothing can be scored, and the rule falls back to the last weights.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench.io import write_text_atomic
from workbench.params import Params
from workbench.run import FINAL_WEIGHTS_TABLE, RunLayout

CANDIDATE_ORDER = ("best", "last", "swa", "ema", "soup")


class FinalWeightsError(ValueError):
    """The rule names a candidate the run does not have."""


def load_candidates(run_dir: Path, best_checkpoint: Path | None) -> dict[str, dict[str, Any]]:
    """The candidates' task state dicts by name (loaded with weights_only=True)."""
    from workbench.train.ema import ema_weights_from_checkpoint

    directory = RunLayout(run_dir).weight_candidates
    found: dict[str, dict[str, Any]] = {}
    if best_checkpoint is not None and Path(best_checkpoint).is_file():
        checkpoint = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
        found["best"] = ema_weights_from_checkpoint(checkpoint) or dict(checkpoint["state_dict"])
    for name in CANDIDATE_ORDER[1:]:
        path = directory / f"{name}.pt"
        if path.is_file():
            found[name] = torch.load(path, map_location="cpu", weights_only=True)
    return found


def pick(table: pd.DataFrame, rule: str, mode: str) -> str:
    """The candidate the rule chooses from a scored table (columns candidate, score)."""
    names = list(table["candidate"])
    if rule != "best_val":
        if rule not in names:
            raise FinalWeightsError(
                f"train.final_weights={rule} but this run's candidates are {names}; enable it (train.ema, "
                "train.swa, train.swa.soup_snapshots) or choose one of them, or best_val"
            )
        return rule
    scored = table[table["score"].map(lambda v: isinstance(v, float) and math.isfinite(v))]
    if not len(scored):
        return "last" if "last" in names else names[0]
    order = scored.sort_values("score", ascending=mode == "min", kind="stable")
    return str(order["candidate"].iloc[0])


def score_candidate(task: Any, state: dict[str, Any], datamodule: Any, params: Params) -> dict[str, float]:
    """Validation metrics of one candidate (a plain validation pass, no callbacks, no logger)."""
    import lightning as L

    from workbench.train.hardware import resolve_hardware

    hardware = resolve_hardware(params, warn=False).train
    task.load_state_dict(state)
    trainer = L.Trainer(
        accelerator=hardware.accelerator,
        devices=1,
        precision=hardware.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
    )
    results = trainer.validate(task, dataloaders=datamodule.val_dataloader(), verbose=False)
    return {key: float(value) for key, value in (results[0] if results else {}).items()}


def choose_final_weights(
    params: Params,
    task: Any,
    datamodule: Any,
    run_dir: Path,
    best_checkpoint: Path | None,
    monitor: str = "val/iou",
    mode: str = "max",
) -> dict[str, Any]:
    """Score every candidate on the validation split, load the chosen one into `task`, and report.

    `monitor` / `mode` are the checkpoint metric (`workbench.train.fit.checkpoint_monitor`). Writes
    `diagnostics/train_final_weights.csv` and returns {"weights", "rule", "metric", "mode",
    "candidates": [{"candidate", "score", "val_loss", "val_iou", "chosen"}]}; removes the candidate files.
    """
    candidates = load_candidates(run_dir, best_checkpoint)
    if not candidates:
        return {}
    has_val = len(datamodule.dataset("val")) > 0
    rows = []
    for name, state in candidates.items():
        scores = score_candidate(task, state, datamodule, params) if has_val else {}
        rows.append(
            {
                "candidate": name,
                "score": scores.get(monitor, float("nan")),
                "val_loss": scores.get("val/loss", float("nan")),
                "val_iou": scores.get("val/iou", float("nan")),
            }
        )
    table = pd.DataFrame(rows)
    chosen = pick(table, params.train.final_weights, mode)
    table["chosen"] = table["candidate"] == chosen
    task.load_state_dict(candidates[chosen])
    write_text_atomic(RunLayout(run_dir).diagnostic(FINAL_WEIGHTS_TABLE), table.to_csv(index=False))
    shutil.rmtree(RunLayout(run_dir).weight_candidates, ignore_errors=True)
    return {
        "weights": chosen,
        "rule": params.train.final_weights,
        "metric": monitor,
        "mode": mode,
        "candidates": table.to_dict(orient="records"),
    }

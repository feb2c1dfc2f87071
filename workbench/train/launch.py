"""Training as its own process group, started from a notebook kernel.

Lightning refuses the `ddp` strategy inside a Jupyter kernel (it sees an interactive session), and
forking a kernel after CUDA is initialised is fragile. So when a run needs several processes
(`train.devices` > 1, `train.num_nodes` > 1, or a multi-process strategy), the training stage starts
`python -m workbench train RUN_DIR` as a child process: a plain script, in which Lightning's own
subprocess launcher starts the other local ranks (or, under torchrun or srun, the process joins the
launcher's process group). The child's output is streamed into the notebook as it comes, and when it
has finished the stage rebuilds the trained task from the model bundle it saved and goes on in the
kernel. Single-process runs train in the kernel as before.
"""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from workbench.params import Params
from workbench.run import RunLayout
from workbench.train.fit import TrainResult

SINGLE_PROCESS_STRATEGIES = {"auto", "single_device", "dp"}


class TrainingProcessError(RuntimeError):
    """The training process group ended with an error; the message holds its exit code and last output."""


def device_count(params: Params) -> int:
    """Devices per node that `train.devices` asks for ("auto" and -1 count the accelerator's devices)."""
    devices = params.train.devices
    if isinstance(devices, int) and devices > 0:
        return devices
    text = str(devices).strip()
    if text.isdigit():
        return int(text)
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    if text in {"auto", "-1"} and params.train.accelerator in {"gpu", "cuda", "auto"}:
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def needs_process_group(params: Params) -> bool:
    """Whether training runs as several processes (more than one device or node, or a DDP strategy)."""
    cfg = params.train
    return device_count(params) > 1 or cfg.num_nodes > 1 or cfg.strategy not in SINGLE_PROCESS_STRATEGIES


def train_command(run_dir: Path) -> list[str]:
    """The command that trains a prepared run directory with its frozen parameters."""
    return [sys.executable, "-m", "workbench", "train", str(Path(run_dir).resolve())]


def train_run(run_dir: Path) -> TrainResult:
    """Train the prepared run `run_dir` with its frozen parameters (what `workbench train` runs on every rank)."""
    from workbench.data.prepare import load_prepared
    from workbench.train.fit import train_model

    layout = RunLayout(Path(run_dir))
    params = layout.frozen_params()
    if params is None:
        raise FileNotFoundError(
            f"{layout.params} is missing; `workbench train` trains a run created by `workbench run`"
        )
    return train_model(params, load_prepared(layout.root, params.data), layout.root)


def launch_training(params: Params, prepared: Any, run_dir: Path, out: IO[str] | None = None) -> TrainResult:
    """Train in a child process group, stream its output to `out` (the notebook), and load what it trained.

    Stopping the notebook (interrupt, shutdown) ends the child and its ranks too.
    """
    out = sys.stdout if out is None else out
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        train_command(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=Path.cwd()
    )
    assert process.stdout is not None
    tail: list[str] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while chunk := process.stdout.read1(4096):  # type: ignore[attr-defined]
            text = decoder.decode(chunk)
            out.write(text)
            out.flush()
            tail = [*tail, text][-50:]
        code = process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if code != 0:
        last = "".join(tail).strip().splitlines()[-15:]
        raise TrainingProcessError(
            f"training process `{' '.join(train_command(run_dir))}` exited with code {code}; its last lines:\n"
            + "\n".join(last)
        )
    return load_trained(params, prepared, run_dir)


def load_trained(params: Params, prepared: Any, run_dir: Path) -> TrainResult:
    """The TrainResult of a run trained by another process: task and data module rebuilt, bundle weights loaded."""
    from workbench.data.loading import build_datamodule
    from workbench.io import read_json
    from workbench.models.bundle import load_bundle
    from workbench.run import TRAINING
    from workbench.train.fit import build_task

    layout = RunLayout(Path(run_dir))
    datamodule = build_datamodule(params, prepared)
    task = build_task(params, prepared, datamodule, layout.root)
    model = getattr(task.model, "_orig_mod", task.model)
    model.load_state_dict(load_bundle(layout.model).model.state_dict())
    metrics = read_json(layout.stage_metrics(TRAINING))
    best = sorted(layout.checkpoints.glob("best-*.ckpt"))
    return TrainResult(layout.model, best[-1] if best else None, metrics, task, datamodule)

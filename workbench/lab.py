"""`workbench lab [RUN]`: JupyterLab on this machine, with the project's settings, optionally on one run.

The server binds 127.0.0.1 (reach it from another machine through SSH port forwarding), reads the
project's Jupyter configuration in `jupyter/` (paired `.py` notebooks open as notebooks, the root is
the project folder) and takes its token from the JUPYTER_TOKEN environment variable, or a generated
one: the token is handed over in the environment, never on the command line where the process list
shows it, and the address printed before the server starts carries it, so a click opens the lab.

With RUN, the notebooks opened in this lab work in that run directory (WORKBENCH_RUN_DIR, read by
`workbench.notebook.open_run` when a notebook's `run_dir` is empty) with the run's frozen parameters.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from workbench.run import NOTEBOOKS, RUN_DIR_VARIABLE, RunLayout, project_root

LOCALHOST = "127.0.0.1"


class LabError(RuntimeError):
    """The lab cannot start as asked (busy port, a RUN that is not a run directory); the message says why."""


def lab_config_dir() -> Path:
    """The project's Jupyter configuration folder (server settings and JupyterLab setting overrides)."""
    return project_root() / "jupyter"


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """Whether a TCP server could listen on `host:port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(start: int = 8888, tries: int = 50, host: str = LOCALHOST) -> int:
    """The first free port from `start` on."""
    for port in range(start, start + tries):
        if port_is_free(port, host):
            return port
    raise LabError(f"no free port in {start}..{start + tries - 1} on {host}; pass another with --port")


def lab_url(port: int, token: str, path: str = "lab", host: str = LOCALHOST) -> str:
    """The address that opens JupyterLab (at `path`, e.g. `lab/tree/notebooks/01_data_audit.py`) with its token."""
    return f"http://{host}:{port}/{quote(path)}?token={quote(token)}"


def check_run_dir(run_dir: str | Path) -> Path:
    """The absolute run directory, or LabError when it is not a run (no frozen params.yaml)."""
    layout = RunLayout(Path(run_dir).expanduser().resolve())
    if not layout.root.is_dir():
        raise LabError(f"run directory {layout.root} does not exist; runs are under reports/<experiment>/<run-id>/")
    if not layout.params.is_file():
        raise LabError(
            f"{layout.root} is not a run directory (it has no {layout.params.name}); "
            "give a folder reports/<experiment>/<run-id>/ written by `workbench run`"
        )
    return layout.root


def ensure_kernel(prefix: str | Path | None = None) -> Path:
    """Register this environment's kernel as `python3` (the kernel papermill runs) under `prefix`.

    The notebooks' scripts carry no kernel in their header; jupytext gives an opened script the kernel
    whose command is the server's own Python, so the spec must name that executable by its path (the spec
    ipykernel ships names just `python`). A spec that already runs `python` is left as it is. Returns the
    kernel spec folder.
    """
    import json

    from ipykernel.kernelspec import install

    prefix = Path(prefix or sys.prefix)
    spec = prefix / "share" / "jupyter" / "kernels" / "python3"
    try:
        command = json.loads((spec / "kernel.json").read_text(encoding="utf-8"))["argv"][0]
        if Path(command).is_file() and Path(command).samefile(sys.executable):
            return spec
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return Path(install(kernel_name="python3", display_name="Python 3 (workbench)", prefix=str(prefix)))


@dataclass(frozen=True)
class LabLaunch:
    """How to start the lab: the command (without the token), its environment and the address to print."""

    argv: list[str]
    env: dict[str, str]
    url: str
    port: int
    token: str
    run_dir: Path | None


def lab_launch(
    run_dir: str | Path | None = None,
    port: int = 8888,
    token: str | None = None,
    environ: Mapping[str, str] | None = None,
    python: str = sys.executable,
) -> LabLaunch:
    """Build the JupyterLab command and environment; nothing is started.

    The token is `token`, else JUPYTER_TOKEN of `environ`, else a new random one; it travels in the
    environment only. A busy `port` is refused (the printed address must be the served one).
    """
    env = dict(os.environ if environ is None else environ)
    token = token or env.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    if not port_is_free(port):
        raise LabError(
            f"port {port} on {LOCALHOST} is in use; choose another with --port (next free: {free_port(port)})"
        )
    env["JUPYTER_TOKEN"] = token
    config_path = [str(lab_config_dir()), *filter(None, env.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep))]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(dict.fromkeys(config_path))
    root = project_root()
    pythonpath = [str(root), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
    run = None
    path = f"lab/tree/notebooks/{NOTEBOOKS[0]}.py"
    if run_dir is not None:
        run = check_run_dir(run_dir)
        env[RUN_DIR_VARIABLE] = str(run)
    else:
        env.pop(RUN_DIR_VARIABLE, None)
    argv = [python, "-m", "jupyterlab", f"--port={port}", f"--ServerApp.ip={LOCALHOST}", "--no-browser"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")
    return LabLaunch(argv, env, lab_url(port, token, path), port, token, run)


def start_lab(run_dir: str | Path | None = None, port: int = 8888, token: str | None = None) -> None:
    """Print the address with its token and replace this process by JupyterLab."""
    launch = lab_launch(run_dir, port, token)
    ensure_kernel()
    print(f"JupyterLab on {LOCALHOST}:{launch.port}; open (Ctrl+click):\n\n    {launch.url}\n", flush=True)
    if launch.run_dir is not None:
        print(f"notebooks opened here work in the run {launch.run_dir} (its frozen parameters)", flush=True)
    print(
        f"from another machine: ssh -L {launch.port}:{LOCALHOST}:{launch.port} USER@HOST, then open the address above",
        flush=True,
    )
    os.execve(launch.argv[0], launch.argv, launch.env)

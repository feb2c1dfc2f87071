"""`python -m workbench` behaves like the `workbench` console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=180)


def console_script() -> str | None:
    """The `workbench` entry point installed beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("workbench")
    return str(beside) if beside.is_file() else shutil.which("workbench")


@pytest.mark.parametrize("args", [["--help"], ["params", "params/demo.yaml"], ["params", "params/missing.yaml"]])
def test_python_m_workbench_matches_the_command(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    module = run(sys.executable, "-m", "workbench", *args)
    # the console script calls workbench.cli:main, so the in-process call is the behaviour to match
    from workbench.cli import main

    try:
        code = main(args)
    except SystemExit as exc:  # argparse exits after --help
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert module.returncode == code
    assert module.stdout == captured.out
    assert module.stderr.strip().splitlines()[-1:] == captured.err.strip().splitlines()[-1:]
    if args == ["--help"]:
        assert module.stdout.startswith("usage: workbench ")
        assert "download" in module.stdout
    elif args[1] == "params/demo.yaml":
        assert code == 0 and "experiment: demo" in module.stdout
    else:
        assert code == 2 and "missing.yaml" in module.stderr

    script = console_script()
    if script is not None:
        installed = run(script, *args)
        assert installed.returncode == module.returncode
        assert installed.stdout == module.stdout

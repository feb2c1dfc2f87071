"""environment.yml describes the same environment as pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    assert set(pip_section) == wanted
    assert "python=3.11" in env["dependencies"]


def test_constraints_pin_every_direct_dependency() -> None:
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!]", requirement)[0].lower()
        assert name in pins, f"{name} is not pinned in constraints.txt"
        if "==" in requirement:
            assert requirement.split("==")[1] == pins[name]
    assert pins["torch"].startswith("2.14")
    assert pins["terratorch"] == "1.2.11"

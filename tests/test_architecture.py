"""The import contract: the package's floors, checked over every import statement.

Each module of `workbench` belongs to one floor; a module may import from its own floor's unit or
from a lower floor, never from a higher one, whether the import stands at module level or inside a
function. Within the engines floor the order is infer < evaluate < train, and within analyses
figures < audit, review (audit and review never import each other). The README's layout section
draws the same floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"

# (rank, unit): a module may import units of lower rank and its own unit. Units of equal rank are
# siblings that must not import each other.
FLOORS: dict[str, tuple[float, str]] = {
    "workbench": (0.0, "foundation"),
    "workbench.params": (0.0, "foundation"),
    "workbench.io": (0.0, "foundation"),
    "workbench.indices": (0.0, "foundation"),
    "workbench.arrays": (0.0, "foundation"),
    "workbench.periodic": (0.0, "foundation"),
    "workbench.functional": (0.0, "foundation"),
    "workbench.run": (0.0, "foundation"),
    "workbench.data": (1.0, "data"),
    "workbench.models": (2.0, "models"),
    "workbench.infer": (3.0, "infer"),
    "workbench.evaluate": (3.1, "evaluate"),
    "workbench.train": (3.2, "train"),
    "workbench.figures": (4.0, "figures"),
    "workbench.audit": (4.1, "audit"),
    "workbench.review": (4.1, "review"),
    "workbench.stages": (5.0, "stages"),
    "workbench.tracking": (5.5, "tracking"),
    "workbench.runstatus": (5.5, "runstatus"),
    "workbench.pipeline": (6.0, "pipeline"),
    "workbench.notebook": (6.0, "notebook"),
    "workbench.lab": (6.0, "lab"),
    "workbench.report_pages": (5.9, "report_pages"),
    "workbench.cli": (6.5, "cli"),
    "workbench.bench": (6.2, "bench"),
    "workbench.__main__": (7.0, "main"),
}

# foundation modules are ordered among themselves too: io and arrays need nothing of the package
FOUNDATION_ORDER = [
    "workbench.arrays",
    "workbench.periodic",
    "workbench.io",
    "workbench.params",
    "workbench.indices",
    "workbench.functional",
    "workbench.run",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor_of(module: str) -> tuple[float, str]:
    """The floor of a module: its longest registered prefix."""
    best = ""
    for prefix in FLOORS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    if not best:
        raise KeyError(module)
    return FLOORS[best]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported workbench module) for every import in a file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from workbench import x` may name a submodule
            if target == "workbench":
                found += [(node.lineno, f"workbench.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "workbench" or name.startswith("workbench.")]


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_floor() -> None:
    missing = [module_name(p) for p in all_modules() if not _has_floor(module_name(p))]
    assert not missing, f"modules without a floor in the import contract: {missing}"


def _has_floor(module: str) -> bool:
    try:
        floor_of(module)
    except KeyError:
        return False
    return True


def violations() -> list[str]:
    found = []
    for path in all_modules():
        here = module_name(path)
        rank, unit = floor_of(here)
        for line, target in imports_of(path):
            if target == "workbench":
                continue
            their_rank, their_unit = floor_of(target)
            where = f"{path.relative_to(PACKAGE.parent)}:{line} ({here} -> {target})"
            if their_unit == unit:
                if unit == "foundation":
                    mine = _foundation_rank(here)
                    theirs = _foundation_rank(target)
                    if theirs > mine:
                        found.append(f"{where}: foundation modules import only those listed before them")
                continue
            if their_rank > rank:
                found.append(f"{where}: imports upward, {unit} ({rank}) -> {their_unit} ({their_rank})")
            elif their_rank == rank:
                found.append(f"{where}: sibling units {unit} and {their_unit} must not import each other")
    return found


def _foundation_rank(module: str) -> int:
    for i, name in enumerate(FOUNDATION_ORDER):
        if module == name or module.startswith(name + "."):
            return i
    return -1  # the package's __init__


def test_no_import_runs_upward() -> None:
    found = violations()
    assert not found, "import contract broken:\n" + "\n".join(found)


def test_the_contract_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a data module importing a stage (inside a function) is reported."""
    fake = tmp_path / "workbench"
    (fake / "data").mkdir(parents=True)
    (fake / "stages").mkdir()
    for init in (fake / "__init__.py", fake / "data" / "__init__.py", fake / "stages" / "__init__.py"):
        init.write_text("")
    (fake / "data" / "bad.py").write_text("def f():\n    from workbench.stages import run\n    return run\n")
    (fake / "stages" / "ok.py").write_text("from workbench.data import bad\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    found = violations()
    assert len(found) == 1 and "workbench/data/bad.py:2" in found[0] and "upward" in found[0]


def test_no_cycle_between_modules_of_a_unit() -> None:
    """Modules within one unit import each other without cycles (module level and function level)."""
    graph: dict[str, set[str]] = {}
    for path in all_modules():
        here = module_name(path)
        graph[here] = {t for _, t in imports_of(path) if t != here and t in _names()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            # a package's __init__ re-exporting its submodules is not a cycle with them
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif not state.get(nxt):
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _names() -> set[str]:
    return {module_name(p) for p in all_modules()}

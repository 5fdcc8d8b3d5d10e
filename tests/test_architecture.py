"""The house rules of the code (issue 18), checked on the source so they cannot rot.

- imports run one way: launcher -> partialfc -> discface, launcher -> data_pipeline; discface never
  touches torch.distributed; library packages never import launcher;
- no import circle between modules, counting imports inside functions too (an import moved into a
  function to dodge a circle is still a circle); imports under ``if TYPE_CHECKING:`` are for the type
  checker only and do not count;
- no function over 80 lines, no module over 400 lines (in the packages and in scripts/, docker/,
  deploy/), no module name used twice in the packages.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("partialfc", "discface", "data_pipeline", "launcher")
# Which first-party packages each package may import (besides itself).
ALLOWED = {
    "discface": set(),
    "data_pipeline": set(),
    "partialfc": {"discface"},
    "launcher": {"partialfc", "discface", "data_pipeline"},
}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four packages (and scripts/)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> set[str]:
    """First-party modules imported by ``module`` anywhere in its body, except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package: str) -> None:
    bad = sorted(f"{m} imports {dep}" for m, deps in GRAPH.items() if m.split(".")[0] == package
                 for dep in deps if dep.split(".")[0] not in ALLOWED[package] | {package})
    assert not bad, bad


def test_discface_is_pure_math() -> None:
    def touches_distributed(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                return True
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                    a.name == "distributed" for a in node.names):
                return True
        return False

    bad = [str(p) for m, p in MODULES.items() if m.startswith("discface") and touches_distributed(p)]
    assert not bad, f"discface must not touch torch.distributed: {bad}"


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            # A package's __init__ importing its own submodules is how a package exposes its API, not a
            # circle between rooms: the edge from a submodule up to its package is what we skip.
            if v.startswith(w + "."):
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    return out


def test_no_import_circle() -> None:
    assert not _cycles()


def _code_files(room: str) -> list[Path]:
    """The Python files of a package, or of a folder of scripts outside the packages."""
    if room in PACKAGES:
        return [path for module, path in MODULES.items() if module.split(".")[0] == room]
    return sorted((REPO / room).rglob("*.py"))


@pytest.mark.parametrize("room", [*PACKAGES, "scripts", "docker", "deploy"])
def test_functions_and_modules_are_short(room: str) -> None:
    long: list[str] = []
    for path in _code_files(room):
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(REPO)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, long


def test_no_module_name_used_twice() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for module in MODULES:  # a package's own name counts too: `bench/` and `commands/bench.py` clash
        by_name[module.rpartition(".")[2]].append(module)
    twice = {name: mods for name, mods in by_name.items() if len(mods) > 1}
    assert not twice, twice

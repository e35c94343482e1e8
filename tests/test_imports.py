"""The package's import graph is a DAG: from the entry points (cli, app) down to errors and the queues.

Every import counts, wherever it stands: at the top, inside a function (a lazy import is a
dependency all the same) or under ``TYPE_CHECKING`` (a type the module needs to be read).
The graph is read from the source with ``ast``, so nothing is imported to draw it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fastserve

PACKAGE = Path(fastserve.__file__).parent
ENTRY_POINTS = {"fastserve.cli", "fastserve.app"}
# The modules at the bottom: they import nothing of fastserve's.
LEAVES = {"fastserve.errors", "fastserve._queue_py"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.glob("*.py"):
        name = "fastserve" if path.stem == "__init__" else f"fastserve.{path.stem}"
        found[name] = path
    for path in PACKAGE.glob("*.pyx"):
        found[f"fastserve.{path.stem}"] = path
    return found


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The fastserve modules that ``tree`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            # `from fastserve import codec` imports the submodule; `from fastserve import x`
            # of anything else imports the package itself.
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {node.module}
            if submodules and len(submodules) < len(node.names):
                found.add(node.module)
    return found


# Cython's import statements, which ast cannot parse: `import x`, `from x import/cimport y`, `cimport x`.
_CYTHON_IMPORT = re.compile(r"^\s*(?:c?import\s+([\w.]+)|from\s+([\w.]+)\s+c?import)", re.M)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        source = path.read_text()
        if path.suffix == ".pyx":
            imported = {a or b for a, b in _CYTHON_IMPORT.findall(source)}
            graph[name] = {m for m in imported if m == "fastserve" or m.startswith("fastserve.")}
        else:
            graph[name] = _imports(ast.parse(source, str(path)), set(modules))
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    on_path: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return [*on_path[on_path.index(node) :], node]
        if node in done:
            return None
        on_path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle is not None:
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    # The test above could pass by never looking: here it must find what is there.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_are_read_everywhere_in_a_module() -> None:
    source = """
from typing import TYPE_CHECKING
from fastserve import codec, __version__
import fastserve.queue
if TYPE_CHECKING:
    from fastserve.router import Router
def f():
    from fastserve.state import Deployment
"""
    modules = {"fastserve", "fastserve.codec", "fastserve.queue", "fastserve.router", "fastserve.state"}
    assert _imports(ast.parse(source), modules) == modules


def test_nothing_imports_the_entry_points() -> None:
    graph = import_graph()
    # The package's __init__ re-exports create_app lazily: the one way in from above.
    importers = {name for name, targets in graph.items() if targets & ENTRY_POINTS} - {"fastserve"}
    assert importers == set()


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_the_bottom_modules_import_nothing_of_fastserve(leaf: str) -> None:
    assert import_graph()[leaf] == set()


def test_the_compiled_modules_import_nothing_of_fastserve() -> None:
    graph = import_graph()
    compiled = [f"fastserve.{path.stem}" for path in PACKAGE.glob("*.pyx")]
    assert sorted(compiled) == ["fastserve._queue", "fastserve._trees"]
    assert {name: graph[name] for name in compiled} == {name: set() for name in compiled}
    # The Cython reader sees what is there (its imports are not Python's syntax).
    assert _CYTHON_IMPORT.findall("from libc.math cimport isfinite\nimport numpy as np\n") == [
        ("", "libc.math"),
        ("numpy", ""),
    ]


def test_every_module_is_reached_from_an_entry_point() -> None:
    # A module nothing reaches is dead code, or a second entry point nobody declared.
    graph = import_graph()
    seen: set[str] = set()
    todo = list(ENTRY_POINTS)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    assert set(graph) - seen == set()

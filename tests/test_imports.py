"""The package's shape: no import circles, sans-IO cores free of I/O, the command line imported by nobody.

Static: every ``import`` in every module (function-level ones included) is read
with :mod:`ast`, so a lazy import inside a function counts like one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "orchestrator"
#: Standard-library and third-party modules that do I/O (or run it), which ``orchestrator.protocols`` must not import.
IO_MODULES = {"socket", "_socket", "select", "selectors", "asyncio", "trio", "threading", "subprocess", "fcntl",
              "signal", "sqlite3", "shutil", "tempfile", "httpx", "h11", "paramiko", "io", "pathlib", "os", "mmap"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports (absolute names; for ``from X import Y``, X.Y when that is a module, else X)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return found


GRAPH = {m: {d for d in _imports(m) if d in MODULES and d != m} for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles() == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("orchestrator.protocols")))
def test_sans_io_cores_import_no_io(name):
    imported = _imports(name)
    io = {m for m in imported if m.split(".")[0] in IO_MODULES}
    ours = {m for m in imported if m.startswith("orchestrator.") and not m.startswith("orchestrator.protocols")
            and m not in ("orchestrator.events", "orchestrator.safetext")}
    assert not io and not ours, f"{name} imports {sorted(io | ours)}"


def test_the_library_never_imports_the_command_line():
    offenders = {m: sorted(d for d in deps if d.startswith("orchestrator.cli")) for m, deps in GRAPH.items()
                 if not m.startswith("orchestrator.cli") and m != "orchestrator.__main__"}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_production_code_never_names_the_simulator():
    names = {m: sorted(d for d in deps if d.startswith("orchestrator.sim")) for m, deps in GRAPH.items()
             if not m.startswith("orchestrator.sim") and not m.startswith("orchestrator.cli")}
    assert {m: d for m, d in names.items() if d} == {}

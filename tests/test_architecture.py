"""The layout rules of the code, checked on the source (issue: "One place for every choice").

- no import cycles between modules or between subpackages, counting imports inside functions;
- no private imports across subpackages (a ``_module`` or a ``_name`` of another subpackage);
- no function longer than MAX_FUNCTION_LINES.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "largebatch"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the file, at any depth."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("largebatch")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            if not target.startswith("largebatch"):
                continue
            names = [a.name for a in node.names]
            # ``from . import x`` imports the submodule x when there is one
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest:
                out.append((target, rest, node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    graph = _edges()
    # the package's own __init__ re-exports the public API; it is imported by no module of the package
    assert _cycles(graph) == []


def test_no_import_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for m, targets in _edges().items():
        if m == "largebatch":
            continue
        src = _subpackage(m)
        graph.setdefault(src, set())
        for t in targets:
            if t != "largebatch" and _subpackage(t) != src:
                graph[src].add(_subpackage(t))
                graph.setdefault(_subpackage(t), set())
    assert _cycles(graph) == []


def test_no_private_imports_across_subpackages():
    bad = []
    for m in MODULES:
        for target, names, line in _imports(m):
            if _subpackage(target) == _subpackage(m):
                continue
            private_module = any(p.startswith("_") and p != "__init__" for p in target.split("."))
            private_names = [n for n in names if n.startswith("_")]
            if private_module or private_names:
                bad.append(f"{MODULES[m].relative_to(SRC.parent)}:{line} imports {target} {private_names or ''}")
    assert bad == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short(module):
    tree = ast.parse(MODULES[module].read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []

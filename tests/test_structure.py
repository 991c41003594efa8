"""The shape of the code base: the apps' modules import each other without cycles, use no
other module's private names, and stay small, each saying in its docstring what it is for.

Imports are read from the source with ``ast``, function-local ones included: an import moved
into a function still makes the two modules depend on each other, it only hides the cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from tests.conftest import ROOT

APPS = ("orchestration", "approvals", "audit", "console", "knowledge")
MAX_LINES = 450

# Private names still imported across modules, each being removed on its own: once it is,
# delete its line here (the test then keeps it from coming back).
PRIVATE_IMPORTS_ALLOWED: set[tuple[str, str]] = set()

# Modules over MAX_LINES that are being split on their own: delete a line once its split is
# done.
LONG_MODULES_ALLOWED = {
    "approvals.services",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module of the apps (packages as their ``__init__``), migrations left out."""
    found: dict[str, Path] = {}
    for app in APPS:
        for path in sorted((ROOT / app).rglob("*.py")):
            if "migrations" in path.relative_to(ROOT).parts:
                continue
            found[_module_name(path)] = path
    return found


@cache
def _tree(name: str) -> ast.Module:
    path = _modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def _is_package(name: str) -> bool:
    return _modules()[name].name == "__init__.py"


def _project(name: str) -> str | None:
    """The project module an import of ``name`` loads last: the longest prefix of it that is
    one of the apps' modules (``import a.b.c`` where only ``a.b`` is ours names ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in _modules():
            return candidate
    return None


def _from_base(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str) -> Iterator[tuple[str, str, ast.AST]]:
    """(imported module, name taken from it or "", node) for every import in ``module``,
    wherever it is written. ``from pkg import mod`` imports the module ``pkg.mod``."""
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _project(alias.name)
                if target is not None:
                    yield target, "", node
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in _modules():
                    yield submodule, "", node
                elif base in _modules():
                    yield base, alias.name, node


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in _imports(name) if target != name}
            for name in _modules()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _edges_within(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    members = set(component)
    return [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]


def test_modules_import_each_other_without_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles among the apps' modules:\n" + "\n".join(
        f"  {', '.join(c)}\n    " + "\n    ".join(_edges_within(graph, c)) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _private_uses(module: str) -> Iterator[str]:
    """Private names of other project modules that ``module`` uses: imported with ``from``,
    or read as an attribute of a module it imported (``mod._name``)."""
    bound: dict[str, str] = {}  # local name → project module it is bound to
    for target, name, node in _imports(module):
        if target == module:
            continue
        if name.startswith("_") and not name.startswith("__"):
            yield f"{target}.{name}"
        if isinstance(node, ast.ImportFrom) and not name:
            for alias in node.names:
                if f"{_from_base(module, node)}.{alias.name}" == target:
                    bound[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _project(alias.name) == target:
                    if alias.asname:
                        bound[alias.asname] = target
                    else:  # ``import a.b`` binds ``a``; ``a.b._name`` is read below
                        first = alias.name.partition(".")[0]
                        bound.setdefault(first, first)
    for node in ast.walk(_tree(module)):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            continue
        dotted = _dotted(node.value)
        if dotted is None or dotted.partition(".")[0] not in bound:
            continue
        first, _, rest = dotted.partition(".")
        owner = ".".join(filter(None, (bound[first], rest)))
        if owner in _modules() and owner != module:
            yield f"{owner}.{node.attr}"


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner is not None else None
    return None


def test_no_module_uses_another_modules_private_names() -> None:
    found = {(module, used) for module in _modules() for used in _private_uses(module)}
    unexpected = sorted(found - PRIVATE_IMPORTS_ALLOWED)
    assert not unexpected, "private names used across modules:\n" + "\n".join(
        f"  {module} uses {used}" for module, used in unexpected)


def test_every_module_says_what_it_is_for() -> None:
    missing = sorted(name for name in _modules() if ast.get_docstring(_tree(name)) is None)
    assert not missing, "modules without a docstring: " + ", ".join(missing)


def test_modules_stay_small() -> None:
    long = {name: lines for name, path in _modules().items()
            if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    unexpected = sorted(f"{name} ({lines} lines)" for name, lines in long.items()
                        if name not in LONG_MODULES_ALLOWED)
    assert not unexpected, f"modules over {MAX_LINES} lines: " + ", ".join(unexpected)

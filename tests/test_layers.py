"""The layers point one way: console → knowledge → orchestration → approvals → audit, and the
engine and the shared helpers (hashchain, jsonkit, logcontext) depend on no Django app at all. A
module-level or a function-local import against the arrows fails here with the file and line."""

from __future__ import annotations

import ast
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT

PROJECT = ("console", "knowledge", "orchestration", "approvals", "audit", "hashchain", "jsonkit",
           "logcontext")
# What each layer may import from the project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "console": {"knowledge", "orchestration", "approvals", "audit", "hashchain", "jsonkit",
                "logcontext"},
    "knowledge": {"orchestration", "approvals", "audit", "hashchain", "jsonkit", "logcontext"},
    "orchestration": {"approvals", "audit", "hashchain", "jsonkit", "logcontext"},
    "approvals": {"audit", "hashchain", "jsonkit", "logcontext"},
    "audit": {"hashchain", "jsonkit", "logcontext"},
    "hashchain": set(),
    "jsonkit": set(),
    "logcontext": set(),
}
# No Django, no app but themselves.
PURE = ("orchestration/engine", "hashchain", "jsonkit", "logcontext")


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if "/migrations/" not in rel:
                yield rel, ast.parse(path.read_text(), rel)


def _imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _against_the_arrows(modules: Iterator[tuple[str, ast.Module]]) -> list[str]:
    found = []
    for rel, tree in modules:
        layer = rel.split("/")[0]
        pure = rel.startswith(PURE)
        for line, name in _imports(tree):
            top = name.split(".")[0]
            if pure and (top == "django" or (top in PROJECT and not (
                    name.startswith("orchestration.engine") or top in ("hashchain", "jsonkit")))):
                found.append(f"{rel}:{line} imports {name} (this module must stay Django-free)")
            elif top in PROJECT and top != layer and top not in ALLOWED[layer]:
                found.append(f"{rel}:{line} imports {name} ({layer} may not depend on {top})")
    return found


def test_every_import_points_down_the_layers() -> None:
    assert _against_the_arrows(_modules()) == []


@pytest.mark.parametrize("source, statement", [
    ("orchestration/engine/x.py", "from audit.ledger import append"),
    ("orchestration/engine/x.py", "import django.db"),
    ("audit/x.py", "from orchestration.models import Run"),
    ("approvals/x.py", "import console.views"),
    ("jsonkit/x.py", "from hashchain import GENESIS"),
])
def test_the_check_finds_an_import_against_the_arrows(source: str, statement: str) -> None:
    tree = ast.parse(f"def f():\n    {statement}\n")
    assert [item.split(" ")[0] for item in _against_the_arrows(iter([(source, tree)]))] == [
        f"{source}:2"]


def test_the_check_lets_imports_down_the_layers_pass() -> None:
    tree = ast.parse("from audit.ledger import append\nfrom jsonkit import map_strings\n")
    assert _against_the_arrows(iter([("approvals/x.py", tree)])) == []

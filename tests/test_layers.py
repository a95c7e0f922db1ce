"""The house's layering, checked on the import graph of the sources (DESIGN.md, "Rules of the house").

Layers, top to bottom: ``cli`` > methods > ``training``/``eval``/``report`` > ``models``/``data`` > ``config``,
``device``, ``paths``, ``errors``, ``progress``, ``version``. A module may import its own layer or lower ones;
methods may not import each other; no import cycles between modules. Every import counts, function-level
ones included (they used to hide a cycle), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LEVELS = {
    "config": 0, "device": 0, "paths": 0, "errors": 0, "progress": 0, "version": 0,
    "models": 1, "data": 1,
    "training": 2, "eval": 2, "report": 2, "setup": 2,
    "compress": 3, "decode": 3, "vision": 3, "align": 3, "adapt": 3, "audit": 3,
    "cli": 4, "__main__": 4, "__init__": 4,  # the package root is the public facade
}
METHODS = {"compress", "decode", "vision", "align", "adapt", "audit"}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of the package that ``module`` imports (resolving ``from pkg import submodule``)."""
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)  # ``from pkg import x`` runs ``pkg/__init__`` first, whatever x is
            for alias in node.names:
                child = f"{base}.{alias.name}"
                if child in known:
                    found.add(child)
    root = module.split(".")[0]
    return {m for m in found if m == root or m.startswith(root + ".")}


def import_graph(root: Path, package: str = "leanfm") -> dict[str, set[str]]:
    """``module -> modules it imports`` for every module under ``root/package``."""
    files = {_module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}
    known = set(files)
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports, imports between methods, and modules in no known layer."""
    problems = []
    for module, targets in sorted(graph.items()):
        source = _component(module)
        if source not in LEVELS:
            problems.append(f"{module}: '{source}' is in no layer")
            continue
        for target in sorted(targets):
            dest = _component(target)
            if dest not in LEVELS:
                problems.append(f"{module} -> {target}: '{dest}' is in no layer")
            elif LEVELS[dest] > LEVELS[source]:
                problems.append(f"{module} -> {target}: imports upward ({source} < {dest})")
            elif source in METHODS and dest in METHODS and source != dest:
                problems.append(f"{module} -> {target}: a method imports another method ({dest})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_a_higher_layer_or_another_method():
    assert layer_violations(import_graph(SRC)) == []


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph(SRC)) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"leanfm/__init__.py": "", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    ({"leanfm/models/__init__.py": "", "leanfm/models/x.py": "def f():\n    from leanfm.compress import api\n",
      "leanfm/compress/__init__.py": "", "leanfm/compress/api.py": ""}, "imports upward"),
    ({"leanfm/vision/__init__.py": "", "leanfm/vision/a.py": "from leanfm.align.cwcl import loss\n",
      "leanfm/align/__init__.py": "", "leanfm/align/cwcl.py": ""}, "another method"),
    ({"leanfm/gadgets.py": "import os\n"}, "no layer"),
])
def test_the_layer_check_catches_a_planted_violation(tmp_path, files, expected):
    problems = layer_violations(import_graph(_tree(tmp_path, files)))
    assert any(expected in p for p in problems), problems


def test_the_cycle_check_catches_a_planted_function_level_cycle(tmp_path):
    root = _tree(tmp_path, {
        "leanfm/compress/__init__.py": "",
        "leanfm/compress/api.py": "from leanfm.compress.disp import train\n",
        "leanfm/compress/disp.py": "def train():\n    from leanfm.compress import api\n",
    })
    assert cycles(import_graph(root)) == [["leanfm.compress.api", "leanfm.compress.disp"]]


def test_type_checking_imports_do_not_count(tmp_path):
    root = _tree(tmp_path, {
        "leanfm/models/__init__.py": "",
        "leanfm/models/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from leanfm.cli import main\n",
    })
    assert layer_violations(import_graph(root)) == []


def test_from_a_package_import_counts_as_importing_the_package_init(tmp_path):
    root = _tree(tmp_path, {
        "leanfm/models/__init__.py": "from leanfm.models.registry import load\n",
        "leanfm/models/registry.py": "from leanfm.models import tiny\n",  # runs models/__init__ first
        "leanfm/models/tiny.py": "",
    })
    assert cycles(import_graph(root)) == [["leanfm.models", "leanfm.models.registry"]]

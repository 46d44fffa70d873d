"""Facts about lightcook's import graph, read from the source with ``ast`` (nothing is imported):

- no import circle among lightcook's modules;
- ``lightcook/ops`` imports nothing above it (only ``lightcook.ops.*`` and ``lightcook.io``);
- no callback module imports another callback module (``callbacks/base.py`` and private ``_*.py``
  modules are the shared code every callback may import).

Every import counts, also one inside a function or a module ``__getattr__`` and one spelled
``importlib.import_module("lightcook....")`` (each is an arrow all the same); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "lightcook"
OPS_MAY_IMPORT = ("lightcook.ops", "lightcook.io")
CALLBACKS = "lightcook.callbacks"
SHARED_CALLBACK_MODULES = {f"{CALLBACKS}.base"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom | ast.Call]:
    """Every import statement and dynamic import call, at any depth, except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            yield from (n for child in node.orelse for n in _import_nodes(ast.Module([child], [])))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom) or _dynamic_import(node):
            yield node
        yield from _import_nodes(node)


def _dynamic_import(node: ast.AST) -> bool:
    """``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")`` with a literal name."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__") and isinstance(node.args[0].value, str)


def _known(name: str) -> str | None:
    """``name`` if it is a lightcook module, else its longest prefix that is one."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(node: ast.ImportFrom, importer: str) -> str:
    if not node.level:
        return node.module or ""
    base = importer if _is_package(importer) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def imports_of(importer: str) -> set[str]:
    """The lightcook modules ``importer`` imports (``from pkg import submodule`` → the submodule)."""
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(MODULES[importer].read_text())):
        if isinstance(node, ast.Call):
            targets.add(_known(node.args[0].value))
            continue
        if isinstance(node, ast.Import):
            targets |= {_known(alias.name) for alias in node.names}
            continue
        source = _absolute(node, importer)
        for alias in node.names:
            targets.add(
                _known(f"{source}.{alias.name}") if f"{source}.{alias.name}" in MODULES else _known(source)
            )
    return {t for t in targets if t and t.split(".")[0] == "lightcook"} - {importer}


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_graph_is_read_from_the_source():
    # the walker sees top-level, relative and function-level imports (tests for the test)
    tree = {"lightcook.app.train": {"lightcook.app.config", "lightcook.app.launch", "lightcook.io"}}
    assert tree["lightcook.app.train"] <= GRAPH["lightcook.app.train"]
    assert "lightcook.app.train" in GRAPH["lightcook.app"]
    dynamic = ast.parse("def f():\n    import importlib\n    return importlib.import_module('lightcook.io')")
    assert [n.args[0].value for n in _import_nodes(dynamic) if isinstance(n, ast.Call)] == ["lightcook.io"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert cycles(GRAPH) == [], "import circles (each list is one strongly connected group of modules)"


def test_ops_imports_nothing_above_ops():
    upward = {
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if _under(name, "lightcook.ops")
        for target in targets
        if not any(_under(target, allowed) for allowed in OPS_MAY_IMPORT)
    }
    assert not upward, f"lightcook/ops may import only {OPS_MAY_IMPORT}: {sorted(upward)}"


def _callback_module(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return (
        _under(name, CALLBACKS)
        and name != CALLBACKS
        and name not in SHARED_CALLBACK_MODULES
        and not leaf.startswith("_")
    )


def test_no_callback_module_imports_another_callback_module():
    siblings = {
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if _callback_module(name) or name in SHARED_CALLBACK_MODULES
        for target in targets
        if _callback_module(target) or target == CALLBACKS
    }
    assert not siblings, f"callback modules import each other: {sorted(siblings)}"

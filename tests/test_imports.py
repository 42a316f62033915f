"""The package's shape: no import cycles inside ``mriface``, and no module over ~500 lines without a reason.

The import graph is read from the source with :mod:`ast` (nothing is
imported), from every ``import`` statement, at module level or inside a
function: a lazy import still makes a dependency, and a cycle through one is
still a layering error. Imports under ``if TYPE_CHECKING:`` are for
annotations only and are left out. ``from .pkg import name`` depends on the
submodule ``pkg.name`` when there is one, else on ``pkg`` itself. Importing
a submodule runs its package's ``__init__`` first, but that is not counted
as a dependency of the submodule: a package always starts before its parts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mriface"
#: a module longer than this must say why in its docstring (with the words "over 500 lines")
MAX_LINES = 550


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``root``."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def import_graph(modules: "dict[str, Path] | None" = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports (resolved as the interpreter would)."""
    modules = modules if modules is not None else _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            for t in targets:
                # "import mriface.render.protocol" depends on that module; keep the longest known prefix
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _cycle_path(graph: dict[str, set[str]], comp: list[str]) -> str:
    """One concrete loop inside a strongly connected component, for the failure message."""
    start, members = comp[0], set(comp)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w in seen]
        if back:
            return " -> ".join(path[path.index(back[0]):] + [back[0]])
        path.append(nxt[0])
        seen.add(nxt[0])


def test_the_graph_reader_finds_a_cycle_and_resolves_relative_imports(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x  # a lazy import still counts\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    graph = import_graph(_modules(pkg))
    assert graph["toy.a"] == {"toy.sub.b"} and graph["toy.sub"] == {"toy.sub.b"}
    assert graph["toy.sub.b"] == {"toy.a"} and graph["toy.c"] == set()
    assert find_cycles(graph) == [["toy.a", "toy.sub.b"]]


def test_no_import_cycles_inside_mriface():
    graph = import_graph()
    assert "mriface.study.run" in graph and graph["mriface.study.run"]  # the reader sees the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_cycle_path(graph, c) for c in cycles)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_over_500_lines_without_a_reason(name):
    path = _modules()[name]
    n = len(path.read_text().splitlines())
    if n <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "over 500 lines" in doc.lower(), (
        f"{path.relative_to(PACKAGE.parent)} has {n} lines: split it along its jobs, or say in its "
        "docstring why it is over 500 lines")

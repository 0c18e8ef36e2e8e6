"""No import cycles between the modules of ``replicate/`` and ``evals/``.

The graph is read from the source with ``ast``, not by importing: every ``import`` and ``from ... import`` statement
counts, wherever it is (module level, inside functions, under ``TYPE_CHECKING``), absolute or relative;
``from . import distributed as D`` is an edge to ``replicate.distributed``, ``from .config import RunConfig`` one to
``replicate.config``. Importing a submodule also runs its package's ``__init__``; those implicit edges are not
counted (an ``__init__`` that imports its own submodules would otherwise always be a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("replicate", "evals")

ALLOWED_CYCLES: set[frozenset] = set()


def find_modules(root: Path, packages=PACKAGES) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every .py file under ``packages``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = (path, is_package)
    return modules


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules (of ``packages``) it imports, anywhere in its source."""
    modules = find_modules(root, packages)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: level 1 is this package, 2 its parent, ...
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:  # ``from pkg import submodule``
                        deps.add(f"{source}.{alias.name}")
                    elif source in modules:  # ``from module import name``
                        deps.add(source)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan): each holds at least one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_synthetic_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert sorted(map(sorted, cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}))) == [["a", "b"], ["c", "d"]]


def test_graph_reads_relative_function_level_and_aliased_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b as B\n    return B\n")
    (pkg / "b.py").write_text("from .sub.c import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a\nthing = 1\n")
    (pkg / "d.py").write_text("from pkg import sub\nfrom ..outside import x\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.sub"}
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.b", "pkg.sub.c"})]


def test_graph_of_the_suite_sees_its_imports():
    graph = import_graph(REPO)
    assert "replicate.distributed" in graph["replicate.trainer"]  # from . import distributed as D
    assert "evals.knn" in graph["replicate.runner"]  # inside a function
    assert "replicate.trainer" in graph["replicate.bench.suite"]  # from ..trainer import ...
    assert "replicate.config" in graph["evals.finetune"]  # absolute


def test_no_import_cycles():
    found = [sorted(c) for c in cycles(import_graph(REPO)) if c not in ALLOWED_CYCLES]
    assert not found, f"import cycles: {found}"

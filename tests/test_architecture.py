"""The shape of the code: import cycles, the demo kept out, module docstrings.

docs/architecture.md promises that dependencies point one way and that the
library never imports the demo. These tests read the sources with ``ast``
(nothing is imported) and keep those promises checked:

- no import cycle among the modules of ``pgbroker/`` and ``pgbroker_demo/``;
  imports inside functions count (they run when the function does), imports
  under ``if TYPE_CHECKING:`` do not (they never run);
- no module of ``pgbroker/`` imports ``pgbroker_demo``;
- every module of ``pgbroker/`` says what it is for in a module docstring.

Imports are resolved to the module they load: ``from pgbroker.x import y``
imports the module ``pgbroker.x.y`` when ``y`` is a submodule, else the
module (or package ``__init__``) ``pgbroker.x``. ``import a.b.c`` imports
``a.b.c``. The parent packages that Python also initialises on the way are
not counted: every module would otherwise depend on ``pgbroker/__init__.py``.
Dynamic imports (``importlib.import_module("...")``) are not seen.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pgbroker", "pgbroker_demo")
LIBRARY = "pgbroker"
DEMO = "pgbroker_demo"

# --- reading the sources ------------------------------------------------------


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of the packages under root, by dotted name."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` and `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_time_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under node, at any depth, except the body of
    an `if TYPE_CHECKING:` (its else branch runs, so it counts)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: Iterable[ast.AST] = node.orelse
    else:
        children = ast.iter_child_nodes(node)
    for child in children:
        yield from _run_time_imports(child)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module that importing `name` loads: name itself, or, for an
    attribute of a module (`from a.b import f`), its longest known prefix.
    None for modules outside the packages."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, modules: dict[str, Path]) -> dict[str, int]:
    """The modules of the packages that `module` imports at run time, each
    with the line of its first import."""
    path = modules[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}
    for node in _run_time_imports(tree):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_known(alias.name, modules) for alias in node.names]
        else:
            if node.level:
                # Relative: from the module's own package, one level up per
                # extra dot.
                package = module.split(".")
                if not is_package:
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules else _known(base, modules))
        for target in targets:
            if target is not None and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line} for every module of the packages."""
    modules = module_files(root, packages)
    return {name: imports_of(name, modules) for name in modules}


def cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan),
    that is every set of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(start: str) -> None:
        # Iterative depth-first search: (node, iterator over its successors).
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, {})))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: frozenset[str], graph: dict[str, dict[str, int]]) -> str:
    """The modules of a cycle and the imports that close it."""
    edges = [
        f"    {source} -> {target} (line {line})"
        for source in sorted(component)
        for target, line in sorted(graph[source].items())
        if target in component
    ]
    return "  {" + ", ".join(sorted(component)) + "}:\n" + "\n".join(edges)


# --- the project --------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(ROOT, PACKAGES)


def test_the_graph_covers_both_packages(graph: dict[str, dict[str, int]]) -> None:
    # A guard for the tests below: an empty or partial graph would pass them.
    assert "pgbroker" in graph and "pgbroker.broker.transport" in graph
    assert "pgbroker_demo.run" in graph
    assert "pgbroker.database.sessions" in graph["pgbroker.broker.transport"]


def test_no_import_cycles(graph: dict[str, dict[str, int]]) -> None:
    found = sorted(cycles(graph), key=sorted)
    assert not found, "import cycles (modules that import each other):\n" + "\n".join(
        describe(c, graph) for c in found
    )


def test_the_library_never_imports_the_demo(graph: dict[str, dict[str, int]]) -> None:
    found = {
        (source, target): line
        for source, targets in graph.items()
        if source == LIBRARY or source.startswith(LIBRARY + ".")
        for target, line in targets.items()
        if target == DEMO or target.startswith(DEMO + ".")
    }
    # `pgbroker demo` reaches the demo through an entry point
    # (pgbroker.commands in pyproject.toml), not an import.
    assert not found, "the library imports the demo:\n" + "\n".join(
        f"  {source} -> {target} (line {line})" for (source, target), line in sorted(found.items())
    )


def test_every_library_module_has_a_docstring() -> None:
    modules = module_files(ROOT, [LIBRARY])
    assert len(modules) > 20
    missing = sorted(
        str(path.relative_to(ROOT))
        for path in modules.values()
        if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    )
    assert not missing, f"modules without a docstring: {missing}"


# --- the analysis itself, on made-up packages -------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_imports_are_resolved_to_the_module_they_load(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "app/__init__.py": "from app import util\n",
            "app/util.py": "import os\n",
            "app/sub/__init__.py": "X = 1\n",
            "app/sub/leaf.py": "",
            "app/sub/other.py": "",
            "app/user.py": """
                from __future__ import annotations
                import app.sub.leaf
                from app.sub import X
                from app.sub import other
                from . import util
                from .sub.leaf import name
                from typing import TYPE_CHECKING
                import typing

                if TYPE_CHECKING:
                    from app import never
                if typing.TYPE_CHECKING:
                    from app import never_either
                else:
                    from app import runs

                def later():
                    from app.sub import leaf as lazy
            """,
            "app/never.py": "",
            "app/never_either.py": "",
            "app/runs.py": "",
            "app/sub/deep.py": "from .. import util\nfrom ..sub import leaf\n",
        },
    )
    g = import_graph(tmp_path, ["app"])
    assert set(g["app"]) == {"app.util"}
    assert set(g["app.user"]) == {
        "app.sub.leaf",  # import app.sub.leaf; from .sub.leaf import name; lazy
        "app.sub",  # from app.sub import X (an attribute of the package)
        "app.sub.other",  # from app.sub import other (a submodule, not the package)
        "app.util",  # from . import util
        "app.runs",  # the else branch of `if typing.TYPE_CHECKING:` runs
    }
    assert set(g["app.sub.deep"]) == {"app.util", "app.sub.leaf"}
    assert g["app.util"] == {}


def test_cycles_are_found_with_function_level_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "p/__init__.py": "",
            "p/a.py": "from p import b\n",
            "p/b.py": "def f():\n    from p import c\n",  # lazy, still a cycle
            "p/c.py": "import p.a\n",
            "p/d.py": "from p import a\n",  # depends on the cycle, not in it
            "p/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import f\n",
            "p/f.py": "from p import e\n",  # e imports f only for type checkers
        },
    )
    g = import_graph(tmp_path, ["p"])
    assert cycles(g) == [frozenset({"p.a", "p.b", "p.c"})]
    text = describe(cycles(g)[0], g)
    assert "p.b -> p.c (line 2)" in text and "p.c -> p.a (line 1)" in text


def test_two_separate_cycles_are_two_components() -> None:
    g: dict[str, dict[str, int]] = {
        "a": {"b": 1},
        "b": {"a": 1, "c": 2},
        "c": {"d": 1},
        "d": {"c": 1},
        "e": {},
    }
    assert sorted(cycles(g), key=sorted) == [frozenset("ab"), frozenset("cd")]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


#: The areas of the library, and the areas each may import besides the
#: helpers at the top (errors, options, urls, logs, appconfig): the layers of
#: docs/architecture.md. The package's __init__ and flower.py are public
#: faces over the areas and are not an area.
AREA_DEPENDENCIES: dict[str, set[str]] = {
    "database": set(),
    "broker": {"database"},
    "results": {"database", "broker"},
    "durable": {"database", "results"},
    "operations": {"database", "broker", "results", "durable"},
    "cli": {"database", "broker", "results", "durable", "operations"},
    # The web dashboard beside the CLI: of the cli area, cli/options.py only
    # (DASHBOARD_USES_OF_CLI).
    "dashboard": {"database", "durable", "operations", "cli"},
}

#: Imports from one area into another that AREA_DEPENDENCIES does not allow
#: in general: the CLI's entry point registers the `pgbroker dashboard`
#: command, which imports no web library until it runs (docs/architecture.md:
#: "only cli/main.py imports it").
ALLOWED_ACROSS = {("pgbroker.cli.main", "pgbroker.dashboard.cli")}
#: What the dashboard may import of the cli area: the options and formats
#: every command shares.
DASHBOARD_USES_OF_CLI = {"pgbroker.cli.options"}


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in AREA_DEPENDENCIES else None


def test_areas_import_only_the_layers_below(graph: dict[str, dict[str, int]]) -> None:
    wrong = sorted(
        f"  {source} -> {target} (line {line})"
        for source, targets in graph.items()
        if source.startswith(LIBRARY + ".") and (area := _area(source)) is not None
        for target, line in targets.items()
        if (other := _area(target)) is not None
        and other != area
        and other not in AREA_DEPENDENCIES[area]
        and (source, target) not in ALLOWED_ACROSS
    )
    assert not wrong, "an area imports one it may not (docs/architecture.md):\n" + "\n".join(wrong)


def test_the_dashboard_and_the_cli_meet_at_two_modules(graph: dict[str, dict[str, int]]) -> None:
    """The dashboard uses cli/options.py alone; only cli/main.py imports it."""
    wrong = sorted(
        f"  {source} -> {target} (line {line})"
        for source, targets in graph.items()
        for target, line in targets.items()
        if (_area(source), _area(target)) in {("dashboard", "cli"), ("cli", "dashboard")}
        and target not in DASHBOARD_USES_OF_CLI
        and (source, target) not in ALLOWED_ACROSS
    )
    assert not wrong, (
        "the dashboard and the CLI import each other beyond their seam:\n" + "\n".join(wrong)
    )


#: The public API of docs/architecture.md ("Public API"): each name imports.
PUBLIC = {
    "pgbroker": ["enqueue_in", "EnqueueError", "send_event", "register_transport", "__version__"],
    "pgbroker.durable": ["DurableTask", "send_event", "waiting", "recorded_steps", "prune"],
    "pgbroker.errors": ["PgBrokerError", "classify", "wrap_exceptions"],
    "pgbroker.flower": ["install"],
    "pgbroker.operations.retention": ["prune"],
    "pgbroker.operations.beat": ["PgScheduler", "add_entry", "update_entry", "disable_entry"],
    "pgbroker.broker.enqueue": ["active_connection"],
}


def test_the_public_api_of_the_docs_imports() -> None:
    import importlib

    doc = (ROOT / "docs" / "architecture.md").read_text()
    for module, names in PUBLIC.items():
        assert f"`{module}`" in doc, module
        imported = importlib.import_module(module)
        for name in names:
            assert getattr(imported, name, None) is not None, f"{module}.{name}"
    for module in ("pgbroker.durable", "pgbroker.errors"):
        imported = importlib.import_module(module)
        assert all(getattr(imported, name, None) is not None for name in imported.__all__)

"""The package's structure as ARCHITECTURE.md states it: no import cycle, packages in layers (no package imports
one above it), the library never imports a command, a small top level, short functions and files. Read from the
source with ``ast`` (nothing is imported, so this runs in a second)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "retrieval"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
MAX_TOP_LEVEL_MODULES = 8  # beside the packages

# The package's layers, bottom first (ARCHITECTURE.md): a unit (a top-level module or a package) imports only
# units of lower layers, and modules of its own package.
LAYERS = [
    {"retrieval", "retrieval.errors", "retrieval.util"},  # the root holds only __version__ and the lazy API
    {"retrieval.config"},
    {"retrieval.dist", "retrieval.knn"},
    {"retrieval.data", "retrieval.metrics", "retrieval.run_folder", "retrieval.cpus"},
    {"retrieval.model"},
    {"retrieval.losses", "retrieval.embed"},
    {"retrieval.index"},
    {"retrieval.report"},
    {"retrieval.train", "retrieval.search"},
    {"retrieval.cli"},
    {"retrieval.__main__"},  # `python -m retrieval`: the command line
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (top level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def _is_command(name: str) -> bool:
    return name == "retrieval.cli" or name.startswith("retrieval.cli.") or name == "retrieval.__main__"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path, or None (depth-first search with colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:  # a package __init__ counted through its children
                continue
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if not colour.get(nxt) and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if not colour.get(node) and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_library_never_imports_a_command():
    bad = {(m, t) for m, targets in _graph().items() if not _is_command(m) for t in targets if _is_command(t)}
    assert not bad, f"library modules importing command modules: {sorted(bad)}"


def _unit(module: str) -> str:
    """The layer table's unit of ``module``: its package (``retrieval.train.trainer`` -> ``retrieval.train``)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _layer(unit: str) -> int:
    for n, units in enumerate(LAYERS):
        if unit in units:
            return n
    raise AssertionError(f"{unit} is in no layer of LAYERS (tests/test_layers.py, ARCHITECTURE.md): place it")


def _upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a unit on the same or a higher layer (another package's modules; not within one package)."""
    return sorted(
        (m, t)
        for m, targets in graph.items()
        for t in targets
        if _unit(m) != _unit(t) and _layer(_unit(t)) >= _layer(_unit(m))
    )


def test_packages_in_layers():
    assert not _upward(_graph()), f"imports of a unit on the same or a higher layer: {_upward(_graph())}"


def test_small_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules beside the packages: {top}"
    for path in PACKAGE.iterdir():  # every package says what it owns and what it may import
        if path.is_dir() and (path / "__init__.py").is_file():
            doc = ast.get_docstring(ast.parse((path / "__init__.py").read_text())) or ""
            assert len(doc) > 80, f"{path.name}/__init__.py: a paragraph saying what the package owns"


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The walkers above find what they look for (a check that cannot fail proves nothing)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = _graph()
    assert "retrieval.embed.sharded" in graph["retrieval.cli.embed"]  # commands call the library
    assert _is_command("retrieval.cli.train") and not _is_command("retrieval.client")
    assert _upward({"retrieval.model.loading": {"retrieval.train.trainer"}})  # a package importing one above it
    assert _upward({"retrieval.index.folder": {"retrieval.train.log"}, "retrieval.train.log": set()})
    assert not _upward({"retrieval.train.trainer": {"retrieval.train.log", "retrieval.model.files"}})


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_short_functions_and_files(path: Path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name}: {len(text.splitlines())} lines"
    long = [
        f"{f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for f in _functions(ast.parse(text))
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"

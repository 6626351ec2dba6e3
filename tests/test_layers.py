"""The package's layering, read from the source: no import cycle among pysparse's modules, and
every import allowed by the ``May import:`` line of the importing room's ``__init__`` docstring
(a room: a subpackage of pysparse, ``passes/``, ``api.py`` or the package root).

The import graph is built with ``ast`` from every ``import`` statement, those inside functions
included: an import deferred to call time is still a dependency, and a cycle hidden that way is
still a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "pysparse"
PASSES = REPO / "passes"


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for the package as it ships (passes/ is
    pysparse.passes)."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    for path in PASSES.glob("*.py"):
        name = "pysparse.passes" if path.stem == "__init__" else f"pysparse.passes.{path.stem}"
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The pysparse modules ``name`` imports (``from pkg import sub`` counts as ``pkg.sub`` when
    that is a module, else as ``pkg``)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pysparse")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "pysparse":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in modules else mod)
    found.discard(name)
    unknown = {m for m in found if m not in modules and m != "pysparse._C"}
    assert not unknown, f"{name} imports modules that do not exist: {sorted(unknown)}"
    return found - {"pysparse._C"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return "main" if parts[1] == "__main__" else parts[1]


def _room_doc(room: str) -> str:
    if room == "root":
        path = PKG / "__init__.py"
    elif room == "passes":
        path = PASSES / "__init__.py"
    elif (PKG / room).is_dir():
        path = PKG / room / "__init__.py"
    else:
        path = PKG / f"{room}.py"
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _allowed(room: str, rooms: set[str]) -> set[str] | None:
    """The rooms ``room`` may import, from its docstring; None: every room."""
    if room == "main":  # python -m pysparse: the CLI's entry point
        return {"cli"}
    m = re.search(r"May import:\s*([^.(]*)", _room_doc(room))
    assert m, f"the docstring of room {room!r} has no 'May import:' line"
    text = " ".join(m.group(1).split())
    if text.startswith("every layer but the CLI"):
        return rooms - {"cli", "main", room}
    if text.startswith("every layer"):
        return None
    if text.startswith("nothing"):
        return set()
    names = {n.strip() for n in text.split(",") if n.strip()}
    bad = names - rooms
    assert not bad, f"room {room!r} names rooms that do not exist: {sorted(bad)}"
    return names


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_among_modules():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_import_is_allowed_by_its_rooms_docstring():
    graph = _graph()
    rooms = {_room(m) for m in graph}
    wrong = []
    for module, deps in sorted(graph.items()):
        room = _room(module)
        allowed = _allowed(room, rooms)
        if allowed is None:
            continue
        for dep in sorted(deps):
            if _room(dep) != room and _room(dep) not in allowed:
                wrong.append(f"{module} imports {dep} (room {room!r} may import {sorted(allowed)})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_rooms_form_layers():
    """The rooms' allowed imports have no cycle, so a lower layer can never import a higher one."""
    rooms = {_room(m) for m in _graph()}
    graph = {r: (rooms - {r} if (a := _allowed(r, rooms)) is None else a) for r in rooms}
    # the CLI and the entry point may import everything; nothing may import them
    for r in ("cli", "main"):
        assert all(r not in deps for k, deps in graph.items() if k not in ("cli", "main")), r
        graph[r] = set()
    cycle = _find_cycle(graph)
    assert cycle is None, "rooms allowed to import each other: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    ("graph", "expect"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_cycle_finder_finds_cycles(graph, expect):
    assert _find_cycle(graph) == expect


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """A deferred import counts (the check that the graph is not only module-level)."""
    modules = {"pysparse.a": tmp_path / "a.py", "pysparse.b": tmp_path / "b.py"}
    modules["pysparse.a"].write_text("def f():\n    from pysparse.b import g\n")
    assert _imports("pysparse.a", modules["pysparse.a"], modules) == {"pysparse.b"}


MAX_FUNCTION_LINES = 120  # past ~80 a function's steps should have names (STYLE.md 18)


def test_no_function_is_longer_than_it_can_be_read():
    long = []
    for path in [*PKG.rglob("*.py"), *PASSES.glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions to split into named steps:\n" + "\n".join(long)

"""The package's shape: no import cycle among its modules (imports inside functions count: a lazy
import hides a cycle from Python at start-up, not from a reader), plug-ins that import only the
layers below them, and modules of a readable size."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "poisongrid"
# Above the plug-ins: nothing in attacks/, detectors/ or remedies/ may import these.
ABOVE_PLUGINS = {"config", "stages", "jobs", "cli", "aggregate", "paths", "estimate", "status", "poisoning", "papers"}
PLUGINS = ("attacks", "detectors", "remedies")
# One thing each, however long: the training loop.
LONG_BUT_ONE_THING = {"training"}
MAX_LINES = 650


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["poisongrid", *parts])] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every poisongrid module `name` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` imports module x
    # An import of a.b.c also runs a and a.b; the edge that matters is to the deepest module named.
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("plugin", PLUGINS)
def test_plugins_import_only_the_layers_below(plugin):
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(f"poisongrid.{plugin}"):
            above = {d for d in deps if d.count(".") and d.split(".")[1] in ABOVE_PLUGINS}
            assert not above, f"{name} imports {sorted(above)}"


def test_modules_hold_one_thing_of_a_readable_size():
    long = {name: len(path.read_text().splitlines()) for name, path in _modules().items()
            if len(path.read_text().splitlines()) > MAX_LINES and name.split(".")[-1] not in LONG_BUT_ONE_THING}
    assert long == {}

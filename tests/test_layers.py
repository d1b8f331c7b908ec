"""The import graph of `lmm/`: dependencies point one way, and no two packages import each other.

Layers, top to bottom: the CLI and REPL (chat, repl, repl_text, commands), the session, the engine
(engine, learning, consolidation, teacher, hook), the benchmark beside them, then `backends` and `memory`,
which meet only through the shared types below them (types, ops, optim, chat_format, chat_tokenizer,
state, lock, events, models, model_cache, testing).
Every `import` is read from the source, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lmm"
LAYERS = [
    {"chat", "repl", "repl_text", "commands"},
    {"session"},
    {"bench"},
    {"engine", "turns", "learning", "consolidation", "teacher", "hook"},
    {"backends", "memory"},
    {"types", "ops", "optim", "chat_format", "chat_tokenizer", "state", "lock", "events", "models", "model_cache",
     "testing", "__init__"},
]


def unit(module: str) -> str:
    """`lmm.backends.base` -> `backends`; `lmm.engine` -> `engine`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("lmm", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        deps = graph.setdefault(unit(name), set())
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            deps.update(unit(t) for t in targets if t == "lmm" or t.startswith("lmm."))
        deps.discard(unit(name))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of units that import each other, directly or through others (Tarjan's SCCs > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_cycle_between_packages() -> None:
    graph = import_graph()
    assert {"backends", "memory", "engine", "types"} <= set(graph)
    assert cycles(graph) == []


def test_cycle_check_catches_a_cycle() -> None:
    """Positive control: the old backends <-> memory imports form a cycle the check reports."""
    graph = {k: set(v) for k, v in import_graph().items()}
    graph["backends"].add("memory")
    graph["memory"].add("backends")
    assert ["backends", "memory"] in cycles(graph)


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_dependencies_point_down(layer: int) -> None:
    graph = import_graph()
    above = set().union(*LAYERS[:layer]) if layer else set()
    same_middle = {"backends", "memory"} if "backends" in LAYERS[layer] else set()
    for unit_name in LAYERS[layer]:
        bad = graph.get(unit_name, set()) & (above | (same_middle - {unit_name}))
        assert not bad, f"lmm.{unit_name} imports {sorted(bad)}, which sit above it or beside it"
    assert set(graph) <= set().union(*LAYERS), f"units in no layer: {set(graph) - set().union(*LAYERS)}"

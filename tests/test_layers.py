"""The package's layering (docs/architecture.md): data flows cli -> slurm/bench -> engine ->
model/data -> the base modules, never upwards, and no two modules import each other (directly or
round a circle), whether the import sits at the top of a file or inside a function."""

import ast
from pathlib import Path
from typing import Dict, Set

from tests.support import REPO

PACKAGE = REPO / "side4video"
# Lower number = lower layer; a module may import its own layer's package and any lower layer.
LAYERS = {  # the base modules use each other freely; above them, siblings stay apart
    "errors": 0,
    "logs": 0,
    "patterns": 0,
    "precision": 0,
    "signals": 0,
    "config": 0,
    "distributed": 0,
    "allocator": 0,
    "data": 1,
    "model": 1,
    "engine": 2,
    "slurm": 3,
    "bench": 3,
    "cli": 4,
}


def _unit(module: str) -> str:
    """side4video.data.stream -> data; side4video.config -> config."""
    return module.split(".")[1]


def _imports() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("side4video."):
                found.add(node.module)
                found.update(
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if (PACKAGE / Path(*node.module.split(".")[1:]) / f"{a.name}.py").is_file()
                )
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("side4video."))
        graph[name] = found
    return graph


def test_no_upward_import():
    upward = []
    for module, imported in _imports().items():
        if module == "side4video":
            continue
        for target in imported:
            a, b = _unit(module), _unit(target)
            if a == b:
                continue
            # base modules (layer 0) may use each other; data and model stay apart, and so on
            if LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] > 0):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_circle():
    imports = _imports()
    graph = {m: {t for t in targets if t in imports} for m, targets in imports.items()}
    # a package's __init__ re-exporting its own modules is not a circle of the code
    graph = {m: {t for t in ts if not (m.count(".") == 1 and t.startswith(m + "."))} for m, ts in graph.items()}
    seen, stack, circles = set(), [], []

    def visit(node):
        if node in stack:
            circles.append(stack[stack.index(node) :] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for module in sorted(graph):
        visit(module)
    assert not circles, circles

"""The shape of src/memtrain, read from its source: no import circles and no class too big to find one's way in.

Every import statement counts, module level and inside functions alike (a deferred import hides a circle from
Python's import machinery, not from the reader), so the module graph is built with `ast`, never by importing.
"""

from __future__ import annotations

import ast
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "memtrain"
MAX_CLASS_LINES = 300


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name a (possibly relative) `from ... import` refers to."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _dependencies(importer: str, imported: str, modules: dict[str, Path]) -> set[str]:
    """Importing `a.b.c` runs `a/__init__`, `a/b/__init__` and `a/b/c`: a dependency on each that is ours, except
    the importer's own parent packages (Python has already started those before the importer runs)."""
    return (({imported} | _ancestors(imported)) & modules.keys()) - _ancestors(importer)


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    deps |= _dependencies(module, alias.name, modules)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                deps |= _dependencies(module, base, modules)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:  # `from memtrain.evaluation import data`: a submodule
                        deps.add(f"{base}.{alias.name}")
                    elif base in modules:  # a name defined in (or re-exported by) the module or package __init__
                        deps.add(base)
        deps.discard(module)
        graph[module] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle in the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_is_read_from_every_import_statement():
    graph = _import_graph()
    assert "memtrain.trainer" in graph and "memtrain.grpo" in graph["memtrain.trainer"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    assert _resolve("memtrain.data.longqa", False, 2, "evaluation") == "memtrain.evaluation"
    assert _resolve("memtrain.data", True, 1, "output") == "memtrain.data.output"


def test_no_import_cycle_in_the_package():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle in src/memtrain: " + " -> ".join(cycle)


def test_no_class_over_the_line_limit():
    too_big = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef) and (lines := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                too_big.append(f"{module}.{node.name}: {lines} lines")
    assert not too_big, f"classes over {MAX_CLASS_LINES} lines: {too_big}"

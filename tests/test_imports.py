"""The import graph of exl2core, read from the source (every import statement, also those inside functions):
the core imports no plugin, and no module imports itself through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "exl2core"
PLUGINS = ("exl2_llama", "exl2_gemma", "exl2_mixtral", "exl2_vision", "exl2_cohere", "plugins")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """Every module an import statement of ``tree`` names (``from a import b`` names ``a.b`` when that
    is a module, else ``a``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in modules else node.module)
    return names


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imported(ast.parse(path.read_text()), set(files)) for name, path in files.items()}


def test_the_core_imports_no_plugin():
    bad = {f"{m} imports {n}" for m, names in import_graph().items() for n in names if n.split(".")[0] in PLUGINS}
    assert not bad, sorted(bad)


def test_forwards_do_not_ask_the_plugins():
    """What a forward needs is in its module's plan data: ``exl2core.modules`` never reaches the plugins."""
    graph = import_graph()
    assert not {m for m, names in graph.items() if m.startswith("exl2core.modules") and "exl2core.plugins" in names}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search over the core's modules)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node] & graph.keys()):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]

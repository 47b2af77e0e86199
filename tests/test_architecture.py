"""The core's import structure (issue 11, "a core without cycles").

Every ``import``/``from ... import`` node anywhere in a ``nestar_lab/*.py`` file counts: at module
level, inside functions (lazy imports), and inside ``if TYPE_CHECKING:`` blocks too. A
typing-only import never runs, but it still says that one module's meaning depends on the
other's, so it counts like any other; none of the core needs one today.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nestar_lab

CORE = Path(nestar_lab.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute, relative ones resolved to ``nestar_lab.*``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: nestar_lab is a flat package
                base = "nestar_lab" + (f".{base}" if base else "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # ``from nestar_lab import x``
    return names


def core_graph() -> dict[str, set[str]]:
    """``nestar_lab.<module>`` -> the core modules it imports."""
    modules = {f"nestar_lab.{p.stem}": p for p in CORE.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_detector_sees_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lazy_and_typing_imports_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from nestar_lab.experiment import Experiment\n"
        "def f():\n    from nestar_lab import losses\n    import nestar_lab.sample\n"
    )
    seen = _imports(src)
    assert {"nestar_lab.experiment", "nestar_lab.losses", "nestar_lab.sample"} <= seen


def test_core_imports_have_no_cycle():
    graph = core_graph()
    assert len(graph) > 15  # the glob found the core
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in nestar_lab: " + " -> ".join(cycle)


def test_core_never_imports_plugins():
    """The core finds plugins through the entry-point registry only, never by importing them."""
    offenders = {
        path.name: sorted(m for m in _imports(path) if m.split(".")[0] in ("nestar_plugins", "plugins", "nestar_examples"))
        for path in CORE.glob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}

"""The core's import structure: no cycles, and arrows between the layers pointing down only.

Layers (DESIGN.md 5): ``method/`` (the NestAR mechanics) imports only ``interfaces``; ``config/``
never imports ``run/`` or ``sweep/``; ``run/`` never imports ``sweep/``; plugins import only
``interfaces``, ``hookspecs`` and ``method/``. Every ``import``/``from ... import`` node anywhere in
a core file counts: at module level, inside functions (lazy imports), and inside
``if TYPE_CHECKING:`` blocks too. A typing-only import never runs, but it still says that one
module's meaning depends on the other's, so it counts like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nestar_lab

CORE = Path(nestar_lab.__file__).parent
PLUGINS = CORE.parent / "plugins"
LAYERS = ("method", "config", "run", "sweep")
FORBIDDEN = {  # layer -> the core packages it must not import
    "method": ("nestar_lab.config", "nestar_lab.run", "nestar_lab.sweep", "nestar_lab.cli", "nestar_lab.hookspecs"),
    "config": ("nestar_lab.run", "nestar_lab.sweep", "nestar_lab.cli"),
    "run": ("nestar_lab.sweep", "nestar_lab.cli"),
    "sweep": ("nestar_lab.cli",),
    "plugins": ("nestar_lab.config", "nestar_lab.run", "nestar_lab.sweep", "nestar_lab.cli"),
}


def module_name(path: Path) -> str:
    """``nestar_lab/run/train.py`` -> ``nestar_lab.run.train`` (a package's ``__init__`` -> the package)."""
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute, relative ones resolved to ``nestar_lab.*``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's own package
                package = module_name(path).split(".")[: -node.level] if path.is_relative_to(CORE) else ["nestar_lab"]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # ``from nestar_lab import x``
    return names


def core_graph() -> dict[str, set[str]]:
    """``nestar_lab.<package>.<module>`` -> the core modules it imports (packages' ``__init__`` included)."""
    modules = {module_name(p): p for p in core_files()}
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
        "if TYPE_CHECKING:\n    from nestar_lab.run.experiment import Experiment\n"
        "def f():\n    from nestar_lab.method import losses\n    import nestar_lab.method.sample\n"
    )
    seen = _imports(src)
    assert {"nestar_lab.run.experiment", "nestar_lab.method.losses", "nestar_lab.method.sample"} <= seen


def test_core_imports_have_no_cycle():
    graph = core_graph()
    assert len(graph) > 15  # the glob found the core
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in nestar_lab: " + " -> ".join(cycle)


def test_core_never_imports_plugins():
    """The core finds plugins through the entry-point registry only, never by importing them."""
    offenders = {
        path.name: sorted(m for m in _imports(path) if m.split(".")[0] in ("nestar_plugins", "plugins", "nestar_examples"))
        for path in core_files()
    }
    assert not {k: v for k, v in offenders.items() if v}


def _layer_of(path: Path) -> str | None:
    rel = path.relative_to(CORE).parts
    return rel[0] if len(rel) > 1 and rel[0] in LAYERS else None


def test_the_core_is_in_layers():
    """Only the plugin contract, the hooks and the command line stay at the top of the package."""
    top = sorted(p.name for p in CORE.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "hookspecs.py", "interfaces.py"], top
    for layer in LAYERS:
        assert len(list((CORE / layer).glob("*.py"))) > 1, f"{layer}/ holds no modules"


def test_every_arrow_between_layers_points_down():
    """method -> interfaces only; config never -> run, sweep; run never -> sweep; lazy imports too."""
    wrong = {}
    for path in core_files():
        layer = _layer_of(path)
        if layer is None:
            continue
        bad = sorted(m for m in _imports(path) if m.startswith(FORBIDDEN[layer]))
        if bad:
            wrong[str(path.relative_to(CORE))] = bad
    assert not wrong, wrong


def test_method_imports_only_the_interfaces_and_itself():
    allowed = ("nestar_lab.interfaces", "nestar_lab.method")
    wrong = {
        path.name: sorted(m for m in _imports(path) if m.startswith("nestar_lab") and not m.startswith(allowed))
        for path in (CORE / "method").glob("*.py")
    }
    assert not {k: v for k, v in wrong.items() if v}, wrong


def test_plugins_import_only_interfaces_hookspecs_and_method():
    allowed = ("nestar_lab.interfaces", "nestar_lab.hookspecs", "nestar_lab.method")
    wrong = {}
    for path in sorted(PLUGINS.rglob("*.py")):
        bad = sorted(m for m in _imports(path) if m.startswith("nestar_lab") and m != "nestar_lab"
                     and not m.startswith(allowed))  # fmt: skip
        if bad:
            wrong[str(path.relative_to(PLUGINS))] = bad
    assert not wrong, wrong


def test_a_forbidden_arrow_would_be_seen(tmp_path):
    """The layer check reads lazy imports inside functions (the kind a shortcut adds)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from nestar_lab.sweep.tuning import run_study\n")
    assert any(m.startswith(FORBIDDEN["run"]) for m in _imports(src))


def test_no_module_re_exports_what_it_does_not_use():
    """One home per name: a core module imports a core name only to use it (no ``noqa: F401``)."""
    offenders = [str(p.relative_to(CORE)) for p in core_files() if "noqa: F401" in p.read_text()]
    assert not offenders, offenders

"""Plugin discovery: every plugin, built-in or third-party, arrives through one entry-point group.

One bad package never breaks the others. A package whose entry point fails to import (or whose
hooks are misspelt or raise) is recorded as a :class:`PluginProblem` and skipped; so is a
second plugin of one kind with one name. Commands that do not need them go on (the CLI prints
one warning line per problem); asking for an unknown name says which package failed to load,
and asking for a duplicated name names both providers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import pluggy

from nestar_lab import hookspecs
from nestar_lab.config.errors import BadInput, one_line
from nestar_lab.hookspecs import KINDS, PROJECT, hook_name
from nestar_lab.interfaces import Plugin


class PluginError(BadInput, ValueError):
    """A plugin cannot be found, is registered twice, or its package failed to load (exit code 2)."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin: its kind, name, class and the distribution/module providing it."""

    kind: str
    name: str
    cls: type
    provider: str


@dataclass(frozen=True)
class PluginProblem:
    """A plugin package (or one of its plugins) that could not be registered; ``message`` is one line."""

    provider: str
    message: str
    broken: bool = True  # False: a duplicate name (the package itself loaded)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus who provides each plugin and what failed to load."""

    def __init__(self, project_name: str):
        super().__init__(project_name)
        self.providers: dict[str, str] = {}  # plugin name -> 'distribution version (entry point)'
        self.problems: list[PluginProblem] = []


class Registry:
    """All plugins of all kinds, gathered from a pluggy plugin manager."""

    def __init__(self, manager: pluggy.PluginManager):
        self.manager = manager
        self._plugins: dict[str, dict[str, PluginInfo]] = {k: {} for k in KINDS}
        self._duplicates: dict[tuple[str, str], list[str]] = {}  # (kind, name) -> every provider
        self.problems: list[PluginProblem] = list(getattr(manager, "problems", []))
        self._warned = False
        providers = getattr(manager, "providers", {})
        for kind in KINDS:
            caller = getattr(manager.hook, hook_name(kind))
            for impl in caller.get_hookimpls():
                provider = providers.get(impl.plugin_name, impl.plugin_name)
                try:
                    found = impl.function() or {}
                    if not isinstance(found, dict):
                        raise TypeError(f"returned {type(found).__name__}, not a dict of name -> class")
                except Exception as exc:
                    self.problems.append(PluginProblem(provider, (
                        f"plugin package {provider}: {hook_name(kind)} failed ({type(exc).__name__}: {one_line(exc)}); "
                        f"its {kind} plugins are skipped: fix or uninstall it"
                    )))  # fmt: skip
                    continue
                for name, cls in found.items():
                    wrong = _wrong_kind(kind, name, cls)
                    if wrong:
                        self.problems.append(PluginProblem(provider, f"plugin package {provider}: {wrong}; skipped"))
                        continue
                    self._add(PluginInfo(kind, name, cls, provider))
        for (kind, name), names in self._duplicates.items():
            self.problems.append(PluginProblem(names[-1], _duplicate_message(kind, name, names), broken=False))

    def _add(self, info: PluginInfo) -> None:
        existing = self._plugins[info.kind].get(info.name)
        if existing is None:
            self._plugins[info.kind][info.name] = info
        else:
            self._duplicates.setdefault((info.kind, info.name), [existing.provider]).append(info.provider)

    def names(self, kind: str) -> list[str]:
        """Sorted names of the registered plugins of ``kind``."""
        return sorted(self._kind(kind))

    def info(self, kind: str, name: str) -> PluginInfo:
        """The plugin ``name`` of ``kind``; an unknown name lists the names that exist (and the
        packages that failed to load); a duplicated name names every provider."""
        plugins = self._kind(kind)
        if (kind, name) in self._duplicates:
            raise PluginError(_duplicate_message(kind, name, self._duplicates[(kind, name)]))
        if name not in plugins:
            broken = [p for p in self.problems if p.broken]
            note = f"; perhaps it is in a package that failed to load: {broken[0].message}" if len(broken) == 1 else (
                f"; perhaps it is in a package that failed to load: {', '.join(p.provider for p in broken)} "
                "(`nestar plugins` says why)" if broken else "")  # fmt: skip
            raise PluginError(
                f"unknown {kind} {name!r}; registered {kind} plugins: {', '.join(sorted(plugins)) or 'none'}{note}"
            )
        return plugins[name]

    def get(self, kind: str, name: str) -> type:
        """The class of plugin ``name`` of ``kind``."""
        return self.info(kind, name).cls

    def all(self) -> list[PluginInfo]:
        """Every plugin, ordered by kind then name."""
        return [self._plugins[k][n] for k in KINDS for n in sorted(self._plugins[k])]

    def warn_problems(self, file: TextIO | None = None) -> None:
        """Print one ``warning:`` line per problem (once per registry)."""
        if self._warned:
            return
        self._warned = True
        for problem in self.problems:
            print(f"warning: {problem.message}", file=file or sys.stderr)

    def _kind(self, kind: str) -> dict[str, PluginInfo]:
        if kind not in self._plugins:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self._plugins[kind]


def _wrong_kind(kind: str, name: str, cls: Any) -> str | None:
    """Why ``cls`` cannot be the ``kind`` plugin ``name`` (not a class, or a class of another kind),
    or ``None``. Each interface names its kind (``Plugin.plugin_kind``)."""
    if not isinstance(cls, type):
        return f"{kind} {name!r} is {type(cls).__name__} {cls!r}, not a class"
    found = getattr(cls, "plugin_kind", None) if issubclass(cls, Plugin) else None
    if found == kind:
        return None
    what = f"a {found} plugin" if found else "no nestar_lab plugin class"
    return (f"{kind} {name!r} is {cls.__module__}.{cls.__qualname__}, {what}; {kind} plugins subclass "
            f"the {kind} interface (nestar_lab.interfaces, or nestar_lab.method.generator.Generator)")


def _duplicate_message(kind: str, name: str, providers: list[str]) -> str:
    froms = ", ".join(f"one from {p}" for p in sorted(providers))  # sorted: the same line whatever the load order
    return f"two {kind} plugins are named {name!r}: {froms}; rename or uninstall one of them"


def _load_entry_points(manager: PluginManager) -> None:
    """Register every ``nestar_lab`` entry point; one that fails is recorded and skipped."""
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != PROJECT or manager.is_blocked(ep.name):
                continue
            dist_name = dist.metadata["Name"] or getattr(dist, "name", None) or "?"
            provider = f"{dist_name} {dist.version} ({ep.name})"
            if manager.has_plugin(ep.name):
                if manager.providers.get(ep.name) != provider:  # the same dist seen twice on sys.path is fine
                    manager.problems.append(PluginProblem(provider, (
                        f"plugin package {provider}: entry point name {ep.name!r} is taken by "
                        f"{manager.providers.get(ep.name, ep.name)}; skipped: rename the entry point or uninstall one"
                    )))  # fmt: skip
                continue
            try:
                plugin = ep.load()
                manager.register(plugin, name=ep.name)
            except Exception as exc:
                manager.problems.append(PluginProblem(provider, (
                    f"plugin package {provider} failed to load ({ep.value}: {type(exc).__name__}: {one_line(exc)}); "
                    f"its plugins are skipped: fix or uninstall {dist_name}"
                )))  # fmt: skip
                continue
            manager.providers[ep.name] = provider


def _check_pending(manager: PluginManager) -> None:
    """A misspelt hook name: an installed package's plugin is skipped with a problem recorded;
    a plugin registered in code (a notebook, a test) fails loudly."""
    while True:
        try:
            manager.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = manager.get_name(exc.plugin)
            if name not in manager.providers:
                raise
            provider = manager.providers.pop(name)
            manager.unregister(exc.plugin)
            manager.problems.append(PluginProblem(provider, (
                f"plugin package {provider}: {one_line(exc)}; its plugins are skipped: fix or uninstall it"
            )))  # fmt: skip


def make_manager(extra_plugins: tuple[Any, ...] = ()) -> PluginManager:
    """A plugin manager with every ``nestar_lab`` entry point loaded, plus ``extra_plugins``."""
    manager = PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    _load_entry_points(manager)
    for plugin in extra_plugins:  # e.g. plugins registered in a notebook or a test
        manager.register(plugin, name=getattr(plugin, "__name__", type(plugin).__qualname__))
    _check_pending(manager)  # a misspelt hook name in code fails here, loudly
    return manager


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (discovered once; call ``get_registry.cache_clear()`` to rescan)."""
    return Registry(make_manager())

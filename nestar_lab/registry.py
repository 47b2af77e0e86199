"""Plugin discovery: every plugin, built-in or third-party, arrives through one entry-point group."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pluggy

from nestar_lab import hookspecs
from nestar_lab.hookspecs import KINDS, PROJECT, hook_name


class PluginError(ValueError):
    """A plugin cannot be found or is registered twice."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin: its kind, name, class and the distribution/module providing it."""

    kind: str
    name: str
    cls: type
    provider: str


class Registry:
    """All plugins of all kinds, gathered from a pluggy plugin manager."""

    def __init__(self, manager: pluggy.PluginManager):
        self.manager = manager
        self._plugins: dict[str, dict[str, PluginInfo]] = {k: {} for k in KINDS}
        providers = _providers(manager)
        for kind in KINDS:
            caller = getattr(manager.hook, hook_name(kind))
            for impl in caller.get_hookimpls():
                provider = providers.get(impl.plugin_name, impl.plugin_name)
                for name, cls in (impl.function() or {}).items():
                    self._add(PluginInfo(kind, name, cls, provider))

    def _add(self, info: PluginInfo) -> None:
        existing = self._plugins[info.kind].get(info.name)
        if existing is not None:
            raise PluginError(
                f"two {info.kind} plugins are named {info.name!r}: one from {existing.provider}, "
                f"one from {info.provider}; rename or uninstall one of them"
            )
        self._plugins[info.kind][info.name] = info

    def names(self, kind: str) -> list[str]:
        """Sorted names of the registered plugins of ``kind``."""
        return sorted(self._kind(kind))

    def info(self, kind: str, name: str) -> PluginInfo:
        """The plugin ``name`` of ``kind``; an unknown name lists the names that exist."""
        plugins = self._kind(kind)
        if name not in plugins:
            raise PluginError(
                f"unknown {kind} {name!r}; registered {kind} plugins: {', '.join(sorted(plugins)) or 'none'}"
            )
        return plugins[name]

    def get(self, kind: str, name: str) -> type:
        """The class of plugin ``name`` of ``kind``."""
        return self.info(kind, name).cls

    def all(self) -> list[PluginInfo]:
        """Every plugin, ordered by kind then name."""
        return [self._plugins[k][n] for k in KINDS for n in sorted(self._plugins[k])]

    def _kind(self, kind: str) -> dict[str, PluginInfo]:
        if kind not in self._plugins:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self._plugins[kind]


def _providers(manager: pluggy.PluginManager) -> dict[str, str]:
    """Map plugin names to 'distribution version (entry point)' for display and error messages."""
    out = {}
    for plugin, dist in manager.list_plugin_distinfo():
        name = manager.get_name(plugin)
        out[name] = f"{dist.project_name} {dist.version} ({name})"
    return out


def make_manager(extra_plugins: tuple[Any, ...] = ()) -> pluggy.PluginManager:
    """A plugin manager with every ``nestar_lab`` entry point loaded, plus ``extra_plugins``."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.load_setuptools_entrypoints(PROJECT)
    for plugin in extra_plugins:  # e.g. plugins registered in a notebook or a test
        manager.register(plugin, name=getattr(plugin, "__name__", type(plugin).__qualname__))
    manager.check_pending()  # a misspelt hook name fails here, loudly
    return manager


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (discovered once; call ``get_registry.cache_clear()`` to rescan)."""
    return Registry(make_manager())

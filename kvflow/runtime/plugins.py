"""Named plugins of one kind: engines, discovery backends, event planes, KV transfer backends.

Each kind has one `PluginRegistry`. Built-ins register in code, from their own module
(`registry.add(name, obj)`) or, where they need an optional dependency, as a factory that
imports it when called. Other distributions add theirs through the registry's entry-point
group in their package metadata, e.g.

    [project.entry-points."kvflow.discovery"]
    consul = "kvflow_consul:make_discovery"

and are then chosen by name like the built-ins (`--discovery consul`). The group is read
whenever a lookup misses, and by `names()`. A plugin whose
module needs a package that is not installed is left out (logged at DEBUG), like a
built-in engine without torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class UnknownPluginError(KeyError, ValueError):
    """A name no registered plugin of the kind has (a KeyError and a ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0])


class PluginRegistry(Generic[T]):
    """Plugins of one kind by name: built-ins plus the entry points of `group`."""

    def __init__(self, kind: str, group: str, *, builtin_modules: tuple[str, ...] = (),
                 check: Callable[[str, Any], T] | None = None) -> None:
        self.kind = kind
        self.group = group
        # Modules that register built-ins when imported (imported on first lookup).
        self._builtin_modules = builtin_modules
        # Validates (and may convert) what an entry point names; TypeError when wrong.
        self._check = check
        self._plugins: dict[str, T] = {}
        self._loaded = False

    def add(self, name: str, plugin: T) -> T:
        """Register `plugin` as `name`; the same object again is a no-op."""
        known = self._plugins.get(name)
        if known is not None and known is not plugin:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._plugins[name] = plugin
        return plugin

    def discard(self, name: str) -> None:
        """Forget `name` (a plugin whose distribution was removed; tests)."""
        self._plugins.pop(name, None)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda plugin: self.add(name, plugin)

    def find(self, name: str) -> T | None:
        """The plugin called `name`, or None (entry points are read only on a miss)."""
        plugin = self._plugins.get(name)
        if plugin is None:
            self.load()
            plugin = self._plugins.get(name)
        return plugin

    def get(self, name: str) -> T:
        """The plugin called `name`; UnknownPluginError naming the known ones otherwise."""
        plugin = self.find(name)
        if plugin is None:
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}")
        return plugin

    def names(self) -> list[str]:
        self.load()
        return sorted(self._plugins)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def load(self) -> None:
        """Import the built-in modules (once) and register the group's entry points not
        registered yet (read again each time: a distribution may have been installed)."""
        if not self._loaded:
            self._loaded = True
            for module in self._builtin_modules:
                _optional(lambda m=module: importlib.import_module(m), module)
        for ep in importlib.metadata.entry_points(group=self.group):
            if ep.name not in self._plugins:
                self._add_entry_point(ep)

    def _add_entry_point(self, ep: importlib.metadata.EntryPoint) -> None:
        plugin = _optional(ep.load, ep.module)
        if plugin is None:
            return
        if self._check is not None:
            plugin = self._check(ep.name, plugin)
        self.add(ep.name, plugin)


def _optional(load: Callable[[], Any], module: str) -> Any:
    """`load()`, or None when it fails only for lack of a third-party package."""
    try:
        return load()
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.startswith("kvflow") and missing != module:
            raise
        log.debug("plugin module %s unavailable: %s", module, exc)
        return None

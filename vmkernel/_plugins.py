"""Building a kernel's plugin manager: specs, explicit plugins, entry points, blocking.

Built-in features ship in the separate ``vmkernel-plugins`` distribution and
load through the ``vmkernel`` entry-point group exactly like a third-party
plugin, so nothing here knows any plugin by name.  As in pytest, a plugin can
be blocked by name and autoloading can be switched off by argument or by
environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from vmkernel import hookspecs
from vmkernel.errors import InvalidArgument, PluginError

__all__ = [
    "AUTOLOAD_ENV",
    "BLOCK_ENV",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "build_plugin_manager",
    "call_impl",
    "describe_plugins",
]

ENTRY_POINT_GROUP = "vmkernel"
#: Set to any non-empty value to stop plugins loading from entry points.
AUTOLOAD_ENV = "VMKERNEL_DISABLE_PLUGIN_AUTOLOAD"
#: Comma-separated plugin names never to register.
BLOCK_ENV = "VMKERNEL_BLOCK_PLUGINS"


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What ``vmkernel plugins`` shows about one registered plugin."""

    name: str
    source: str
    hooks: tuple[str, ...]


def _plugin_name(plugin: Any) -> str:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    return type(plugin).__name__ if not isinstance(plugin, type) else plugin.__name__


def autoload_default() -> bool:
    return not os.environ.get(AUTOLOAD_ENV)


def blocked_from_env() -> list[str]:
    return [name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()]


def build_plugin_manager(
    plugins: Iterable[Any] | None = None,
    *,
    autoload: bool | None = None,
    block: Sequence[str] = (),
) -> pluggy.PluginManager:
    """A new plugin manager with vmkernel's hook specs and the chosen plugins registered.

    Raises :class:`PluginError` for a plugin that fails to import, implements
    a hook with a wrong signature or implements a hook that does not exist.
    """
    if isinstance(block, str):
        raise InvalidArgument("block", block, "a list of plugin names, not a single str")
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    # Historic: every plugin registered below gets vmk_addhooks as it registers,
    # so hooks one plugin adds are known before check_pending() runs.
    pm.hook.vmk_addhooks.call_historic(kwargs={"pluginmanager": pm})
    for name in [*block, *blocked_from_env()]:
        pm.set_blocked(name)
    for plugin in plugins or ():
        name = _plugin_name(plugin)
        if pm.is_blocked(name):
            continue
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(name, str(exc), "hook implementations matching vmkernel/hookspecs.py") from exc
        except ValueError as exc:
            raise PluginError(name, str(exc), "each plugin registered once under a unique name") from exc
    if autoload is None:
        autoload = autoload_default()
    if autoload:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                _plugin_name(exc.plugin), str(exc), "hook implementations matching vmkernel/hookspecs.py"
            ) from exc
        except Exception as exc:  # an entry point whose import fails: name it, never crash bare
            raise PluginError(
                "entry point", f"{type(exc).__name__}: {exc}", "importable plugin modules"
            ) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            _plugin_name(exc.plugin), str(exc), "only hooks that vmkernel defines (misspelled?)"
        ) from exc
    return pm


def call_impl(impl: Any, **kwargs: Any) -> Any:
    """Call one hook implementation with just the arguments it declares.

    For hooks where each plugin must be called on its own (observers, rollback,
    unconfigure), so that one failure cannot hide the call from the others;
    pluggy lets an implementation declare fewer arguments than the spec.
    """
    return impl.function(*[kwargs[name] for name in impl.argnames])


def describe_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every registered plugin with where it came from and the hooks it implements."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(id(plugin))
        if dist is not None:
            source = f"entry point of {dist.project_name} {dist.version}"
        else:
            source = "passed explicitly"
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        infos.append(PluginInfo(name=name, source=source, hooks=hooks))
    return infos

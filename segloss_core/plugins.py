"""Plugin loading: the pluggy manager, entry-point loading, calling the hooks, and what went wrong.

Loading is lazy (first use of the registry) and happens once. Each entry point of the group
``segloss`` is imported in its own ``try``: one broken plugin becomes a warning and a
:class:`PluginProblem`, never an error for the others. Environment switches:

``SEGLOSS_DISABLE_PLUGIN_AUTOLOAD=1``
    load only the entry points of the ``segloss`` distribution itself (numpy, torch,
    cupy backends), no third-party plugin — for debugging.
``SEGLOSS_LOAD_PLUGINS=a,b``
    load only these entry points (by name).
``SEGLOSS_TRACE_PLUGINS=1``
    print every hook call (pluggy tracing) to stderr.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs

GROUP = "segloss"
# The name on the package index. "segloss" there is an unrelated project (0.0.1, 2022): every install
# hint says this name; the import names (segloss_core, segloss_torch, ...) and the group stay "segloss".
DISTRIBUTION = "segloss-registry"
BUILTIN_LOSSES_PLUGIN = "segloss.losses"
BUILTIN_PACKAGES = frozenset({"segloss_core", "segloss_torch", "segloss_cupy"})


class SeglossPluginWarning(UserWarning):
    """A plugin failed to load or registered something invalid."""


@dataclass(frozen=True)
class PluginProblem:
    """Something a plugin did wrong; shown by ``segloss backends`` and kept for errors."""

    plugin: str
    stage: str  # "import", "register", "hook", "validate"
    message: str
    error: BaseException | None = None

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} ({self.stage}): {self.message}"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


class SeglossPluginManager(pluggy.PluginManager):
    """pluggy's manager, telling the registry when plugins come and go (tests register
    throwaway plugins with ``register(obj, name=...)``)."""

    def __init__(self, on_change: Callable[[], None]):
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self._on_change = on_change
        if _truthy("SEGLOSS_TRACE_PLUGINS"):
            self.trace.root.setwriter(lambda text: sys.stderr.write(text))
            self.enable_tracing()

    def register(self, plugin: object, name: str | None = None) -> str | None:
        result = super().register(plugin, name)
        self._on_change()
        return result

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        result = super().unregister(plugin, name)
        self._on_change()
        return result


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)


def _distribution_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"] if dist is not None else "") or ""


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    """An entry point of segloss's own packages (whatever the distribution that installed them is called)."""
    return ep.value.split(":", 1)[0].split(".", 1)[0] in BUILTIN_PACKAGES


def load_entry_points(pm: SeglossPluginManager, problems: list[PluginProblem]) -> dict[str, PluginProblem]:
    """Import and register every entry point; returns {entry-point name: problem} for broken ones."""
    broken: dict[str, PluginProblem] = {}
    only = {n.strip() for n in os.environ.get("SEGLOSS_LOAD_PLUGINS", "").split(",") if n.strip()}
    builtin_only = _truthy("SEGLOSS_DISABLE_PLUGIN_AUTOLOAD")
    for ep in _entry_points():
        if only and ep.name not in only:
            continue
        if builtin_only and not _is_builtin(ep):
            continue
        if pm.has_plugin(ep.name):
            dist = _distribution_name(ep)
            problem = PluginProblem(
                ep.name, "register", f"two entry points are named {ep.name!r}; the one from {dist!r} was skipped"
            )
            problems.append(problem)
            warnings.warn(str(problem), SeglossPluginWarning, stacklevel=3)
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
            problem = PluginProblem(ep.name, "import", f"{type(exc).__name__}: {exc}", exc)
            problems.append(problem)
            broken[ep.name] = problem
            warnings.warn(f"segloss: {problem}", SeglossPluginWarning, stacklevel=3)
    while True:  # a misspelt hook name fails its own plugin only
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            pm.unregister(exc.plugin)
            problem = PluginProblem(name, "validate", str(exc), exc)
            problems.append(problem)
            broken[name] = problem
            warnings.warn(f"segloss: {problem}", SeglossPluginWarning, stacklevel=3)
    return broken


def call_register_hook(
    pm: SeglossPluginManager, hook_name: str, add: Callable[[Any, str, bool], None], *, first: str = ""
) -> list[PluginProblem]:
    """Call the register-callback hook ``hook_name`` of every plugin, each through pluggy's hook caller.

    Each plugin gets its own ``register(obj, override=False)`` (so ``add`` learns which plugin
    registered ``obj``) and its own call of a subset hook caller: pluggy's tracing
    (``SEGLOSS_TRACE_PLUGINS=1``) sees every call, and a plugin that raises breaks only itself.
    Plugin ``first`` is called first, then the others in registration order (so overrides
    are decided predictably). Returns the problems: a hook that raised (with the error) or
    returned a value.
    """
    problems: list[PluginProblem] = []
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    impls = sorted(impls, key=lambda impl: impl.plugin_name != first)
    for impl in impls:
        plugin = impl.plugin_name

        def register(obj: Any, override: bool = False, _plugin: str = plugin) -> None:
            add(obj, _plugin, override)

        caller = pm.subset_hook_caller(hook_name, remove_plugins=[i.plugin for i in impls if i is not impl])
        try:
            returned = caller(register=register)
        except Exception as exc:  # noqa: BLE001 - isolate plugins from each other
            problems.append(PluginProblem(plugin, "hook", f"{hook_name} raised {type(exc).__name__}: {exc}", exc))
            continue
        if returned:
            value = returned[0]
            problems.append(
                PluginProblem(
                    plugin,
                    "hook",
                    f"{hook_name} returned {type(value).__name__} {value!r:.60}; hooks must call register(...) and "
                    "return None",
                )
            )
    return problems

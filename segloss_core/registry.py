"""The registry object: which losses and backends exist, where they came from, and building a plan.

One :class:`Registry` per process (:func:`registry`). It loads the plugins lazily, once
(:mod:`segloss_core.plugins` imports the entry points and calls the hooks), keeps what they
registered with its origin, refuses invalid or clashing registrations with a warning, answers
queries (losses, backends, availability, distance-map kernels) and builds a
:class:`~segloss_core.spec.LossPlan` on a backend. The public functions built on it
(``get_loss``, ``compound``, ``list_losses``, …) live in :mod:`segloss_core.lookup`.

>>> reg = registry()
>>> reg.loss("dice").name, "numpy" in reg.backend_names()
('dice', True)
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import losses as builtin_losses
from .backend import API_VERSION, Backend
from .plugins import (
    BUILTIN_LOSSES_PLUGIN,
    PluginProblem,
    SeglossPluginManager,
    SeglossPluginWarning,
    call_register_hook,
    load_entry_points,
)
from .spec import LossPlan, LossSpec, close_matches


class UnknownLossError(ValueError):
    """No loss of that name is registered."""


class UnknownBackendError(ValueError):
    """No backend of that name is registered."""


class BackendUnavailableError(RuntimeError):
    """The backend is registered (or was meant to be) but cannot run here."""


class UnsupportedLossError(ValueError):
    """The backend does not implement this loss."""


@dataclass(frozen=True)
class BackendInfo:
    """One row of ``list_backends()``."""

    name: str
    plugin: str
    available: bool
    reason: str | None
    description: str = ""
    status: Mapping[str, str] = field(default_factory=dict)
    broken: bool = False

    @property
    def state(self) -> str:
        if self.broken:
            return "broken"
        return "available" if self.available else "unavailable"


class Registry:
    """Losses and backends from all plugins. One instance per process (:func:`registry`)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loading = False
        self.pm = SeglossPluginManager(self._invalidate)
        self._entry_points_loaded = False
        self._collected = False
        self._losses: dict[str, LossSpec] = {}
        self._loss_origin: dict[str, str] = {}
        self._backends: dict[str, Backend] = {}
        self._backend_origin: dict[str, str] = {}
        self._broken: dict[str, PluginProblem] = {}
        self._entry_point_broken: dict[str, PluginProblem] = {}
        self._entry_point_problems: list[PluginProblem] = []
        self._problems: list[PluginProblem] = []
        self._availability: dict[str, str | None] = {}
        self._distance_kernels: dict[type, Any] = {}

    # -- loading -------------------------------------------------------------------
    def _invalidate(self) -> None:
        if not self._loading:
            self._collected = False
            self._availability.clear()
            self._distance_kernels.clear()

    def _ensure(self) -> None:
        if self._collected:
            return
        with self._lock:
            if self._collected:
                return
            self._loading = True
            try:
                if not self._entry_points_loaded:
                    self.pm.register(builtin_losses, name=BUILTIN_LOSSES_PLUGIN)
                    self._entry_point_broken = load_entry_points(self.pm, self._entry_point_problems)
                    self._entry_points_loaded = True
                self._collect()
            finally:
                self._loading = False
            self._collected = True

    def _collect(self) -> None:
        self._losses.clear()
        self._loss_origin.clear()
        self._backends.clear()
        self._backend_origin.clear()
        self._problems = list(self._entry_point_problems)
        self._broken = dict(self._entry_point_broken)
        self._run_hook("segloss_register_losses", self._add_loss)
        self._run_hook("segloss_register_backends", self._add_backend)

    def _run_hook(self, hook_name: str, add: Callable[..., None]) -> None:
        for problem in call_register_hook(self.pm, hook_name, add, first=BUILTIN_LOSSES_PLUGIN):
            self._problem(problem)
            if hook_name == "segloss_register_backends" and problem.error is not None:
                self._broken.setdefault(problem.plugin, problem)

    def _problem(self, problem: PluginProblem, stacklevel: int = 4) -> None:
        self._problems.append(problem)
        warnings.warn(f"segloss: {problem}", SeglossPluginWarning, stacklevel=stacklevel)

    def _refuse(self, plugin: str, message: str) -> PluginProblem:
        """Record (and warn about) a registration refused for ``message``."""
        problem = PluginProblem(plugin, "register", message)
        self._problem(problem, stacklevel=5)  # the warning points where _add_loss/_add_backend pointed
        return problem

    @staticmethod
    def _too_new(kind: str, name: str, api_version: int) -> str | None:
        if api_version <= API_VERSION:
            return None
        return (
            f"{kind} {name!r} needs segloss plugin API {api_version}; this segloss provides {API_VERSION} "
            "(upgrade segloss)"
        )

    @staticmethod
    def _taken(kind: str, name: str, origins: Mapping[str, str], override: bool, why: str) -> str | None:
        if name not in origins or override:
            return None
        return f"{kind} {name!r} is already registered by {origins[name]!r}; refused ({why})"

    def _add_loss(self, spec: Any, plugin: str, override: bool) -> None:
        if not isinstance(spec, LossSpec):
            self._refuse(plugin, f"registered a {type(spec).__name__}, not a LossSpec: {spec!r:.60}")
            return
        why = "register(spec, override=True) replaces it on purpose"
        refusal = self._too_new("loss", spec.name, spec.api_version) or self._taken(
            "loss", spec.name, self._loss_origin, override, why
        )
        if refusal is not None:
            self._refuse(plugin, refusal)
            return
        self._losses[spec.name] = spec
        self._loss_origin[spec.name] = plugin

    def _add_backend(self, backend: Any, plugin: str, override: bool) -> None:
        if not isinstance(backend, Backend) or not backend.name:
            self._refuse(plugin, f"registered {type(backend).__name__} {backend!r:.60}, not a named Backend")
            return
        too_new = self._too_new("backend", backend.name, backend.api_version)
        if too_new is not None:
            self._broken[backend.name] = self._refuse(plugin, too_new)
            return
        taken = self._taken("backend", backend.name, self._backend_origin, override, "two plugins claim one name")
        if taken is not None:
            self._refuse(plugin, taken)
            return
        self._backends[backend.name] = backend
        self._backend_origin[backend.name] = plugin

    # -- queries -------------------------------------------------------------------------
    @property
    def problems(self) -> list[PluginProblem]:
        self._ensure()
        return list(self._problems)

    def loss_names(self) -> list[str]:
        self._ensure()
        return sorted(self._losses)

    def loss(self, name: str) -> LossSpec:
        self._ensure()
        if not isinstance(name, str):
            raise TypeError(f"loss name must be a str, got {type(name).__name__}")
        try:
            return self._losses[name]
        except KeyError:
            raise UnknownLossError(
                f"unknown loss {name!r}{close_matches(name, self._losses)}; registered losses: "
                f"{', '.join(sorted(self._losses))}"
            ) from None

    def loss_origin(self, name: str) -> str:
        self._ensure()
        return self._loss_origin[name]

    def backend_names(self) -> list[str]:
        self._ensure()
        return sorted(set(self._backends) | set(self._broken))

    def availability(self, name: str) -> str | None:
        backend = self._backends[name]
        if name not in self._availability:
            try:
                self._availability[name] = backend.availability()
            except Exception as exc:  # noqa: BLE001 - a crashing probe means "not available"
                self._availability[name] = f"availability check raised {type(exc).__name__}: {exc}"
        return self._availability[name]

    def backend(self, name: str, *, require_available: bool = True) -> Backend:
        self._ensure()
        if not isinstance(name, str):
            raise TypeError(f"backend must be a str, got {type(name).__name__}")
        if name in self._backends:
            backend = self._backends[name]
            reason = self.availability(name) if require_available else None
            if reason is not None:
                raise BackendUnavailableError(f"backend {name!r} is not available here: {reason}")
            return backend
        if name in self._broken:
            problem = self._broken[name]
            raise BackendUnavailableError(f"backend {name!r} is broken: {problem}") from problem.error
        raise UnknownBackendError(
            f"unknown backend {name!r}{close_matches(name, self.backend_names())}; registered backends: "
            f"{', '.join(self.backend_names()) or '(none)'}"
        )

    def backend_infos(self) -> list[BackendInfo]:
        self._ensure()
        rows = []
        for name in self.backend_names():
            if name in self._backends:
                backend = self._backends[name]
                reason = self.availability(name)
                try:
                    status = dict(backend.status()) if reason is None else {}
                except Exception as exc:  # noqa: BLE001
                    status = {"status": f"status() raised {type(exc).__name__}: {exc}"}
                rows.append(
                    BackendInfo(name, self._backend_origin[name], reason is None, reason, backend.description, status)
                )
            else:
                problem = self._broken[name]
                rows.append(BackendInfo(name, problem.plugin, False, problem.message, broken=True))
        return rows

    def distance_map_kernels(self, array: Any) -> Any | None:
        """The first backend's (by name) distance-map kernels for ``array``
        (:meth:`Backend.distance_maps_for`), or None; memoised per array type."""
        self._ensure()
        key = type(array)
        if key not in self._distance_kernels:
            found = None
            for name in sorted(self._backends):
                try:
                    found = self._backends[name].distance_maps_for(array)
                except Exception as exc:  # noqa: BLE001 - a crashing probe: no kernels from that backend
                    self._problem(
                        PluginProblem(
                            self._backend_origin[name], "hook", f"distance_maps_for raised {type(exc).__name__}: {exc}"
                        )
                    )
                if found is not None:
                    break
            self._distance_kernels[key] = found
        return self._distance_kernels[key]

    def supporting_backends(self, spec: LossSpec) -> list[str]:
        return [name for name in sorted(self._backends) if self._supports(self._backends[name], spec)]

    def _supports(self, backend: Backend, spec: LossSpec) -> bool:
        if spec.kind == "compound":
            return all(self._supports(backend, self.loss(t.loss)) for t in spec.terms)
        try:
            return bool(backend.supports(spec))
        except Exception:  # noqa: BLE001
            return False

    # -- building -------------------------------------------------------------------------
    def build(self, plan: LossPlan, backend_name: str, options: Mapping[str, Any] | None = None) -> Any:
        backend = self.backend(backend_name)
        checked = {p.name: p.default for p in backend.options}
        by_name = {p.name: p for p in backend.options}
        for key, value in (options or {}).items():
            if key not in by_name:
                raise TypeError(f"loss {plan.name!r} got an unknown parameter {key!r}{close_matches(key, by_name)}")
            checked[key] = by_name[key].convert(value, f"backend {backend_name!r}")
        for term in plan.terms:
            if not self._supports(backend, term.spec):
                others = [b for b in self.supporting_backends(term.spec) if b != backend_name]
                raise UnsupportedLossError(
                    f"backend {backend_name!r} does not implement loss {term.spec.name!r}; backends that do: "
                    f"{', '.join(others) or '(none)'}"
                )
        return backend.build(plan, **checked)


_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def registry() -> Registry:
    """The process-wide registry (plugins are loaded on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        with _REGISTRY_LOCK:
            if _REGISTRY is None:
                _REGISTRY = Registry()
    return _REGISTRY


def plugin_manager() -> SeglossPluginManager:
    """The pluggy manager; ``plugin_manager().register(obj, name=...)`` adds a plugin at run time."""
    reg = registry()
    reg._ensure()
    return reg.pm


__all__ = [
    "BackendInfo",
    "BackendUnavailableError",
    "Registry",
    "SeglossPluginWarning",
    "UnknownBackendError",
    "UnknownLossError",
    "UnsupportedLossError",
    "plugin_manager",
    "registry",
]

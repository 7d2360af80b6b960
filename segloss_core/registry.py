"""The registry: which losses and backends exist, and ``get_loss`` to build one.

>>> from segloss_core import get_loss
>>> loss = get_loss("dice", backend="numpy", include_background=False)
>>> sorted(loss.plan.terms[0].params)[:3]
['absent_classes', 'activation', 'average']
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import losses as builtin_losses
from .backend import API_VERSION, Backend
from .plugins import (
    BUILTIN_LOSSES_PLUGIN,
    PluginProblem,
    SeglossPluginManager,
    SeglossPluginWarning,
    load_entry_points,
)
from .spec import LossPlan, LossSpec, PlanTerm, close_matches

DEFAULT_BACKEND = "torch"


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
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        # built-ins first, then plugins in registration order: overrides are decided predictably
        impls = sorted(impls, key=lambda impl: impl.plugin_name != BUILTIN_LOSSES_PLUGIN)
        for impl in impls:
            plugin = impl.plugin_name

            def register(obj: Any, override: bool = False, _plugin: str = plugin) -> None:
                add(obj, _plugin, override)

            try:
                returned = impl.function(register=register)
            except Exception as exc:  # noqa: BLE001 - isolate plugins from each other
                self._problem(PluginProblem(plugin, "hook", f"{hook_name} raised {type(exc).__name__}: {exc}", exc))
                if hook_name == "segloss_register_backends":
                    self._broken.setdefault(plugin, self._problems[-1])
                continue
            if returned is not None:
                self._problem(
                    PluginProblem(
                        plugin,
                        "hook",
                        f"{hook_name} returned {type(returned).__name__} {returned!r:.60}; hooks must call "
                        "register(...) and return None",
                    )
                )

    def _problem(self, problem: PluginProblem) -> None:
        self._problems.append(problem)
        warnings.warn(f"segloss: {problem}", SeglossPluginWarning, stacklevel=4)

    def _add_loss(self, spec: Any, plugin: str, override: bool) -> None:
        if not isinstance(spec, LossSpec):
            self._problem(
                PluginProblem(plugin, "register", f"registered a {type(spec).__name__}, not a LossSpec: {spec!r:.60}")
            )
            return
        if spec.api_version > API_VERSION:
            self._problem(
                PluginProblem(
                    plugin,
                    "register",
                    f"loss {spec.name!r} needs segloss plugin API {spec.api_version}; this segloss provides "
                    f"{API_VERSION} (upgrade segloss)",
                )
            )
            return
        if spec.name in self._losses and not override:
            self._problem(
                PluginProblem(
                    plugin,
                    "register",
                    f"loss {spec.name!r} is already registered by {self._loss_origin[spec.name]!r}; refused "
                    "(register(spec, override=True) replaces it on purpose)",
                )
            )
            return
        self._losses[spec.name] = spec
        self._loss_origin[spec.name] = plugin

    def _add_backend(self, backend: Any, plugin: str, override: bool) -> None:
        if not isinstance(backend, Backend) or not backend.name:
            self._problem(
                PluginProblem(
                    plugin, "register", f"registered {type(backend).__name__} {backend!r:.60}, not a named Backend"
                )
            )
            return
        if backend.api_version > API_VERSION:
            problem = PluginProblem(
                plugin,
                "register",
                f"backend {backend.name!r} needs segloss plugin API {backend.api_version}; this segloss provides "
                f"{API_VERSION} (upgrade segloss)",
            )
            self._problem(problem)
            self._broken[backend.name] = problem
            return
        if backend.name in self._backends and not override:
            self._problem(
                PluginProblem(
                    plugin,
                    "register",
                    f"backend {backend.name!r} is already registered by {self._backend_origin[backend.name]!r}; "
                    "refused (two plugins claim one name)",
                )
            )
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


# ---------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------
def get_loss(name: str, backend: str = DEFAULT_BACKEND, preset: str | None = None, **params: Any) -> Any:
    """Build loss ``name`` for ``backend`` with ``preset`` and parameter overrides.

    Parameters are checked here (unknown names, types, ranges, combinations), before any
    data is seen. The result is the backend's loss object: a ``torch.nn.Module`` for
    ``"torch"``, a callable with ``value_and_grad`` for ``"numpy"``.
    """
    reg = registry()
    spec = reg.loss(name)
    if preset is not None and not isinstance(preset, str):
        raise TypeError(f"preset must be a str or None, got {type(preset).__name__}")
    own = {p.name for p in spec.params}
    options = {k: params.pop(k) for k in list(params) if k not in own and k in _backend_option_names(reg, backend)}
    resolved = spec.resolve(preset, **params)
    plan = spec.plan(resolved, reg)
    return reg.build(plan, backend, options)


def _backend_option_names(reg: Registry, backend: str) -> set[str]:
    try:
        return {p.name for p in reg.backend(backend, require_available=False).options}
    except (UnknownBackendError, BackendUnavailableError):
        return set()


def compound(
    terms: Sequence[tuple[str, float] | tuple[str, float, Mapping[str, Any]]],
    backend: str = DEFAULT_BACKEND,
    **options: Any,
) -> Any:
    """A weighted sum of registered losses, each with its own parameters.

    ``terms`` holds ``(name, weight)`` or ``(name, weight, {"preset": ..., **params})``;
    ``options`` are backend options (e.g. ``impl`` for torch).
    Terms must agree on ``ignore_index``; terms with the same ``activation`` share one pass
    of statistics over the voxels (different activations are allowed, e.g. MONAI's
    DiceFocalLoss: softmax Dice + sigmoid focal).

    >>> loss = compound([("dice", 1.0, {"preset": "nnunet"}), ("cross_entropy", 0.5)], backend="numpy")
    >>> [t.spec.name for t in loss.plan.terms]
    ['dice', 'cross_entropy']
    """
    reg = registry()
    if not terms:
        raise ValueError("compound needs at least one term")
    plan_terms: list[PlanTerm] = []
    for entry in terms:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise TypeError(f"each compound term must be (name, weight) or (name, weight, params); got {entry!r}")
        name, weight = entry[0], entry[1]
        term_params = dict(entry[2]) if len(entry) == 3 else {}
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"compound term {name!r}: weight must be a non-negative number, got {weight!r}")
        spec = reg.loss(name)
        preset = term_params.pop("preset", None)
        sub = spec.plan(spec.resolve(preset, **term_params), reg)
        plan_terms.extend(PlanTerm(float(weight) * t.weight, t.spec, t.params) for t in sub.terms)
    first = plan_terms[0].params
    for term in plan_terms[1:]:
        for key in ("ignore_index",):
            if term.params.get(key) != first.get(key):
                raise ValueError(
                    f"compound terms must share {key}: {plan_terms[0].spec.name!r} has {first.get(key)!r}, "
                    f"{term.spec.name!r} has {term.params.get(key)!r}"
                )
    plan = LossPlan("+".join(t.spec.name for t in plan_terms), tuple(plan_terms))
    return reg.build(plan, backend, options)


def list_losses() -> list[str]:
    """Names of every registered loss."""
    return registry().loss_names()


def list_backends() -> list[BackendInfo]:
    """Every backend: available, unavailable (with the reason) or broken (with the error)."""
    return registry().backend_infos()


def problems() -> list[PluginProblem]:
    """What plugins did wrong while loading (also shown by ``segloss backends``)."""
    return registry().problems


__all__ = [
    "BackendInfo",
    "BackendUnavailableError",
    "Registry",
    "SeglossPluginWarning",
    "UnknownBackendError",
    "UnknownLossError",
    "UnsupportedLossError",
    "compound",
    "get_loss",
    "list_backends",
    "list_losses",
    "plugin_manager",
    "problems",
    "registry",
]

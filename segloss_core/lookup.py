"""The public lookup functions: build a loss by name, combine losses, list what is registered.

>>> from segloss_core import get_loss
>>> loss = get_loss("dice", backend="numpy", include_background=False)
>>> sorted(loss.plan.terms[0].params)[:3]
['absent_classes', 'activation', 'average']

``describe(name)`` (:mod:`segloss_core.describe`) documents a loss; ``explain``
(:mod:`segloss_core.explain`) shows its formula with the numbers filled in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .plugins import PluginProblem
from .registry import BackendInfo, BackendUnavailableError, Registry, UnknownBackendError, registry
from .spec import LossPlan, PlanTerm

DEFAULT_BACKEND = "torch"


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


__all__ = ["DEFAULT_BACKEND", "compound", "get_loss", "list_backends", "list_losses", "problems"]

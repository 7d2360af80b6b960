"""Evaluate a loss plan in float64 on NumPy (or CuPy) arrays: value and exact gradient.

This is the oracle every backend is checked against: statistics from
:mod:`segloss_core.reference.statistics`, formulas differentiated by the tape of
:mod:`segloss_core.reference.autodiff`, voxelwise terms by their spec's ``reference``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..arrays import get_namespace
from ..spec import LossPlan
from ..validation import PreparedInputs, validate_inputs
from . import statistics as reference_statistics
from .autodiff import TapeNamespace, Var, gradients

Array = Any


def required_statistics(plan: LossPlan, activation: str | None = None) -> frozenset[str]:
    """Statistics the plan's terms need (those with ``activation`` only, when given)."""
    names: set[str] = set()
    for term in plan.terms:
        if term.spec.kind == "statistics" and activation in (None, term.params.get("activation", "none")):
            assert term.spec.required_statistics is not None
            names |= term.spec.required_statistics(term.params)
    return frozenset(names)


def with_fields(
    plan: LossPlan, prepared: PreparedInputs, activation: str, inputs: Mapping[str, Array]
) -> PreparedInputs:
    """``prepared`` with the fields the plan's terms of this activation need (distance maps, …)."""
    fields: dict[str, Array] = {}
    for term in plan.terms:
        if term.spec.fields is not None and term.params.get("activation", "none") == activation:
            for name, value in term.spec.fields(prepared, term.params, inputs).items():
                if name in fields and fields[name] is not value:
                    raise ValueError(
                        f"loss {plan.name!r}: two terms need different fields named {name!r}; combine them with "
                        "segloss_core.compound and the same distance-map parameters"
                    )
                fields[name] = value
    return replace(prepared, fields=fields) if fields else prepared


def prepare_all(
    pred: Array, target: Array, mask: Array | None, plan: LossPlan, **kwargs: Any
) -> dict[str, PreparedInputs]:
    """Validated inputs per activation of the plan (one entry unless a compound mixes them)."""
    return {act: validate_inputs(pred, target, mask, plan, activation=act, **kwargs) for act in plan.activations}


def evaluate_prepared(
    plan: LossPlan,
    prepared: Mapping[str, PreparedInputs],
    inputs: Mapping[str, Array] | None = None,
    *,
    with_grad: bool = True,
    grad_output: Array | None = None,
) -> tuple[Array, Array | None]:
    """(value, d⟨grad_output, value⟩/d pred); ``grad_output`` None needs a scalar value."""
    first = next(iter(prepared.values()))
    xp = get_namespace(first.pred)
    total: Any = None
    grad = None
    for activation, group_inputs in prepared.items():
        names = required_statistics(plan, activation)
        if not names:
            continue
        group_inputs = with_fields(plan, group_inputs, activation, inputs or {})
        stats, vjp = reference_statistics.compute(group_inputs, names)
        tape = TapeNamespace(xp)
        leaves = {name: tape.variable(value) for name, value in stats.items()}
        group_total: Any = None
        for term in plan.terms:
            if term.spec.kind != "statistics" or term.params.get("activation", "none") != activation:
                continue
            assert term.spec.from_statistics is not None
            value = term.spec.from_statistics(tape, leaves, term.params)
            contribution = value if term.weight == 1.0 else value * term.weight
            group_total = contribution if group_total is None else group_total + contribution
        if isinstance(group_total, Var):
            if with_grad:
                if grad_output is None:
                    _require_scalar(group_total.value, plan)
                seed = None if grad_output is None else xp.astype(xp.asarray(grad_output), xp.float64)
                grads = gradients(group_total, list(leaves.values()), seed)
                group_grad = vjp(dict(zip(leaves, grads, strict=True)))
                grad = group_grad if grad is None else grad + group_grad
            group_total = group_total.value
        total = group_total if total is None else total + group_total
    if with_grad and grad is None and total is not None:  # formulas that ignore every statistic
        grad = xp.zeros(tuple(first.pred.shape), dtype=xp.float64)
    for term in plan.terms:
        if term.spec.kind != "voxelwise":
            continue
        group_inputs = prepared[term.params.get("activation", "none")]
        if term.spec.reference is not None:
            value, term_grad = term.spec.reference(group_inputs, term.params, inputs or {}, with_grad=with_grad)
        else:
            value, term_grad = array_forward_reference(term.spec, group_inputs, term.params, with_grad=with_grad)
        total = value * term.weight if total is None else total + value * term.weight
        if with_grad:
            grad = term_grad * term.weight if grad is None else grad + term_grad * term.weight
    return total, grad


def array_forward_reference(
    spec: Any, prepared: PreparedInputs, params: Any, *, with_grad: bool
) -> tuple[Array, Array | None]:
    """Value and gradient of an ``array_forward`` loss: the tape differentiates its code w.r.t. p,
    then the activation's VJP gives d/d(pred)."""
    from ..operators import TapeOperators

    xp = get_namespace(prepared.pred)
    terms = reference_statistics.voxel_terms(prepared)
    full_shape = tuple(int(s) for s in prepared.pred.shape)
    spatial = full_shape[2:]
    tape = TapeNamespace(xp)
    p = tape.variable(xp.reshape(terms.p, full_shape))
    g = xp.reshape(terms.g, full_shape)
    w = xp.reshape(terms.w, (terms.w.shape[0], terms.w.shape[1], *spatial))
    value = spec.array_forward(tape, TapeOperators(tape), p, g, w, params)
    if not isinstance(value, Var):
        return value, (xp.zeros(full_shape, dtype=xp.float64) if with_grad else None)
    if not with_grad:
        return value.value, None
    (d_p,) = gradients(value, [p])
    d_p = xp.reshape(d_p, terms.p.shape)
    return value.value, reference_statistics.activation_backward(terms, d_p, None, None, full_shape)


def _require_scalar(value: Array, plan: LossPlan) -> None:
    if getattr(value, "ndim", 0) != 0:
        raise ValueError(
            f"loss {plan.name!r}: value_and_grad needs a scalar loss; reduction='none' returns shape "
            f"{tuple(value.shape)}"
        )


def evaluate(
    plan: LossPlan,
    pred: Array,
    target: Array,
    mask: Array | None = None,
    inputs: Mapping[str, Array] | None = None,
    *,
    with_grad: bool = True,
    grad_output: Array | None = None,
) -> tuple[Array, Array | None]:
    """Validate, then return (value, d value / d pred or None), float64.

    For a non-scalar value (``reduction="none"``) pass ``grad_output`` (same shape as the
    value): the gradient is then d⟨grad_output, value⟩ / d pred, as ``Tensor.backward``.
    """
    prepared = prepare_all(pred, target, mask, plan)
    return evaluate_prepared(plan, prepared, inputs, with_grad=with_grad, grad_output=grad_output)

"""Evaluate a loss plan in float64 on NumPy (or CuPy) arrays: value and exact gradient.

This is the oracle every backend is checked against. :class:`TapeKernels` are the kernels of
:func:`segloss_core.executor.run_plan` for the reference: statistics from
:mod:`segloss_core.reference.statistics`, voxelwise terms from their spec's ``reference`` (or
``array_forward``), each recorded on the tape of :mod:`segloss_core.reference.autodiff` as a node
whose VJP to the logits is the hand-written one; the formulas run on the tape, and one reverse
sweep gives d value / d pred.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..arrays import get_namespace
from ..backend import Backend
from ..executor import Kernels, run_plan
from ..spec import LossPlan, LossSpec, Params
from ..validation import PreparedInputs, validate_inputs
from . import statistics as reference_statistics
from .autodiff import TapeNamespace, Var, gradients

Array = Any


class TapeKernels(Kernels):
    """Reference kernels on a tape whose one leaf is the logits ``pred`` (float64).

    Each group of statistics is one tape node (the statistics stacked) whose VJP is
    :func:`segloss_core.reference.statistics.compute`'s; subclasses (the CuPy fused kernels)
    override :meth:`statistics` with their own forward and backward the same way.
    """

    def __init__(self, pred: Array, *, with_grad: bool = True):
        self.xp = get_namespace(pred)
        self.namespace = TapeNamespace(self.xp)
        self.with_grad = with_grad
        self.shape = tuple(int(n) for n in pred.shape)
        # the leaf everything is differentiated with respect to; its own value is never read
        self.pred = self.namespace.variable(self.xp.zeros((), dtype=self.xp.float64))

    def record(self, values: Mapping[str, Array], vjp: Any) -> dict[str, Var]:
        """Statistics computed outside the tape, with ``vjp({name: d/d stat}) → d/d pred``, as tape values."""
        names = sorted(values)
        stacked = self.namespace.external(
            self.xp.stack([values[name] for name in names]),
            self.pred,
            lambda g: vjp({name: g[index] for index, name in enumerate(names)}),
        )
        return {name: stacked[index] for index, name in enumerate(names)}

    def statistics(self, prepared: PreparedInputs, names: frozenset[str]) -> Mapping[str, Array]:
        values, vjp = reference_statistics.compute(prepared, names)
        return self.record(values, vjp)

    def elements(self, prepared: PreparedInputs, names: frozenset[str]) -> Mapping[str, Array]:
        values, vjp = reference_statistics.compute(prepared, names, elements=True)
        return self.record(values, vjp)

    def voxelwise(self, spec: LossSpec, prepared: PreparedInputs, params: Params, inputs: Mapping[str, Array]) -> Array:
        if spec.reference is not None:
            value, grad = spec.reference(prepared, params, inputs, with_grad=self.with_grad)
            if grad is None:
                return value
            return self.namespace.external(value, self.pred, lambda g: g * grad)
        return self._array_forward(spec, prepared, params)

    def _array_forward(self, spec: LossSpec, prepared: PreparedInputs, params: Params) -> Array:
        """An ``array_forward`` loss: a tape of its own differentiates it w.r.t. p, then the
        activation's VJP gives d/d(pred)."""
        from ..operators import TapeOperators

        xp = self.xp
        terms = reference_statistics.voxel_terms(prepared)
        full_shape = tuple(int(s) for s in prepared.pred.shape)
        tape = TapeNamespace(xp)
        p = tape.variable(xp.reshape(terms.p, full_shape))
        g = xp.reshape(terms.g, full_shape)
        w = xp.reshape(terms.w, (terms.w.shape[0], terms.w.shape[1], *full_shape[2:]))
        value = spec.array_forward(tape, TapeOperators(tape), p, g, w, params)
        if not isinstance(value, Var) or not self.with_grad:
            return value.value if isinstance(value, Var) else value

        def vjp(seed: Array) -> Array:
            (d_p,) = gradients(value, [p], seed)
            d_p = xp.reshape(d_p, terms.p.shape)
            return reference_statistics.activation_backward(terms, d_p, None, None, full_shape)

        return self.namespace.external(value.value, self.pred, vjp)


def prepare_all(
    pred: Array, target: Array, mask: Array | None, plan: LossPlan, **kwargs: Any
) -> dict[str, PreparedInputs]:
    """Validated inputs per activation of the plan (one entry unless a compound mixes them)."""
    return {act: validate_inputs(pred, target, mask, plan, activation=act, **kwargs) for act in plan.activations}


def value_and_grad(
    plan: LossPlan,
    prepared: Mapping[str, PreparedInputs],
    kernels: TapeKernels,
    inputs: Mapping[str, Array] | None = None,
    *,
    weights: Any = None,
    grad_output: Array | None = None,
) -> tuple[Array, Array | None]:
    """(value, d⟨grad_output, value⟩/d pred or None without grad); ``grad_output`` None needs a
    scalar value."""
    xp = kernels.xp
    total = run_plan(plan, prepared, kernels, inputs, weights)
    value = total.value if isinstance(total, Var) else total
    if not kernels.with_grad:
        return value, None
    if grad_output is None and getattr(value, "ndim", 0) != 0:
        raise ValueError(
            f"loss {plan.name!r}: value_and_grad needs a scalar loss or grad_output; reduction='none' returns "
            f"shape {tuple(value.shape)}"
        )
    grad = None
    if isinstance(total, Var):
        seed = None if grad_output is None else xp.astype(xp.asarray(grad_output), value.dtype)
        (grad,) = gradients(total, [kernels.pred], seed)
    if grad is None or grad.ndim == 0:  # the value does not depend on pred (the leaf was never reached)
        grad = xp.zeros(kernels.shape, dtype=xp.float64)
    return value, grad


def evaluate(
    plan: LossPlan,
    pred: Array,
    target: Array,
    mask: Array | None = None,
    inputs: Mapping[str, Array] | None = None,
    *,
    with_grad: bool = True,
    grad_output: Array | None = None,
    weights: Any = None,
) -> tuple[Array, Array | None]:
    """Validate, then return (value, d value / d pred or None), float64.

    For a non-scalar value (``reduction="none"``) pass ``grad_output`` (same shape as the
    value): the gradient is then d⟨grad_output, value⟩ / d pred, as ``Tensor.backward``.
    ``weights`` (one per term) override the plan's term weights.
    """
    prepared = prepare_all(pred, target, mask, plan)
    kernels = TapeKernels(pred, with_grad=with_grad)
    return value_and_grad(plan, prepared, kernels, inputs, weights=weights, grad_output=grad_output)


class TapeBackend(Backend):
    """A backend whose losses run on the reference's tape (NumPy, CuPy): every voxelwise spec with a
    ``reference`` or an ``array_forward`` is supported, and one conformance runner serves all of them.

    Subclasses convert NumPy inputs to their arrays and back (:meth:`to_array`, :meth:`to_numpy`); the
    loss they build is called as ``loss(pred, target, mask, **inputs)`` and has
    ``value_and_grad(pred, target, mask, grad_output=..., **inputs)``.
    """

    operators = True

    def supports(self, spec: Any) -> bool:
        return spec.kind != "voxelwise" or spec.reference is not None or spec.array_forward is not None

    def to_array(self, array: np.ndarray) -> Any:
        """``array`` as this backend's array (NumPy: itself)."""
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        """One of this backend's arrays as a NumPy array."""
        return np.asarray(array)

    def run_for_conformance(
        self,
        loss: Any,
        pred: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray | None,
        dtype: str,
        inputs: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The loss on ``pred`` cast to ``dtype`` (the other inputs as given); the gradient of Σ value
        (``reduction="none"`` is seeded with ones, as the reference's comparison wants)."""
        x, y = self.to_array(pred.astype(dtype)), self.to_array(target)
        m = None if mask is None else self.to_array(mask)
        extra = {name: self.to_array(value) for name, value in (inputs or {}).items()}
        value = loss(x, y, m, **extra)
        ones = get_namespace(value).ones(value.shape, dtype=value.dtype) if np.ndim(value) else None
        value, grad = loss.value_and_grad(x, y, m, grad_output=ones, **extra)
        return self.to_numpy(value).astype(np.float64), self.to_numpy(grad).astype(np.float64)

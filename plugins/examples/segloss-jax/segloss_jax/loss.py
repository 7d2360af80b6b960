"""The JAX loss: the core's plan executor with JAX kernels, jit-compiled.

The kernels compute the activation, target and voxel weights (as
``segloss_core/reference/statistics.py``), each statistic's per-voxel term from the core's table
(``segloss_core.statistics.TABLE``), and ``array_forward`` losses with :class:`JaxOperators`; the
executor (``segloss_core.executor.run_plan``) applies the core's formulas and term weights.
``jax.vjp`` differentiates all of it.

>>> import jax.numpy as jnp
>>> from segloss_core import get_loss
>>> loss = get_loss("dice", backend="jax", include_background=False)
>>> logits = jnp.zeros((1, 2, 4, 4)); labels = jnp.zeros((1, 4, 4), dtype=jnp.int32).at[0, 1, 1].set(1)
>>> value, grad = loss.value_and_grad(logits, labels)
>>> round(float(value), 4), grad.shape, grad.dtype
(0.8889, (1, 2, 4, 4), dtype('float32'))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from segloss_core import statistics as stat_names
from segloss_core.executor import Kernels, TermWeights, run_plan, with_fields
from segloss_core.regions import region_targets
from segloss_core.spec import LossPlan
from segloss_core.statistics import Voxel
from segloss_core.validation import PreparedInputs, validate_inputs

Array = Any


# ---------------------------------------------------------------------------------------
# operators (segloss_core.operators) for array_forward losses
# ---------------------------------------------------------------------------------------
class JaxOperators:
    """``max_pool``/``min_pool`` over the spatial axes of (B, C, *S): odd kernel, stride 1, −inf padding."""

    @staticmethod
    def max_pool(x: Array, kernel: int = 3) -> Array:
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"pooling kernel must be a positive odd int, got {kernel!r}")
        spatial = x.ndim - 2
        half = kernel // 2
        return jax.lax.reduce_window(
            x,
            np.array(-np.inf, dtype=np.dtype(x.dtype)),  # concrete, so JAX uses its differentiable max-pool
            jax.lax.max,
            window_dimensions=(1, 1) + (kernel,) * spatial,
            window_strides=(1,) * x.ndim,
            padding=((0, 0), (0, 0)) + ((half, half),) * spatial,
        )

    @staticmethod
    def min_pool(x: Array, kernel: int = 3) -> Array:
        return -JaxOperators.max_pool(-x, kernel)


# ---------------------------------------------------------------------------------------
# the per-voxel stage (mirrors segloss_core.reference.statistics)
# ---------------------------------------------------------------------------------------
def compute_dtype(dtype: Any) -> Any:
    """float64 stays float64; everything else (float32, float16, bfloat16) is computed in float32."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _safe_log(x: Array) -> Array:
    """log x with a zero (not NaN) gradient where x <= 0 (−inf value there)."""
    positive = x > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), -jnp.inf)


def voxel_terms(
    pred: Array,
    labels: Array | None,
    target: Array | None,
    mask: Array | None,
    activation: str,
    ignore_index: Any,
    regions: Any = None,
) -> tuple[Voxel, Array]:
    """(p, log p, log(1 − p), g) flattened to (B, C, N) in the compute dtype, and the voxel weights
    (B, 1|C, N), as ``segloss_core.reference.statistics.voxel_terms``."""
    batch, channels = int(pred.shape[0]), int(pred.shape[1])
    dtype = compute_dtype(pred.dtype)
    z = jnp.reshape(pred.astype(dtype), (batch, channels, -1))
    n = z.shape[2]
    log_1mp = None
    if activation == "softmax":
        log_p = jax.nn.log_softmax(z, axis=1)
        p = jnp.exp(log_p)
    elif activation == "sigmoid":
        log_p = jax.nn.log_sigmoid(z)
        log_1mp = jax.nn.log_sigmoid(-z)
        p = jnp.exp(log_p)
    else:
        p = z
        log_p = _safe_log(p)
        log_1mp = _safe_log(1.0 - p)

    weight = jnp.ones((batch, 1, n), dtype=dtype)
    if labels is not None:
        labels = jnp.reshape(labels, (batch, 1, n))
        if labels.dtype not in (jnp.int32, jnp.int64):
            labels = labels.astype(jnp.int32)  # uint8/bool labels: compare with a negative ignore_index safely
        if ignore_index is not None:
            weight = weight * (labels != ignore_index).astype(dtype)
        if regions is not None:  # region-based training: g_r = [label ∈ regions[r]]
            g = region_targets(jnp, labels[:, 0], regions, dtype)
        elif channels == 1 and activation != "softmax":
            g = (labels == 1).astype(dtype)
        else:
            g = (labels == jnp.arange(channels, dtype=labels.dtype).reshape(1, channels, 1)).astype(dtype)
    else:
        g = jnp.reshape(target, (batch, channels, n)).astype(dtype)
    if mask is not None:
        weight = weight * jnp.reshape(mask.astype(dtype), (mask.shape[0], mask.shape[1], n))
    return Voxel(p=p, g=g, log_p=log_p, log_1mp=log_1mp), weight


def compute_statistics(
    v: Voxel, w: Array, names: frozenset[str], fields: dict[str, Array] | None = None
) -> dict[str, Array]:
    """Each statistic Σ_x w·term, shape (B, C), its term from ``segloss_core.statistics.TABLE``; 0
    wherever w == 0, even if the term is not finite there. ``fields`` (B, C, *S) are constants."""
    out = {}
    for name in sorted(names):
        base, arg = stat_names.parse(name)
        entry = stat_names.TABLE[base]
        if entry.sigmoid_only and v.log_1mp is None:
            raise ValueError(f"statistic {name!r} needs activation 'sigmoid' or 'none'")
        field = None
        if "field" in entry.reads:
            if not fields or arg not in fields:
                raise ValueError(f"statistic {name!r} needs the field {arg!r}, which the loss did not provide")
            field = jax.lax.stop_gradient(jnp.reshape(fields[arg].astype(v.p.dtype), v.p.shape))
        term = entry.term(jnp, replace(v, field=field, arg=arg))
        out[name] = stat_names.weighted_sum(jnp, term, w, int(v.p.shape[1]), finite=False)
    return out


def compute_elements(v: Voxel, w: Array, name: str) -> Array:
    """The per-voxel term w·f of statistic ``name``, (B, C, N), 0 wherever w == 0 (element maps)."""
    base, arg = stat_names.parse(name)
    entry = stat_names.TABLE[base]
    if entry.sigmoid_only and v.log_1mp is None:
        raise ValueError(f"statistic {name!r} needs activation 'sigmoid' or 'none'")
    return stat_names.weighted_elements(jnp, entry.term(jnp, replace(v, arg=arg)), w, int(v.p.shape[1]))


class JaxKernels(Kernels):
    """The kernels of the core's executor on JAX arrays (traced inside ``jax.jit``)."""

    namespace = jnp
    operators = JaxOperators

    def with_fields(self, plan: LossPlan, prepared: PreparedInputs, activation: str, inputs: Any) -> PreparedInputs:
        return prepared  # computed outside jit (JaxLoss._fields) and passed in

    def statistics(self, prepared: PreparedInputs, names: frozenset[str]) -> dict[str, Array]:
        return compute_statistics(*_voxel_terms(prepared), names, prepared.fields)

    def elements(self, prepared: PreparedInputs, names: frozenset[str]) -> dict[str, Array]:
        v, w = _voxel_terms(prepared)
        return {name: compute_elements(v, w, name) for name in names}

    def voxels(self, prepared: PreparedInputs) -> tuple[Array, Array, Array]:
        v, w = _voxel_terms(prepared)  # computed again if statistics need it too: XLA merges the two
        return v.p, v.g, w


def _voxel_terms(prepared: PreparedInputs) -> tuple[Voxel, Array]:
    x = prepared
    return voxel_terms(x.pred, x.labels, x.target, x.mask, x.activation, x.ignore_index, x.regions)


# ---------------------------------------------------------------------------------------
# the loss object
# ---------------------------------------------------------------------------------------
def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _stand_in(x: Array | None) -> np.ndarray | None:
    """A zero-byte NumPy array with x's shape and (floating → float32 for bf16/f16) dtype."""
    if x is None:
        return None
    dtype = np.dtype(x.dtype)
    if jnp.issubdtype(x.dtype, jnp.floating) and dtype not in (np.float32, np.float64):
        dtype = np.dtype(np.float32)
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dtype), shape=tuple(x.shape), strides=(0,) * x.ndim)


class JaxLoss(TermWeights):
    """A segloss loss on JAX arrays.

    ``loss(pred, target, mask=None)`` returns the value; ``loss.value_and_grad(...)`` the value
    and d value / d pred. Both are jit-compiled once per input shape/dtype; both may be called
    inside the caller's own ``jax.jit``/``jax.grad`` (label values are then checked only where
    the target is concrete).
    """

    def __init__(self, plan: LossPlan, *, jit: bool = True):
        self._init_weights(plan)
        self._jit = jit
        self._call = self._compile(self._forward, static_argnames=("weights",))
        self._vag = self._compile(self._forward_and_grad, static_argnames=("weights", "ones"))

    def _compile(self, fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        return jax.jit(fn, **kwargs) if self._jit else fn

    def __repr__(self) -> str:
        return f"JaxLoss({self.plan.describe()})"

    # -- validation (outside jit) -----------------------------------------------------
    def _prepare(self, pred: Array, target: Array, mask: Array | None) -> PreparedInputs:
        for name, value in (("pred", pred), ("target", target), ("mask", mask)):
            if value is not None and not isinstance(value, jax.Array):
                raise TypeError(
                    f"{name} must be a jax.Array for backend 'jax', got {type(value).__name__}; convert with "
                    "jax.numpy.asarray (float64 needs jax_enable_x64)"
                )
        prepared = None
        traced = any(_is_tracer(a) for a in (pred, target, mask) if a is not None)
        for activation in self.plan.activations:  # label range depends on the activation (0/1 for one sigmoid channel)
            if not traced:
                prepared = validate_inputs(pred, target, mask, self.plan, activation=activation)
                continue
            # Inside the caller's jit/grad: shapes and dtypes are checked on zero-byte NumPy stand-ins (tracers
            # have no device to compare), label values only if the target is concrete.
            check_labels = not _is_tracer(target)
            stand_target = np.asarray(target) if check_labels else _stand_in(target)
            shape = validate_inputs(
                _stand_in(pred),
                stand_target,
                _stand_in(mask),
                self.plan,
                activation=activation,
                check_label_values=check_labels,
            )
            labels = None if shape.labels is None else jnp.reshape(target, shape.labels.shape)
            if labels is not None and labels.dtype == jnp.bool_:
                labels = labels.astype(jnp.int32)
            prepared = replace(
                shape,
                pred=pred,
                labels=labels,
                target=None if shape.target is None else jnp.reshape(target, shape.target.shape),
                mask=None if shape.mask is None else jnp.reshape(mask, shape.mask.shape),
            )
        assert prepared is not None
        return prepared

    def _fields(self, prepared: PreparedInputs, inputs: dict[str, Array]) -> dict[str, dict[str, Array]]:
        """Per activation, the fields (distance maps) the plan's terms need: computed by the core, outside jit."""
        if not any(term.spec.fields is not None for term in self.plan.terms):
            return {}
        if any(_is_tracer(a) for a in (prepared.pred, prepared.labels, prepared.target) if a is not None):
            raise ValueError(
                f"loss {self.plan.name!r} needs distance maps of concrete arrays: call it outside jax.jit/jax.grad "
                "(the loss is jit-compiled itself)"
            )
        return {
            act: with_fields(self.plan, replace(prepared, activation=act), act, inputs).fields or {}
            for act in self.plan.activations
        }

    # -- the traced computation -----------------------------------------------------------
    def _forward(
        self,
        pred: Array,
        labels: Array | None,
        target: Array | None,
        mask: Array | None,
        fields: dict[str, dict[str, Array]],
        weights: tuple[float, ...],
    ) -> Array:
        plan = self.plan
        prepared = {
            act: PreparedInputs(
                pred, labels, target, mask, int(pred.shape[1]), plan.ignore_index, act, fields.get(act), plan.regions
            )
            for act in plan.activations
        }
        return run_plan(plan, prepared, JaxKernels(), weights=weights)

    def _forward_and_grad(
        self, pred: Array, operands: tuple[Any, ...], weights: tuple[float, ...], seed: Array | None, ones: bool
    ) -> tuple[Array, Array]:
        """``operands``: the arguments of :meth:`_forward` between ``pred`` and ``weights``."""
        value, pullback = jax.vjp(lambda x: self._forward(x, *operands, weights), pred)
        if ones:
            seed = jnp.ones_like(value)
        elif seed is None:
            if value.ndim != 0:
                raise ValueError(
                    f"loss {self.plan.name!r}: value_and_grad needs a scalar loss or grad_output; reduction='none' "
                    f"returns shape {tuple(value.shape)}"
                )
            seed = jnp.ones_like(value)
        (grad,) = pullback(jnp.asarray(seed, dtype=value.dtype))
        return value, grad

    # -- public -------------------------------------------------------------------------
    def __call__(self, pred: Array, target: Array, mask: Array | None = None, **inputs: Array) -> Array:
        """The loss value; ``inputs`` are the extra inputs of some losses (``distance_map=`` of ``boundary``)."""
        prepared = self._prepare(pred, target, mask)
        fields = self._fields(prepared, inputs)
        x = prepared
        return self._call(x.pred, x.labels, x.target, x.mask, fields, tuple(self.term_weights))

    def value_and_grad(
        self,
        pred: Array,
        target: Array,
        mask: Array | None = None,
        grad_output: Array | str | None = None,
        **inputs: Array,
    ) -> tuple[Array, Array]:
        """(value, d value / d pred); with ``reduction="none"`` pass ``grad_output`` (the value's shape, or
        ``"ones"``): the gradient is then that of Σ grad_output·value."""
        prepared = self._prepare(pred, target, mask)
        ones = isinstance(grad_output, str)
        if ones and grad_output != "ones":
            raise ValueError(f"grad_output must be an array, None or 'ones', got {grad_output!r}")
        seed = None if ones else grad_output
        fields = self._fields(prepared, inputs)
        x, weights = prepared, tuple(self.term_weights)
        return self._vag(x.pred, (x.labels, x.target, x.mask, fields), weights, seed, ones=ones)

"""Float64 reference for the per-voxel stage: activation, target, voxel weights, statistics.

Written for clarity, not speed: every intermediate of size (B, C, N) is materialised. Works
on NumPy and CuPy arrays (any array-API namespace with ``take_along_axis``-free code).

:func:`compute` returns the statistics of ``segloss_core.statistics`` and a VJP that maps
d(loss)/d(statistics), each (B, C), to d(loss)/d(pred), shape of ``pred``. The VJP is the
analytic chain rule:

* each statistic is ``Σ_x f(p, g, w)``, so its derivative w.r.t. ``p[b, c, x]`` is
  ``w·∂f/∂p``; log-terms are differentiated w.r.t. ``log p`` (and ``log(1 − p)``) to stay
  finite where ``p`` underflows;
* softmax: ``∂L/∂z = p ⊙ (∂L/∂p − Σ_c p ∂L/∂p) + (∂L/∂log p − p Σ_c ∂L/∂log p)``;
* sigmoid: ``∂L/∂z = ∂L/∂p · p(1 − p) + ∂L/∂log p · (1 − p) − ∂L/∂log(1−p) · p``;
* none (probabilities given): ``∂L/∂p + ∂L/∂log p / p − ∂L/∂log(1−p) / (1 − p)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import statistics as stat_names
from ..arrays import get_namespace
from ..validation import PreparedInputs

Array = Any


@dataclass
class VoxelTerms:
    """Per-voxel quantities in float64, flattened to (B, C, N); weights (B, 1|C, N)."""

    z: Array
    p: Array
    log_p: Array
    log_1mp: Array | None  # log(1 − p); sigmoid and "none" only
    g: Array
    w: Array
    activation: str


def _logsigmoid(xp: Any, z: Array) -> Array:
    # log σ(z) = −softplus(−z), stable for both signs
    return -(xp.maximum(-z, xp.zeros_like(z)) + xp.log1p(xp.exp(-xp.abs(z))))


def voxel_terms(inputs: PreparedInputs) -> VoxelTerms:
    """Activation, target and weights of the reference, from validated inputs."""
    xp = get_namespace(inputs.pred)
    f64 = xp.float64
    batch, channels = inputs.batch_size, inputs.num_classes
    z = xp.reshape(xp.astype(inputs.pred, f64), (batch, channels, -1))
    n = z.shape[2]
    log_1mp = None
    if inputs.activation == "softmax":
        zmax = xp.max(z, axis=1, keepdims=True)
        shifted = z - zmax
        log_p = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
        p = xp.exp(log_p)
    elif inputs.activation == "sigmoid":
        log_p = _logsigmoid(xp, z)
        log_1mp = _logsigmoid(xp, -z)
        p = xp.exp(log_p)
    else:
        p = z
        with _quiet(xp):
            log_p = xp.log(p)
            log_1mp = xp.log1p(-p)

    weight = xp.ones((batch, 1, n), dtype=f64)
    if inputs.labels is not None:
        labels = xp.reshape(inputs.labels, (batch, 1, n))
        if inputs.ignore_index is not None:
            weight = weight * xp.astype(labels != inputs.ignore_index, f64)
        if channels == 1 and inputs.activation != "softmax":
            g = xp.astype(labels == 1, f64)
        else:
            classes = xp.reshape(xp.arange(channels), (1, channels, 1))
            g = xp.astype(labels == classes, f64)
    else:
        g = xp.reshape(xp.astype(inputs.target, f64), (batch, channels, n))
    if inputs.mask is not None:
        mask = xp.astype(inputs.mask, f64)
        weight = weight * xp.reshape(mask, (mask.shape[0], mask.shape[1], n))
    # a voxel with weight 0 must contribute exactly 0 even where its p or log p is not finite
    return VoxelTerms(z=z, p=p, log_p=log_p, log_1mp=log_1mp, g=g, w=weight, activation=inputs.activation)


class _quiet:
    """Silence NumPy's divide/invalid warnings where log(0) is intended."""

    def __init__(self, xp: Any):
        self._np = None
        try:
            import numpy

            self._np = numpy
        except ImportError:  # pragma: no cover
            pass

    def __enter__(self) -> None:
        if self._np is not None:
            self._state = self._np.seterr(divide="ignore", invalid="ignore")

    def __exit__(self, *exc: object) -> None:
        if self._np is not None:
            self._np.seterr(**self._state)


def _weighted(xp: Any, w: Array, term: Array) -> Array:
    """w·term with 0 wherever w == 0 (so 0·inf and 0·nan do not leak from ignored voxels)."""
    return xp.where(xp.broadcast_to(w, term.shape) == 0, xp.zeros_like(term), w * term)


def activation_backward(
    t: VoxelTerms, d_p: Array, d_logp: Array | None, d_log1mp: Array | None, shape: tuple[int, ...]
) -> Array:
    """d/d(pred) from d/dp, d/dlog p and d/dlog(1 − p) (each (B, C, N) or None), reshaped to ``shape``."""
    xp = get_namespace(t.p)
    p = t.p
    zeros = xp.zeros_like(p)
    d_logp = zeros if d_logp is None else d_logp
    d_log1mp = zeros if d_log1mp is None else d_log1mp
    if t.activation == "softmax":
        grad = p * (d_p - xp.sum(p * d_p, axis=1, keepdims=True)) + (d_logp - p * xp.sum(d_logp, axis=1, keepdims=True))
    elif t.activation == "sigmoid":
        grad = d_p * p * (1 - p) + d_logp * (1 - p) - d_log1mp * p
    else:
        with _quiet(xp):
            grad = d_p + xp.where(d_logp == 0, zeros, d_logp / p)
            grad = grad - xp.where(d_log1mp == 0, zeros, d_log1mp / (1 - p))
    return xp.reshape(grad, shape)


def _field(inputs: PreparedInputs, name: str, shape: tuple[int, ...], xp: Any) -> Array:
    if not inputs.fields or name not in inputs.fields:
        raise ValueError(f"statistic needs the field {name!r}, which the loss did not provide")
    return xp.reshape(xp.astype(inputs.fields[name], xp.float64), shape)


def _xlogy(xp: Any, x: Array, log_y: Array) -> Array:
    """x·log y with 0 where x == 0 (the convention of scipy.special.xlogy)."""
    return xp.where(x == 0, xp.zeros_like(log_y), x * log_y)


def compute(
    inputs: PreparedInputs, names: Iterable[str]
) -> tuple[dict[str, Array], Callable[[Mapping[str, Array]], Array]]:
    """Statistics ``names`` (each (B, C), float64) and their VJP to d/d(pred)."""
    xp = get_namespace(inputs.pred)
    t = voxel_terms(inputs)
    names = sorted(set(names))
    p, g, w = t.p, t.g, t.w
    sigmoid_like = t.activation != "softmax"
    out: dict[str, Array] = {}
    with _quiet(xp):
        for name in names:
            base, gamma = stat_names.parse(name)
            if base in stat_names.SIGMOID_ONLY and not sigmoid_like:
                raise ValueError(f"statistic {name!r} needs activation 'sigmoid' or 'none'")
            if base == "intersection":
                term = p * g
            elif base == "pred_sum":
                term = p
            elif base == "target_sum":
                term = g
            elif base == "pred_sq_sum":
                term = p * p
            elif base == "target_sq_sum":
                term = g * g
            elif base == "abs_diff_sum":
                term = xp.abs(p - g)
            elif base == "count":
                term = xp.ones_like(p)
            elif base == "ce_pos":
                term = -_xlogy(xp, g, t.log_p)
            elif base == "ce_neg":
                term = -_xlogy(xp, 1 - g, t.log_1mp)
            elif base == "neg_log_pred_sum":
                term = -t.log_p
            elif base == "focal_pos":
                term = -_xlogy(xp, g * (1 - p) ** gamma, t.log_p)
            elif base == "focal_neg":
                term = -_xlogy(xp, (1 - g) * p**gamma, t.log_1mp)
            elif base == "field_pred_sum":
                term = p * _field(inputs, gamma, p.shape, xp)
            elif base == "field_sq_err_sum":
                term = (p - g) ** 2 * _field(inputs, gamma, p.shape, xp)
            else:  # pragma: no cover - parse() rejects unknown names
                raise AssertionError(name)
            out[name] = xp.sum(_weighted(xp, w, term), axis=2)

    def vjp(upstream: Mapping[str, Array]) -> Array:
        d_p = xp.zeros_like(p)
        d_logp = xp.zeros_like(p)
        d_log1mp = xp.zeros_like(p)
        with _quiet(xp):
            for name, u in upstream.items():
                base, gamma = stat_names.parse(name)
                u = xp.reshape(xp.astype(u, xp.float64), (p.shape[0], p.shape[1], 1))
                uw = u * w
                if base == "intersection":
                    d_p = d_p + uw * g
                elif base == "pred_sum":
                    d_p = d_p + uw
                elif base == "pred_sq_sum":
                    d_p = d_p + uw * 2 * p
                elif base == "abs_diff_sum":
                    d_p = d_p + uw * xp.sign(p - g)
                elif base == "ce_pos":
                    d_logp = d_logp - uw * g
                elif base == "ce_neg":
                    d_log1mp = d_log1mp - uw * (1 - g)
                elif base == "neg_log_pred_sum":
                    d_logp = d_logp - uw * xp.ones_like(p)
                elif base == "focal_pos":
                    # d/dlog p of (1−p)^γ (−log p): −(1−p)^γ + γ (1−p)^(γ−1) · p · log p
                    one_m = 1 - p
                    slope = xp.where(one_m > 0, gamma * one_m ** (gamma - 1) * p * t.log_p, xp.zeros_like(p))
                    d_logp = d_logp + _weighted(xp, w, u * g * (slope - one_m**gamma))
                elif base == "field_pred_sum":
                    d_p = d_p + uw * _field(inputs, gamma, p.shape, xp)
                elif base == "field_sq_err_sum":
                    d_p = d_p + uw * 2 * (p - g) * _field(inputs, gamma, p.shape, xp)
                elif base == "focal_neg":
                    # d/dlog(1−p) of p^γ (−log(1−p)): −p^γ + γ p^(γ−1) (1−p) log(1−p)
                    slope = xp.where(p > 0, gamma * p ** (gamma - 1) * (1 - p) * t.log_1mp, xp.zeros_like(p))
                    d_log1mp = d_log1mp + _weighted(xp, w, u * (1 - g) * (slope - p**gamma))
                # target_sum, target_sq_sum, count: no dependence on pred
        return activation_backward(t, d_p, d_logp, d_log1mp, tuple(inputs.pred.shape))

    return out, vjp

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
from ..regions import region_targets
from ..statistics import Voxel
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
        if inputs.regions is not None:
            g = region_targets(xp, labels[:, 0], inputs.regions, f64)
        elif channels == 1 and inputs.activation != "softmax":
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
    weighted = w * term
    return xp.where(w == 0, xp.zeros_like(weighted), weighted)


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


def _voxel(xp: Any, t: VoxelTerms, inputs: PreparedInputs, name: str) -> tuple[stat_names.Statistic, Voxel]:
    """The table entry of statistic ``name`` and the per-voxel values its term reads."""
    base, arg = stat_names.parse(name)
    entry = stat_names.TABLE[base]
    if entry.sigmoid_only and t.activation == "softmax":
        raise ValueError(f"statistic {name!r} needs activation 'sigmoid' or 'none'")
    field = _field(inputs, arg, tuple(t.p.shape), xp) if "field" in entry.reads else None
    return entry, Voxel(p=t.p, g=t.g, log_p=t.log_p, log_1mp=t.log_1mp, field=field, arg=arg)


def compute(
    inputs: PreparedInputs, names: Iterable[str], *, elements: bool = False
) -> tuple[dict[str, Array], Callable[[Mapping[str, Array]], Array]]:
    """Statistics ``names`` (each (B, C), float64) and their VJP to d/d(pred), both from
    :data:`segloss_core.statistics.TABLE`; with ``elements`` their per-voxel terms w·f instead
    (each (B, C, N), the element maps of ``reduction="none"``) and the VJP of those."""
    xp = get_namespace(inputs.pred)
    t = voxel_terms(inputs)
    channels = int(t.p.shape[1])
    out: dict[str, Array] = {}
    with _quiet(xp):
        for name in sorted(set(names)):
            entry, v = _voxel(xp, t, inputs, name)
            term = entry.term(xp, v)
            if elements:
                out[name] = stat_names.weighted_elements(xp, term, t.w, channels)
            else:
                out[name] = stat_names.weighted_sum(xp, term, t.w, channels, finite=False)
    upstream_shape = tuple(t.p.shape) if elements else (t.p.shape[0], t.p.shape[1], 1)

    def vjp(upstream: Mapping[str, Array]) -> Array:
        d = [xp.zeros_like(t.p), xp.zeros_like(t.p), xp.zeros_like(t.p)]  # d/dp, d/dlog p, d/dlog(1 − p)
        with _quiet(xp):
            for name, u in upstream.items():
                entry, v = _voxel(xp, t, inputs, name)
                u = xp.reshape(xp.astype(u, xp.float64), upstream_shape)
                for index, partial in enumerate(entry.partials(xp, v)):
                    if partial is not None:
                        d[index] = d[index] + _weighted(xp, t.w, u * partial)
        return activation_backward(t, d[0], d[1], d[2], tuple(inputs.pred.shape))

    return out, vjp

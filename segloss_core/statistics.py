"""The per-(sample, class) statistics every region and cross-entropy loss is built from.

Notation (docs/architecture.md): ``p`` is the prediction after the activation, ``g`` the
target (one-hot of the labels, or the given soft target), ``w`` the voxel weight (0 on
voxels labelled ``ignore_index``, times the call-time ``mask``). Every statistic is a sum
over the spatial axes, one value per (sample b, class c), shape (B, C):

==================  ===============================  ==========================================
name                per-voxel term                    used by
==================  ===============================  ==========================================
intersection        w·p·g                             dice family
pred_sum            w·p                               dice family
target_sum          w·g                               dice family, CE normaliser, absent classes
pred_sq_sum         w·p²                              squared (V-Net) denominators
target_sq_sum       w·g²                              squared (V-Net) denominators
abs_diff_sum        w·|p − g|                         soft-label intersection (P + G − L1)/2
count               w                                 means over voxels (BCE, focal)
ce_pos              w·g·(−log p)                      cross-entropy / BCE positive part
ce_neg              w·(1−g)·(−log(1−p))               BCE negative part (sigmoid only)
neg_log_pred_sum    w·(−log p)                        label smoothing
neg_log_1mp_sum     w·(−log(1−p))                     binary label smoothing (sigmoid only)
focal_pos:γ         w·g·(1−p)^γ·(−log p)              focal loss
focal_neg:γ         w·(1−g)·p^γ·(−log(1−p))           focal loss, negative part (sigmoid only)
field_pred_sum:F    w·p·F                             boundary loss (F = signed distance map)
field_sq_err_sum:F  w·(p − g)²·F                      Hausdorff-DT loss (F = d_p^α + d_g^α)
==================  ===============================  ==========================================

One more name, ``voxels``, is not a sum over voxels: it is N, the number of voxels of a sample
(every voxel, whatever its weight), shape (B, C); the plan executor supplies it from the shape
(:data:`SHAPE_STATISTICS`), so kernels never compute it.

:data:`TABLE` declares each of them once — its per-voxel term, the partial derivatives a
hand-written VJP needs and its split for one-hot targets — and every Python implementation (the
float64 reference, torch's native dense and label paths, the JAX example) is driven by it; the
fused C++/CUDA kernels share their per-element arithmetic in ``csrc/kernels/region_stats.cuh``.

Fields F are per-voxel constants (B, C, *spatial) computed before the statistics by the loss
spec's ``fields`` function (no gradient flows into them).

``log p`` is computed from the logits (log-softmax / log-sigmoid), never as ``log`` of a
rounded probability. The fused kernels compute the first nine and the two field statistics (one
field of each kind, :func:`fused_fields`) in one read of the logits, labels and fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Array = Any


@dataclass
class Voxel:
    """What a statistic's per-voxel term reads, each broadcastable to (B, C, N): the probability
    ``p``, the target ``g``, ``log_p`` = log p and ``log_1mp`` = log(1 − p) (computed from the
    logits, None where not needed), ``field`` the field F of a field statistic and ``arg`` the
    statistic's argument (γ of a focal statistic, the field's name)."""

    p: Array
    g: Array
    log_p: Array | None = None
    log_1mp: Array | None = None
    field: Array | None = None
    arg: Any = None


Term = Callable[[Any, Voxel], Array]
Partials = Callable[[Any, Voxel], tuple[Array | None, Array | None, Array | None]]


@dataclass(frozen=True)
class Statistic:
    """One per-voxel statistic: Σ_x w·f(p, g), its meaning and the parts every implementation uses.

    ``term(xp, v)`` is f in array-API code (``xp`` any namespace; autograd frameworks differentiate
    it). ``partials(xp, v)`` gives (∂f/∂p, ∂f/∂log p, ∂f/∂log(1 − p)), each an array, a number or
    None (zero), for hand-written VJPs: log terms are differentiated w.r.t. log p so they stay
    finite where p underflows. ``one_hot`` splits f for a one-hot g into (f(p, 0), f(p, 1) − f(p, 0))
    (None: identically 0), so label paths sum the first over all classes and the second only at each
    voxel's label (a field statistic's ``Voxel.field`` is then the field at each voxel, or at each
    voxel's label); None where a label path does not apply. ``reads`` names the optional inputs.
    """

    name: str
    meaning: str
    used_by: str
    term: Term
    partials: Partials
    one_hot: tuple[Term | None, Term | None] | None
    reads: frozenset[str] = frozenset()
    sigmoid_only: bool = False
    finite: bool = True
    """f is finite wherever p and g are (no log): a weight-0 voxel then needs no masking."""


def xlogy(xp: Any, x: Array, log_y: Array) -> Array:
    """x·log y with 0 where x == 0 (the convention of scipy.special.xlogy)."""
    return xp.where(x == 0, xp.zeros_like(log_y), x * log_y)


def power(xp: Any, x: Array, gamma: float) -> Array:
    """x**γ for x in [0, 1], with a finite gradient at x == 0 for γ < 1 (double where); 1 for γ == 0.
    A NaN x stays NaN (``x * 0`` in the other branch), so a NaN logit gives a NaN loss."""
    if gamma == 0:
        return xp.ones_like(x)
    positive = x > 0
    return xp.where(positive, xp.where(positive, x, xp.ones_like(x)) ** gamma, x * 0.0)


def _focal_slope(xp: Any, base: Array, other: Array, log_term: Array, gamma: float) -> Array:
    """γ·base^(γ−1)·other·log_term, 0 where base == 0 (the part of a focal term's derivative that
    comes from its modulating factor base^γ, with base = 1 − other)."""
    if gamma == 0:
        return xp.zeros_like(base)
    positive = base > 0
    safe = xp.where(positive, base, xp.ones_like(base))
    return xp.where(positive, gamma * safe ** (gamma - 1) * other * log_term, xp.zeros_like(base))


def _ones(xp: Any, v: Voxel) -> Array:
    return xp.ones_like(v.p[:, :1])


def _abs(xp: Any, d: Array) -> Array:
    """|d| written as d·sign(d), so autograd's derivative is sign(d) (0 at 0, as the hand VJP)."""
    return d * xp.sign(d)


_NONE3 = (None, None, None)

TABLE: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic(
            "intersection",
            "Σ w·p·g",
            "dice family",
            lambda xp, v: v.p * v.g,
            lambda xp, v: (v.g, None, None),
            (None, lambda xp, v: v.p),
        ),
        Statistic(
            "pred_sum",
            "Σ w·p",
            "dice family",
            lambda xp, v: v.p,
            lambda xp, v: (1.0, None, None),
            (lambda xp, v: v.p, None),
        ),
        Statistic(
            "target_sum",
            "Σ w·g",
            "dice family, CE normaliser, absent classes",
            lambda xp, v: v.g,
            lambda xp, v: _NONE3,
            (None, _ones),
        ),
        Statistic(
            "pred_sq_sum",
            "Σ w·p²",
            "squared (V-Net) denominators",
            lambda xp, v: v.p * v.p,
            lambda xp, v: (2.0 * v.p, None, None),
            (lambda xp, v: v.p * v.p, None),
        ),
        Statistic(
            "target_sq_sum",
            "Σ w·g²",
            "squared (V-Net) denominators",
            lambda xp, v: v.g * v.g,
            lambda xp, v: _NONE3,
            (None, _ones),
        ),
        Statistic(
            "abs_diff_sum",
            "Σ w·|p − g|",
            "soft-label intersection (P + G − L1)/2",
            lambda xp, v: _abs(xp, v.p - v.g),
            lambda xp, v: (xp.sign(v.p - v.g), None, None),
            (lambda xp, v: v.p, lambda xp, v: 1.0 - 2.0 * v.p),  # |p − 1| − |p| = 1 − 2p for p in [0, 1]
        ),
        Statistic(
            "count",
            "Σ w",
            "means over voxels (BCE, focal)",
            lambda xp, v: _ones(xp, v),
            lambda xp, v: _NONE3,
            (_ones, None),
        ),
        Statistic(
            "ce_pos",
            "Σ w·g·(−log p)",
            "cross-entropy / BCE positive part",
            lambda xp, v: -xlogy(xp, v.g, v.log_p),
            lambda xp, v: (None, -v.g, None),
            (None, lambda xp, v: -v.log_p),
            reads=frozenset({"log_p"}),
            finite=False,
        ),
        Statistic(
            "ce_neg",
            "Σ w·(1−g)·(−log(1−p))",
            "BCE negative part (sigmoid only)",
            lambda xp, v: -xlogy(xp, 1.0 - v.g, v.log_1mp),
            lambda xp, v: (None, None, -(1.0 - v.g)),
            None,
            reads=frozenset({"log_1mp"}),
            sigmoid_only=True,
            finite=False,
        ),
        Statistic(
            "neg_log_pred_sum",
            "Σ w·(−log p)",
            "label smoothing",
            lambda xp, v: -v.log_p,
            lambda xp, v: (None, -xp.ones_like(v.p), None),
            (lambda xp, v: -v.log_p, None),
            reads=frozenset({"log_p"}),
            finite=False,
        ),
        Statistic(
            "neg_log_1mp_sum",
            "Σ w·(−log(1−p))",
            "binary label smoothing (sigmoid only)",
            lambda xp, v: -v.log_1mp,
            lambda xp, v: (None, None, -xp.ones_like(v.p)),
            None,
            reads=frozenset({"log_1mp"}),
            sigmoid_only=True,
            finite=False,
        ),
        Statistic(
            "focal_pos",
            "Σ w·g·(1−p)^γ·(−log p)",
            "focal loss",
            lambda xp, v: -xlogy(xp, v.g * power(xp, 1.0 - v.p, v.arg), v.log_p),
            # d/dlog p of (1−p)^γ (−log p) = −(1−p)^γ + γ (1−p)^(γ−1) · p · log p
            lambda xp, v: (
                None,
                v.g * (_focal_slope(xp, 1.0 - v.p, v.p, v.log_p, v.arg) - power(xp, 1.0 - v.p, v.arg)),
                None,
            ),
            (None, lambda xp, v: -xlogy(xp, power(xp, 1.0 - v.p, v.arg), v.log_p)),
            reads=frozenset({"log_p"}),
            finite=False,
        ),
        Statistic(
            "focal_neg",
            "Σ w·(1−g)·p^γ·(−log(1−p))",
            "focal loss, negative part (sigmoid only)",
            lambda xp, v: -xlogy(xp, (1.0 - v.g) * power(xp, v.p, v.arg), v.log_1mp),
            # d/dlog(1−p) of p^γ (−log(1−p)) = −p^γ + γ p^(γ−1) (1−p) log(1−p)
            lambda xp, v: (
                None,
                None,
                (1.0 - v.g) * (_focal_slope(xp, v.p, 1.0 - v.p, v.log_1mp, v.arg) - power(xp, v.p, v.arg)),
            ),
            None,
            reads=frozenset({"log_1mp"}),
            sigmoid_only=True,
            finite=False,
        ),
        Statistic(
            "field_pred_sum",
            "Σ w·p·F",
            "boundary loss (F = signed distance map)",
            lambda xp, v: v.p * v.field,
            lambda xp, v: (v.field, None, None),
            (lambda xp, v: v.p * v.field, None),  # p·F reads no g
            reads=frozenset({"field"}),
        ),
        Statistic(
            "field_sq_err_sum",
            "Σ w·(p − g)²·F",
            "Hausdorff-DT loss (F = d_p^α + d_g^α)",
            lambda xp, v: (v.p - v.g) * (v.p - v.g) * v.field,
            lambda xp, v: (2.0 * (v.p - v.g) * v.field, None, None),
            (lambda xp, v: v.p * v.p * v.field, lambda xp, v: (1.0 - 2.0 * v.p) * v.field),  # (p − 1)²F − p²F
            reads=frozenset({"field"}),
        ),
    )
}
"""Every per-voxel statistic, by base name (the argument after a colon is ``Voxel.arg``)."""

PARAMETRIC = frozenset({"focal_pos", "focal_neg"})  # name:γ
FIELD = frozenset({"field_pred_sum", "field_sq_err_sum"})  # name:F, F a per-voxel constant field
SHAPE_STATISTICS: dict[str, str] = {"voxels": "N: voxels per sample, every voxel whatever its weight"}
"""Statistics the executor supplies from the inputs' shape (kernels never see them)."""
STATISTICS: dict[str, str] = {
    **{name: s.meaning for name, s in TABLE.items() if name not in PARAMETRIC | FIELD},
    **SHAPE_STATISTICS,
}
SIGMOID_ONLY = frozenset(name for name, s in TABLE.items() if s.sigmoid_only)


def weighted_sum(xp: Any, term: Array, w: Array | None, channels: int, finite: bool = True) -> Array:
    """Σ_x w·term over the last axis, shape (B, C); a voxel with w == 0 adds an exact 0 even where
    ``term`` is not finite there (unless ``finite`` says it always is)."""
    if w is None:
        total = xp.sum(term, axis=-1)
    else:
        weighted = w * term
        if not finite:
            weighted = xp.where(w == 0, xp.zeros_like(weighted), weighted)
        total = xp.sum(weighted, axis=-1)
    if total.shape[1] != channels:
        total = xp.broadcast_to(total, (total.shape[0], channels))
    return total


def weighted_elements(xp: Any, term: Array, w: Array | None, channels: int) -> Array:
    """w·term per voxel, shape (B, C, N): the summands of :func:`weighted_sum`, with an exact 0 where
    w == 0 (even where ``term`` is not finite there); the element maps of ``reduction="none"``."""
    if w is not None:
        weighted = w * term
        term = xp.where(w == 0, xp.zeros_like(weighted), weighted)
    shape = (int(term.shape[0]), channels, int(term.shape[2]))
    return term if tuple(int(n) for n in term.shape) == shape else xp.broadcast_to(term, shape)


def focal_statistic(kind: str, gamma: float) -> str:
    """Name of a focal statistic with its exponent, e.g. ``focal_pos:2.0``."""
    if kind not in PARAMETRIC:
        raise ValueError(f"unknown focal statistic {kind!r}")
    return f"{kind}:{float(gamma)!r}"


def field_statistic(kind: str, field: str) -> str:
    """Name of a field statistic, e.g. ``field_pred_sum:boundary_phi``."""
    if kind not in FIELD:
        raise ValueError(f"unknown field statistic {kind!r}")
    return f"{kind}:{field}"


def parse(name: str) -> tuple[str, Any]:
    """``'focal_pos:2.0'`` → ``('focal_pos', 2.0)``; ``'field_pred_sum:phi'`` → ``('field_pred_sum',
    'phi')``; plain names → ``(name, None)``."""
    base, sep, arg = name.partition(":")
    if sep:
        if base in PARAMETRIC:
            return base, float(arg)
        if base in FIELD:
            return base, arg
        raise ValueError(f"unknown statistic {name!r}")
    if base not in STATISTICS:
        raise ValueError(f"unknown statistic {name!r}; known: {', '.join(STATISTICS)}")
    return base, None


def describe(name: str) -> str:
    base, arg = parse(name)
    if base in SHAPE_STATISTICS:
        return SHAPE_STATISTICS[base]
    text = TABLE[base].meaning
    if base in FIELD:
        return text.replace("F", arg)
    return text.replace("γ", f"{arg:g}") if arg is not None else text


# Layout of the fused kernels' (B, C, 12) output (csrc/kernels/region_stats.cuh, enum Stat):
# every backend built on those kernels reads its statistics from these slots.
FUSED_SLOTS: dict[str, int] = {
    "intersection": 0,
    "pred_sum": 1,
    "target_sum": 2,
    "pred_sq_sum": 3,
    "target_sq_sum": 4,
    "abs_diff_sum": 5,
    "ce_pos": 6,
    "ce_neg": 7,
    "count": 8,
}
FUSED_INVALID_SLOT = 9  # invalid-label count, class 0 only
FUSED_FIELD_SLOTS: dict[str, int] = {"field_pred_sum": 10, "field_sq_err_sum": 11}
"""Slots of the field statistics: the kernels take one field per kind (``field_pred``, ``field_sq_err``)."""
FUSED_NUM_SLOTS = 12


def fused_fields(names: Iterable[str]) -> dict[str, str] | None:
    """The fields the fused kernels need for ``names``, ``{kind: field name}`` (kind
    ``field_pred_sum`` or ``field_sq_err_sum``), or None when the kernels cannot compute them:
    a statistic without a slot, or two fields of one kind (the kernels take one of each).

    >>> fused_fields(["intersection", "field_pred_sum:phi", "count"])
    {'field_pred_sum': 'phi'}
    >>> fused_fields(["field_pred_sum:a", "field_pred_sum:b"]) is None
    True
    """
    fields: dict[str, str] = {}
    for name in names:
        if name in FUSED_SLOTS:
            continue
        base, sep, arg = name.partition(":")
        if not sep or base not in FUSED_FIELD_SLOTS or fields.get(base, arg) != arg:
            return None
        fields[base] = arg
    return fields


def fused_slot(name: str) -> int:
    """The slot of a statistic the fused kernels compute (``field_pred_sum:F`` → its kind's slot)."""
    return FUSED_SLOTS[name] if name in FUSED_SLOTS else FUSED_FIELD_SLOTS[name.partition(":")[0]]


ACTIVATION_CODES: dict[str, int] = {"softmax": 0, "sigmoid": 1, "none": 2}  # enum Activation

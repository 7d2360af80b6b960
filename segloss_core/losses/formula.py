"""Array-API helpers for formulas over (rows, classes) statistics (public: loss plugins use them).

Rules for formula code (so the same text runs on NumPy, CuPy, PyTorch, JAX and the
differentiating tape): take the namespace ``xp`` as an argument, pass no Python scalars to
``xp`` functions (use :func:`full`), and keep to the functions the tape implements
(``segloss_core.reference.autodiff.TapeNamespace``).

>>> import array_api_compat.numpy as xp
>>> safe_ratio(xp, xp.asarray([1.0, 2.0]), xp.asarray([2.0, 0.0]), zero_value=1.0).tolist()
[0.5, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..arrays import device

Array = Any

__all__ = ["constant_vector", "full", "included_classes", "reduce_voxel_mean", "safe_ratio", "select_columns"]


def full(xp: Any, like: Array, value: float) -> Array:
    """An array shaped and typed like ``like`` filled with ``value`` (a constant)."""
    return xp.full_like(like, value)


def constant_vector(xp: Any, like: Array, values: Sequence[float]) -> Array:
    """A 1-D constant with ``like``'s dtype and device."""
    return xp.asarray([float(v) for v in values], dtype=like.dtype, device=device(like))


def safe_ratio(xp: Any, num: Array, den: Array, zero_value: float) -> Array:
    """num / den, with ``zero_value`` (and zero gradient) where den == 0."""
    zero = den == 0
    safe_den = xp.where(zero, full(xp, den, 1.0), den)
    return xp.where(zero, full(xp, num, zero_value), num / safe_den)


def select_columns(xp: Any, x: Array, columns: Sequence[int] | None) -> Array:
    """x[:, columns] (all columns when None)."""
    if columns is None:
        return x
    index = xp.asarray(list(columns), device=device(x))
    return xp.take(x, index, axis=1)


def included_classes(params: Any, num_classes: int) -> list[int]:
    """The channels a loss averages over, from ``classes``/``include_background`` (every channel with
    ``regions``: none of them is background)."""
    classes = params.get("classes")
    if classes is not None:
        return sorted(set(classes))
    # with regions every channel is a region (none is background): include_background has no effect
    if num_classes == 1 or params.get("include_background", True) or params.get("regions") is not None:
        return list(range(num_classes))
    return list(range(1, num_classes))


def reduce_voxel_mean(xp: Any, numerator: Array, normaliser: Array, reduction: str) -> Array:
    """Per-sample sums (B,) → ``per_sample`` (and the distance losses' ``none``): per-sample means,
    ``sum``: Σ numerator, ``mean``: the weighted mean over every voxel of the batch (0 where
    nothing counts)."""
    if reduction in ("per_sample", "none"):
        return safe_ratio(xp, numerator, normaliser, 0.0)
    if reduction == "sum":
        return xp.sum(numerator)
    return safe_ratio(xp, xp.sum(numerator), xp.sum(normaliser), 0.0)

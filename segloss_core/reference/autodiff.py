"""A small reverse-mode differentiator for the formula stage, over any array-API namespace.

The formulas of ``segloss_core.losses`` map per-(sample, class) statistics of shape
(B, C) to a loss. PyTorch and JAX differentiate them with their own autograd; the NumPy
reference backend (and the CuPy backend) differentiate them with this tape, so every
formula is written exactly once and its gradient is exact (chain rule, no finite
differences).

Only the operations listed in :class:`TapeNamespace` are differentiable; formulas must
restrict themselves to that vocabulary (the conformance suite enforces this indirectly: a
formula that used anything else would fail on the NumPy backend). The rules for formula
code are in ``docs/architecture.md``: pass the namespace ``xp`` explicitly, never give
Python scalars to ``xp`` functions (use ``xp.full_like``), and use operators for
arithmetic with scalars.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Array = Any
_VJP = Callable[[Array], Array]


class Var:
    """An array on the tape: a value plus the vector-Jacobian products to its parents."""

    __slots__ = ("_tape", "parents", "value")
    __array_priority__ = 1000.0  # make ``ndarray <op> Var`` defer to Var's reflected ops

    def __init__(self, tape: TapeNamespace, value: Array, parents: Sequence[tuple[Var, _VJP]] = ()):
        self._tape = tape
        self.value = value
        self.parents = tuple(parents)

    # array attributes -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def ndim(self) -> int:
        return self.value.ndim

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    @property
    def device(self) -> Any:
        from ..arrays import device

        return device(self.value)

    def __repr__(self) -> str:
        return f"Var({self.value!r})"

    # arithmetic -------------------------------------------------------------------------
    def __add__(self, other: Any) -> Var:
        return self._tape.add(self, other)

    def __radd__(self, other: Any) -> Var:
        return self._tape.add(other, self)

    def __sub__(self, other: Any) -> Var:
        return self._tape.subtract(self, other)

    def __rsub__(self, other: Any) -> Var:
        return self._tape.subtract(other, self)

    def __mul__(self, other: Any) -> Var:
        return self._tape.multiply(self, other)

    def __rmul__(self, other: Any) -> Var:
        return self._tape.multiply(other, self)

    def __truediv__(self, other: Any) -> Var:
        return self._tape.divide(self, other)

    def __rtruediv__(self, other: Any) -> Var:
        return self._tape.divide(other, self)

    def __neg__(self) -> Var:
        return self._tape.negative(self)

    def __pow__(self, exponent: Any) -> Var:
        return self._tape.pow(self, exponent)

    def __getitem__(self, key: Any) -> Var:
        return self._tape.getitem(self, key)

    # comparisons are not differentiable: they return plain boolean arrays
    def __lt__(self, other: Any) -> Array:
        return self.value < _raw(other)

    def __le__(self, other: Any) -> Array:
        return self.value <= _raw(other)

    def __gt__(self, other: Any) -> Array:
        return self.value > _raw(other)

    def __ge__(self, other: Any) -> Array:
        return self.value >= _raw(other)

    def __eq__(self, other: Any) -> Array:  # type: ignore[override]
        return self.value == _raw(other)

    def __ne__(self, other: Any) -> Array:  # type: ignore[override]
        return self.value != _raw(other)

    __hash__ = object.__hash__


def _raw(x: Any) -> Any:
    return x.value if isinstance(x, Var) else x


class TapeNamespace:
    """Array-API-like namespace whose results remember how to differentiate themselves.

    ``xp`` is the underlying namespace (``array_api_compat.numpy`` or ``.cupy``).
    """

    def __init__(self, xp: Any):
        self.xp = xp
        for name in ("float16", "float32", "float64", "int64", "bool"):
            setattr(self, name, getattr(xp, name))

    # bookkeeping --------------------------------------------------------------------------
    def variable(self, value: Array) -> Var:
        """A leaf to differentiate with respect to."""
        return Var(self, value)

    def external(self, value: Array, parent: Var, vjp: _VJP) -> Var:
        """A value computed outside the tape from ``parent``, with its vector-Jacobian product
        ``vjp(d/d value) → d/d parent`` (the reference's statistics, a fused kernel's backward)."""
        return self._node(value, (parent, vjp))

    def _node(self, value: Array, *parents: tuple[Any, _VJP]) -> Var:
        return Var(self, value, [(p, fn) for p, fn in parents if isinstance(p, Var)])

    def _unbroadcast(self, grad: Array, shape: tuple[int, ...]) -> Array:
        xp = self.xp
        while grad.ndim > len(shape):
            grad = xp.sum(grad, axis=0)
        for axis, size in enumerate(shape):
            if size == 1 and grad.shape[axis] != 1:
                grad = xp.sum(grad, axis=axis, keepdims=True)
        return grad

    def _shape(self, x: Any) -> tuple[int, ...]:
        return tuple(getattr(x, "shape", ()))

    # elementwise arithmetic -------------------------------------------------------------------
    def add(self, a: Any, b: Any) -> Var:
        sa, sb = self._shape(a), self._shape(b)
        return self._node(
            _raw(a) + _raw(b),
            (a, lambda g: self._unbroadcast(g, sa)),
            (b, lambda g: self._unbroadcast(g, sb)),
        )

    def subtract(self, a: Any, b: Any) -> Var:
        sa, sb = self._shape(a), self._shape(b)
        return self._node(
            _raw(a) - _raw(b),
            (a, lambda g: self._unbroadcast(g, sa)),
            (b, lambda g: self._unbroadcast(-g, sb)),
        )

    def multiply(self, a: Any, b: Any) -> Var:
        va, vb = _raw(a), _raw(b)
        sa, sb = self._shape(a), self._shape(b)
        return self._node(
            va * vb,
            (a, lambda g: self._unbroadcast(g * vb, sa)),
            (b, lambda g: self._unbroadcast(g * va, sb)),
        )

    def divide(self, a: Any, b: Any) -> Var:
        va, vb = _raw(a), _raw(b)
        sa, sb = self._shape(a), self._shape(b)
        return self._node(
            va / vb,
            (a, lambda g: self._unbroadcast(g / vb, sa)),
            (b, lambda g: self._unbroadcast(-g * va / (vb * vb), sb)),
        )

    def negative(self, a: Any) -> Var:
        return self._node(-_raw(a), (a, lambda g: -g))

    def pow(self, a: Any, exponent: Any) -> Var:
        if isinstance(exponent, Var):
            raise TypeError("the tape differentiates x ** c for a constant exponent c only")
        va = _raw(a)
        out = va**exponent
        # d/dx x^c = c x^(c-1); finite at x == 0 for c >= 1 (0^0 == 1)
        return self._node(out, (a, lambda g: g * exponent * va ** (exponent - 1)))

    # elementwise functions --------------------------------------------------------------------
    def log(self, a: Any) -> Var:
        va = _raw(a)
        return self._node(self.xp.log(va), (a, lambda g: g / va))

    def log1p(self, a: Any) -> Var:
        va = _raw(a)
        return self._node(self.xp.log1p(va), (a, lambda g: g / (1 + va)))

    def exp(self, a: Any) -> Var:
        out = self.xp.exp(_raw(a))
        return self._node(out, (a, lambda g: g * out))

    def sqrt(self, a: Any) -> Var:
        out = self.xp.sqrt(_raw(a))
        return self._node(out, (a, lambda g: g / (2 * out)))

    def abs(self, a: Any) -> Var:
        va = _raw(a)
        return self._node(self.xp.abs(va), (a, lambda g: g * self.xp.sign(va)))

    def _select(self, a: Any, b: Any, a_wins: Array, tie: Array, value: Array) -> Var:
        """Subgradient of max/min: the winner takes the gradient, ties split it (as torch)."""
        xp = self.xp
        sa, sb = self._shape(a), self._shape(b)
        share_a = xp.where(tie, xp.full_like(value, 0.5), xp.astype(a_wins, value.dtype))
        return self._node(
            value,
            (a, lambda g: self._unbroadcast(g * share_a, sa)),
            (b, lambda g: self._unbroadcast(g * (1 - share_a), sb)),
        )

    def maximum(self, a: Any, b: Any) -> Var:
        va, vb = _raw(a), _raw(b)
        value = self.xp.maximum(va, vb)
        return self._select(a, b, va > vb, va == vb, value)

    def minimum(self, a: Any, b: Any) -> Var:
        va, vb = _raw(a), _raw(b)
        value = self.xp.minimum(va, vb)
        return self._select(a, b, va < vb, va == vb, value)

    def clip(self, a: Any, min: Any = None, max: Any = None) -> Var:  # noqa: A002 - array API names
        out = a
        if min is not None:
            out = self.maximum(out, min)
        if max is not None:
            out = self.minimum(out, max)
        return out if isinstance(out, Var) else self._node(out)

    def where(self, cond: Any, a: Any, b: Any) -> Var:
        xp = self.xp
        c = _raw(cond)
        va, vb = _raw(a), _raw(b)
        sa, sb = self._shape(a), self._shape(b)
        return self._node(
            xp.where(c, va, vb),
            (a, lambda g: self._unbroadcast(xp.where(c, g, xp.zeros_like(g)), sa)),
            (b, lambda g: self._unbroadcast(xp.where(c, xp.zeros_like(g), g), sb)),
        )

    def astype(self, a: Any, dtype: Any) -> Var:
        va = _raw(a)
        src = va.dtype
        return self._node(self.xp.astype(va, dtype), (a, lambda g: self.xp.astype(g, src)))

    # reductions and shape ---------------------------------------------------------------------
    def sum(self, a: Any, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Var:
        xp = self.xp
        va = _raw(a)
        shape = va.shape

        def vjp(g: Array) -> Array:
            if not keepdims and axis is not None:
                axes = (axis,) if isinstance(axis, int) else axis
                for ax in sorted(ax % len(shape) for ax in axes):
                    g = xp.expand_dims(g, axis=ax)
            return xp.broadcast_to(g, shape) * xp.ones_like(va)

        return self._node(xp.sum(va, axis=axis, keepdims=keepdims), (a, vjp))

    def max(self, a: Any, axis: int | None = None, keepdims: bool = False) -> Var:
        xp = self.xp
        va = _raw(a)
        out = xp.max(va, axis=axis, keepdims=True)
        winners = xp.astype(va == out, va.dtype)
        share = winners / xp.sum(winners, axis=axis, keepdims=True)
        result = out if keepdims else (xp.reshape(out, ()) if axis is None else xp.squeeze(out, axis=axis))

        def vjp(g: Array) -> Array:
            if not keepdims:
                g = xp.reshape(g, out.shape)
            return g * share

        return self._node(result, (a, vjp))

    def reshape(self, a: Any, shape: tuple[int, ...]) -> Var:
        va = _raw(a)
        src = va.shape
        return self._node(self.xp.reshape(va, shape), (a, lambda g: self.xp.reshape(g, src)))

    def expand_dims(self, a: Any, axis: int = 0) -> Var:
        va = _raw(a)
        return self._node(self.xp.expand_dims(va, axis=axis), (a, lambda g: self.xp.squeeze(g, axis=axis)))

    def squeeze(self, a: Any, axis: int | tuple[int, ...]) -> Var:
        va = _raw(a)
        src = va.shape
        return self._node(self.xp.squeeze(va, axis=axis), (a, lambda g: self.xp.reshape(g, src)))

    def broadcast_to(self, a: Any, shape: tuple[int, ...]) -> Var:
        va = _raw(a)
        src = va.shape
        return self._node(self.xp.broadcast_to(va, shape), (a, lambda g: self._unbroadcast(g, src)))

    def take(self, a: Any, indices: Any, axis: int) -> Var:
        xp = self.xp
        va = _raw(a)
        idx = _raw(indices)

        def vjp(g: Array) -> Array:
            out = xp.zeros_like(va)
            moved_out = xp.moveaxis(out, axis, 0)  # a view: writing to it fills ``out``
            moved_g = xp.moveaxis(g, axis, 0)
            for position in range(int(idx.shape[0])):
                moved_out[int(idx[position])] += moved_g[position]
            return out

        return self._node(xp.take(va, idx, axis=axis), (a, vjp))

    def stack(self, arrays: Sequence[Any], axis: int = 0) -> Var:
        xp = self.xp
        parents = []
        for position, item in enumerate(arrays):
            parents.append((item, lambda g, i=position: xp.squeeze(xp.take(g, xp.asarray([i]), axis=axis), axis=axis)))
        return self._node(xp.stack([_raw(x) for x in arrays], axis=axis), *parents)

    def concat(self, arrays: Sequence[Any], axis: int = 0) -> Var:
        xp = self.xp
        parents = []
        start = 0
        for item in arrays:
            size = _raw(item).shape[axis]
            sl = [slice(None)] * _raw(item).ndim
            sl[axis] = slice(start, start + size)
            parents.append((item, lambda g, key=tuple(sl): g[key]))
            start += size
        return self._node(xp.concat([_raw(x) for x in arrays], axis=axis), *parents)

    def permute_dims(self, a: Any, axes: tuple[int, ...]) -> Var:
        inverse = tuple(sorted(range(len(axes)), key=lambda i: axes[i]))
        return self._node(self.xp.permute_dims(_raw(a), axes), (a, lambda g: self.xp.permute_dims(g, inverse)))

    def take_along_axis(self, a: Any, indices: Array, axis: int = -1) -> Var:
        """Gather along ``axis``; differentiable when ``indices`` is a permutation along it (a sort order)."""
        xp = self.xp
        va, idx = _raw(a), _raw(indices)
        if tuple(idx.shape) != tuple(va.shape):
            raise ValueError("the tape differentiates take_along_axis for permutations (indices of a's shape) only")
        return self._node(
            xp.take_along_axis(va, idx, axis=axis),
            (a, lambda g: xp.take_along_axis(g, xp.argsort(idx, axis=axis), axis=axis)),
        )

    def cumulative_sum(self, a: Any, axis: int = -1) -> Var:
        xp = self.xp

        def vjp(g: Array) -> Array:  # the reversed cumulative sum: Σ_{j ≥ i} g_j
            return xp.sum(g, axis=axis, keepdims=True) - xp.cumulative_sum(g, axis=axis) + g

        return self._node(xp.cumulative_sum(_raw(a), axis=axis), (a, vjp))

    def getitem(self, a: Any, key: Any) -> Var:
        xp = self.xp
        va = _raw(a)

        def vjp(g: Array) -> Array:
            out = xp.zeros_like(va)
            out[key] = g
            return out

        return self._node(va[key], (a, vjp))

    # constants (no gradient) ----------------------------------------------------------------
    def asarray(self, obj: Any, dtype: Any = None, device: Any = None) -> Array:
        return self.xp.asarray(_raw(obj), dtype=dtype, device=device)

    def zeros_like(self, a: Any, dtype: Any = None) -> Array:
        return self.xp.zeros_like(_raw(a), dtype=dtype)

    def ones_like(self, a: Any, dtype: Any = None) -> Array:
        return self.xp.ones_like(_raw(a), dtype=dtype)

    def full_like(self, a: Any, fill_value: Any, dtype: Any = None) -> Array:
        return self.xp.full_like(_raw(a), fill_value, dtype=dtype)

    def isinf(self, a: Any) -> Array:
        return self.xp.isinf(_raw(a))

    def isnan(self, a: Any) -> Array:
        return self.xp.isnan(_raw(a))

    def isfinite(self, a: Any) -> Array:
        return self.xp.isfinite(_raw(a))

    def logical_and(self, a: Any, b: Any) -> Array:
        return self.xp.logical_and(_raw(a), _raw(b))

    def logical_or(self, a: Any, b: Any) -> Array:
        return self.xp.logical_or(_raw(a), _raw(b))

    def logical_not(self, a: Any) -> Array:
        return self.xp.logical_not(_raw(a))

    def any(self, a: Any, axis: Any = None, keepdims: bool = False) -> Array:
        return self.xp.any(_raw(a), axis=axis, keepdims=keepdims)

    def arange(self, *args: Any, **kwargs: Any) -> Array:
        return self.xp.arange(*args, **kwargs)

    def argsort(self, a: Any, axis: int = -1, descending: bool = False, stable: bool = True) -> Array:
        return self.xp.argsort(_raw(a), axis=axis, descending=descending, stable=stable)


def gradients(output: Var, wrt: Sequence[Var], seed: Array | None = None) -> list[Array]:
    """d output / d wrt for each leaf (the reverse sweep); ``seed`` defaults to ones."""
    tape = output._tape
    xp = tape.xp
    order: list[Var] = []
    seen: set[int] = set()
    stack: list[tuple[Var, bool]] = [(output, False)]
    while stack:  # iterative post-order DFS: deep formulas never hit the recursion limit
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for parent, _ in node.parents:
            if id(parent) not in seen:
                stack.append((parent, False))
    grads: dict[int, Array] = {id(output): xp.ones_like(output.value) if seed is None else seed}
    for node in reversed(order):
        g = grads.get(id(node))
        if g is None:
            continue
        for parent, vjp in node.parents:
            contribution = vjp(g)
            key = id(parent)
            grads[key] = contribution if key not in grads else grads[key] + contribution
    return [grads.get(id(leaf), xp.zeros_like(leaf.value)) for leaf in wrt]

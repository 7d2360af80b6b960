"""The soft skeleton of Shit et al. (clDice, CVPR 2021), in array-API code plus segloss operators.

Every function takes the array namespace ``xp`` and the operators ``ops``
(:mod:`segloss_core.operators`: ``max_pool``/``min_pool`` over the spatial axes of
(B, C, *spatial), stride 1, padding that never wins) as arguments, so the same text runs on
NumPy (differentiated by segloss's tape), PyTorch, JAX and any backend with ``operators = True``.

As in the authors' code (jocpae/clDice ``soft_skeleton.py``) and MONAI's ``soft_skel``:

* soft erosion: minimum over a *cross* — the 3-window along each spatial axis separately, then
  the minimum over the axes (``erosion="cross"``); ``erosion="box"`` takes the minimum over the
  full 3^d window instead (``ops.min_pool``), as some re-implementations do;
* soft dilation: maximum over the full 3^d window (``ops.max_pool``);
* soft opening: dilation of the erosion;
* skeleton: ``skel = relu(x − open(x))``, then ``iters`` times: ``x = erode(x)``,
  ``delta = relu(x − open(x))``, ``skel = skel + relu(delta − skel·delta)``.

>>> import numpy as np
>>> import array_api_compat.numpy as xp
>>> from segloss_core.operators import ArrayOperators
>>> bar = np.zeros((1, 1, 5, 7)); bar[0, 0, 1:4, :] = 1.0  # a 3-pixel-thick horizontal bar
>>> skel = soft_skeleton(xp, ArrayOperators(xp), bar, iters=3)
>>> skel[0, 0].astype(int)
array([[0, 0, 0, 0, 0, 0, 0],
       [0, 0, 0, 0, 0, 0, 0],
       [1, 1, 1, 1, 1, 1, 1],
       [0, 0, 0, 0, 0, 0, 0],
       [0, 0, 0, 0, 0, 0, 0]])
"""

from __future__ import annotations

import math
from typing import Any

Array = Any
EROSIONS = ("cross", "box")


def _relu(xp: Any, x: Array) -> Array:
    return xp.maximum(x, xp.zeros_like(x))


def _axis_min3(xp: Any, x: Array, axis: int) -> Array:
    """Minimum over the 3-window along ``axis`` (the window is cut at the edges)."""
    size = int(x.shape[axis])
    if size == 1:
        return x

    def part(start: int, stop: int) -> Array:
        key = [slice(None)] * x.ndim
        key[axis] = slice(start, stop)
        return x[tuple(key)]

    edge = xp.full_like(part(0, 1), math.inf)
    before = xp.concat([edge, part(0, size - 1)], axis=axis)  # x[i − 1]
    after = xp.concat([part(1, size), edge], axis=axis)  # x[i + 1]
    return xp.minimum(xp.minimum(before, x), after)


def soft_erode(xp: Any, ops: Any, x: Array, erosion: str = "cross") -> Array:
    """Soft erosion of (B, C, *spatial): cross-shaped (authors, MONAI) or the full 3^d box."""
    if erosion == "box":
        return ops.min_pool(x, 3)
    if erosion != "cross":
        raise ValueError(f"erosion must be one of {EROSIONS}, got {erosion!r}")
    out = None
    for axis in range(2, x.ndim):
        eroded = _axis_min3(xp, x, axis)
        out = eroded if out is None else xp.minimum(out, eroded)
    return out


def soft_dilate(xp: Any, ops: Any, x: Array) -> Array:
    """Soft dilation: maximum over the 3^d window."""
    return ops.max_pool(x, 3)


def soft_open(xp: Any, ops: Any, x: Array, erosion: str = "cross") -> Array:
    return soft_dilate(xp, ops, soft_erode(xp, ops, x, erosion))


def soft_skeleton(xp: Any, ops: Any, x: Array, iters: int = 3, erosion: str = "cross") -> Array:
    """Soft skeleton of ``x`` (B, C, *spatial) with values in [0, 1], per channel."""
    skel = _relu(xp, x - soft_open(xp, ops, x, erosion))
    for _ in range(iters):
        x = soft_erode(xp, ops, x, erosion)
        delta = _relu(xp, x - soft_open(xp, ops, x, erosion))
        skel = skel + _relu(xp, delta - skel * delta)
    return skel

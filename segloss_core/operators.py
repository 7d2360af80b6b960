"""Operators: the few spatial primitives a voxelwise loss may need beyond the array API.

A loss spec may define its math as ``array_forward(xp, ops, p, g, w, params)`` — array-API
code on the probabilities p (B, C, *spatial), the target g (same shape) and the voxel weights
w (B, 1|C, *spatial) — calling ``ops`` for what the standard lacks. Every backend that
provides the operators then computes the loss, and differentiates it with its own autograd;
the NumPy reference differentiates it with the tape (exact VJPs below). A loss plugin such as
clDice (soft skeletons from repeated min/max pooling) is picked up by every such backend
without any backend code (docs/plugins.md).

The operators (``kernel`` odd, stride 1, output the size of the input, padding that never wins):

``max_pool(x, kernel)``
    maximum over the kernel^d window around each voxel, over the spatial axes of (B, C, *S);
``min_pool(x, kernel)``
    minimum, likewise (``-max_pool(-x)``).

Tie-breaking of the gradient: the first maximum in the window's row-major order receives it,
as PyTorch's max pooling does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any


def _check_kernel(kernel: int) -> int:
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be a positive odd int, got {kernel!r}")
    return kernel


class ArrayOperators:
    """NumPy/CuPy operators (no gradient): sliding windows over the padded array."""

    def __init__(self, xp: Any):
        self.xp = xp

    def _windows(self, x: Array, kernel: int) -> tuple[Array, int]:
        xp = self.xp
        spatial = x.ndim - 2
        half = kernel // 2
        pad = [(0, 0), (0, 0)] + [(half, half)] * spatial
        padded = xp.pad(x, pad, mode="constant", constant_values=-xp.inf)
        module = np if xp.__name__.endswith("numpy") else __import__("cupy")
        view = module.lib.stride_tricks.sliding_window_view(padded, (kernel,) * spatial, axis=tuple(range(2, x.ndim)))
        return xp.reshape(view, (*x.shape, kernel**spatial)), spatial

    def argmax_pool(self, x: Array, kernel: int) -> tuple[Array, Array]:
        windows, _ = self._windows(x, _check_kernel(kernel))
        index = self.xp.argmax(windows, axis=-1)
        return self.xp.max(windows, axis=-1), index

    def max_pool(self, x: Array, kernel: int = 3) -> Array:
        return self.argmax_pool(x, kernel)[0]

    def min_pool(self, x: Array, kernel: int = 3) -> Array:
        return -self.max_pool(-x, kernel)


class TapeOperators:
    """The operators on the differentiating tape (:mod:`segloss_core.reference.autodiff`)."""

    def __init__(self, tape: Any):
        self.tape = tape
        self.raw = ArrayOperators(tape.xp)

    def max_pool(self, x: Any, kernel: int = 3) -> Any:
        from .reference.autodiff import Var

        xp = self.tape.xp
        value_in = x.value if isinstance(x, Var) else x
        value, index = self.raw.argmax_pool(value_in, kernel)
        shape = tuple(value_in.shape)
        spatial = len(shape) - 2
        half = kernel // 2
        offsets = np.stack(np.unravel_index(np.arange(kernel**spatial), (kernel,) * spatial), axis=-1)

        def vjp(g: Array) -> Array:
            # scatter each output's gradient to the input voxel that won its window
            grid = np.indices(shape[2:]).reshape(spatial, -1).T  # (S, spatial) output positions
            flat_index = np.asarray(xp.reshape(index, (shape[0] * shape[1], -1)))
            flat_g = np.asarray(xp.reshape(g, (shape[0] * shape[1], -1)))
            out = np.zeros((shape[0] * shape[1], *shape[2:]), dtype=flat_g.dtype)
            for volume in range(shape[0] * shape[1]):
                source = grid + offsets[flat_index[volume]] - half  # winner position, unpadded
                np.add.at(out[volume], tuple(source.T), flat_g[volume])
            return xp.asarray(out.reshape(shape))

        return self.tape._node(value, (x, vjp))

    def min_pool(self, x: Any, kernel: int = 3) -> Any:
        return -self.max_pool(-x, kernel)

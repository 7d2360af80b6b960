"""The NumPy reference backend: float64 value and analytic gradient w.r.t. the logits.

Registered through the ``segloss`` entry-point group like any plugin
(``numpy = "segloss_core.numpy_backend"``). It is the oracle of the conformance suite,
written for clarity (every intermediate is materialised), not speed.

>>> import numpy as np
>>> from segloss_core import get_loss
>>> loss = get_loss("dice", backend="numpy")
>>> logits = np.zeros((1, 2, 4, 4)); labels = np.zeros((1, 4, 4), dtype=np.int64)
>>> value, grad = loss.value_and_grad(logits, labels)
>>> round(float(value), 6), grad.shape
(0.666666, (1, 2, 4, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .backend import Backend
from .executor import TermWeights
from .hookspecs import hookimpl
from .reference.evaluate import TapeBackend, evaluate
from .spec import LossPlan


class NumpyLoss(TermWeights):
    """A loss on NumPy arrays; ``loss(pred, target, mask=None)`` returns a float64 array."""

    def __init__(self, plan: LossPlan):
        self._init_weights(plan)

    def __repr__(self) -> str:
        return f"NumpyLoss({self.plan.describe()})"

    def _check_arrays(self, **arrays: Any) -> None:
        for name, value in arrays.items():
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray for backend 'numpy', got {type(value).__name__}")

    def __call__(self, pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, **inputs: Any) -> Any:
        self._check_arrays(pred=pred, target=target, mask=mask)
        value, _ = evaluate(self.plan, pred, target, mask, inputs, with_grad=False, weights=self.term_weights)
        return value

    def value_and_grad(
        self,
        pred: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray | None = None,
        grad_output: np.ndarray | None = None,
        **inputs: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(value, d value / d pred), both float64.

        With ``reduction="none"`` pass ``grad_output`` (the value's shape): the gradient is
        then that of Σ grad_output·value, as ``torch.Tensor.backward(grad_output)``.
        """
        self._check_arrays(pred=pred, target=target, mask=mask)
        value, grad = evaluate(
            self.plan, pred, target, mask, inputs, with_grad=True, grad_output=grad_output, weights=self.term_weights
        )
        assert grad is not None
        return value, grad


class NumpyBackend(TapeBackend):
    name = "numpy"
    description = "float64 NumPy reference: value and analytic gradient (the conformance oracle)"

    @property
    def voxelwise_losses(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset()  # every voxelwise spec carries a NumPy reference: see supports()

    def build(self, plan: LossPlan, **options: Any) -> NumpyLoss:
        return NumpyLoss(plan)


@hookimpl
def segloss_register_backends(register: Callable[[Backend], None]) -> None:
    register(NumpyBackend())

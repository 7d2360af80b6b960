"""The CuPy backend: losses on CuPy arrays (current device and stream), value and gradient.

Statistics-based losses whose statistics the shared kernels cover (dice family, cross-entropy,
dice_ce, …) run on the fused kernels: one forward kernel, the formula differentiated by the
core's tape on (B, C) arrays, one backward kernel; so do the distance losses (their field
statistics Σ w·p·φ, Σ w·(p − g)²·F), with distance maps from the shared EDT kernels. Everything
else (focal, top-k, Lovász, array_forward plugins) runs the float64 reference math on the GPU
(CuPy arrays through the array API).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from segloss_core import ConformanceDtype, LossPlan
from segloss_core.arrays import get_namespace, is_cupy
from segloss_core.executor import TermWeights, required_statistics
from segloss_core.reference.evaluate import TapeBackend, TapeKernels, prepare_all, value_and_grad
from segloss_core.validation import PreparedInputs


class CupyLoss(TermWeights):
    """``loss(pred, target, mask=None, **inputs)`` → value; ``loss.value_and_grad(...)`` → (value, grad)."""

    def __init__(self, plan: LossPlan):
        self._init_weights(plan)
        from . import fused

        self._fused = not any(t.spec.kind == "voxelwise" for t in plan.terms) and all(
            fused.fusable(required_statistics(plan, act)) for act in plan.activations
        )

    def __repr__(self) -> str:
        return f"CupyLoss({self.plan.describe()}, {'fused kernels' if self._fused else 'reference math'})"

    def _check(self, **arrays: Any) -> None:
        import cupy

        for name, value in arrays.items():
            if value is not None and not isinstance(value, cupy.ndarray):
                raise TypeError(f"{name} must be a cupy.ndarray for backend 'cupy', got {type(value).__name__}")

    def __call__(self, pred: Any, target: Any, mask: Any = None, **inputs: Any) -> Any:
        return self._run(pred, target, mask, inputs, with_grad=False)[0]

    def value_and_grad(
        self, pred: Any, target: Any, mask: Any = None, grad_output: Any = None, **inputs: Any
    ) -> tuple[Any, Any]:
        """(value, d value / d pred); with ``reduction="none"`` pass ``grad_output`` (the value's
        shape) for the gradient of Σ grad_output·value."""
        return self._run(pred, target, mask, inputs, with_grad=True, grad_output=grad_output)

    def _run(
        self, pred: Any, target: Any, mask: Any, inputs: Mapping[str, Any], with_grad: bool, grad_output: Any = None
    ) -> tuple[Any, Any]:
        self._check(pred=pred, target=target, mask=mask)
        prepared = prepare_all(pred, target, mask, self.plan)
        per_class_mask = any(p.mask is not None and int(p.mask.shape[1]) != 1 for p in prepared.values())
        kernels_type = FusedKernels if self._fused and not per_class_mask else TapeKernels
        kernels = kernels_type(pred, with_grad=with_grad)
        return value_and_grad(self.plan, prepared, kernels, inputs, weights=self.term_weights, grad_output=grad_output)


class FusedKernels(TapeKernels):
    """Statistics from the shared kernels: one forward kernel for all of them, recorded on the
    tape with the backward kernel as their VJP (the formulas run on (B, C) arrays)."""

    def statistics(self, prepared: PreparedInputs, names: frozenset[str]) -> Mapping[str, Any]:
        from . import fused

        stats, canonical = fused.forward(prepared, names)
        shape = tuple(prepared.pred.shape)
        node = self.namespace.external(stats, self.pred, lambda g: fused.backward(canonical, g).reshape(shape))
        return {name: node[:, :, fused.slot(name)] for name in names}


class CupyBackend(TapeBackend):
    name = "cupy"
    description = "CuPy arrays on the current CUDA device: value and gradient w.r.t. the logits (shared kernels)"
    conformance_dtypes = (
        ConformanceDtype("float64", 1e-7, 1e-9),
        ConformanceDtype("float32", 2e-4, 2e-5),
        ConformanceDtype("float16", 2e-2, 5e-3),
    )

    def availability(self) -> str | None:
        try:
            import cupy
        except Exception as exc:  # noqa: BLE001
            return f"cupy cannot be imported ({type(exc).__name__}: {exc}); pip install 'segloss-registry[cupy]'"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001
            return f"no usable CUDA device ({type(exc).__name__}: {exc})"
        return None if count > 0 else "no CUDA device"

    def distance_maps_for(self, array: Any) -> Any | None:
        """CuPy arrays get :mod:`segloss_cupy.distance_maps` (the shared EDT kernels) where it imports."""
        if not is_cupy(get_namespace(array)):
            return None
        try:
            from . import distance_maps
        except ImportError:  # no kernels here: the core's cupyx reference runs
            return None
        return distance_maps

    def status(self) -> Mapping[str, str]:
        import cupy

        from . import kernels

        return {"cupy": cupy.__version__, "kernels": f"NVRTC, source hash {kernels.source_hash()}"}

    def prebuild(self) -> str | None:
        from . import kernels

        try:
            for dtype in kernels.DTYPES:
                kernels.functions(kernels.region_names(dtype, "int64"))
            kernels.functions(kernels.edt_names("int64"))
        except Exception as exc:  # noqa: BLE001
            return f"kernels NOT compiled: {type(exc).__name__}: {exc}"
        return f"kernels compiled with NVRTC (source hash {kernels.source_hash()})"

    def build(self, plan: LossPlan, **options: Any) -> CupyLoss:
        return CupyLoss(plan)

    def to_array(self, array: np.ndarray) -> Any:
        import cupy

        return cupy.asarray(array)

    def to_numpy(self, array: Any) -> np.ndarray:
        import cupy

        return cupy.asnumpy(array)

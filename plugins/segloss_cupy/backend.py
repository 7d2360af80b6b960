"""CuPy backend: the float64 reference math on CuPy arrays (kernels arrive with csrc)."""

from __future__ import annotations

from typing import Any

from segloss_core import Backend, LossPlan


class CupyBackend(Backend):
    name = "cupy"
    description = "CuPy arrays on the current CUDA device: value and gradient w.r.t. the logits"

    def availability(self) -> str | None:
        try:
            import cupy
        except Exception as exc:  # noqa: BLE001
            return f"cupy cannot be imported ({type(exc).__name__}: {exc}); pip install 'segloss[cupy]'"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001
            return f"no CUDA device ({type(exc).__name__}: {exc})"
        return None if count > 0 else "no CUDA device"

    def supports(self, spec: Any) -> bool:
        return spec.kind != "voxelwise" or spec.reference is not None

    def build(self, plan: LossPlan, **options: Any) -> Any:
        from segloss_core.numpy_backend import NumpyLoss

        return NumpyLoss(plan)

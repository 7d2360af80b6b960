"""The JAX backend object: what it supports, whether it can run, and how it builds a loss.

Nothing here imports JAX at module level: registration (``plugin.py``) must stay cheap, and
``segloss backends`` must list the backend as *unavailable, with the reason* where JAX is
missing rather than fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from segloss_core import API_VERSION, Backend, ConformanceDtype, LossPlan, LossSpec, Param, registry


def x64(enabled: bool) -> AbstractContextManager[Any]:
    """JAX's 64-bit mode for the ``with`` block only (thread-local; the global flag is untouched)."""
    if not enabled:
        return nullcontext()
    import jax

    manager = getattr(jax, "enable_x64", None)
    if manager is None:  # JAX < 0.6
        from jax.experimental import enable_x64 as manager  # type: ignore[no-redef]
    return manager(True)


class JaxBackend(Backend):
    name = "jax"
    description = "JAX: the core's array-API formulas on jax.numpy, jit-compiled, differentiated by jax.vjp"
    api_version = API_VERSION
    operators = True  # max_pool/min_pool with jax.lax.reduce_window: array_forward losses (clDice) run here
    conformance_dtypes = (
        ConformanceDtype("float64", 1e-7, 1e-9),
        ConformanceDtype("float32", 2e-4, 2e-5),
    )
    options = (
        Param(
            "jit",
            "bool",
            True,
            "jax.jit the loss (False: run op by op, with Python tracebacks, for debugging)",
        ),
    )

    def availability(self) -> str | None:
        try:
            import jax  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "not here", with the reason
            return f"jax cannot be imported ({type(exc).__name__}: {exc}); pip install jax"
        return None

    def supports(self, spec: LossSpec) -> bool:
        if spec.kind == "compound":
            reg = registry()
            return all(self.supports(reg.loss(term.loss)) for term in spec.terms)
        if spec.kind == "voxelwise":
            return spec.array_forward is not None  # topk_ce, lovasz_softmax: no JAX implementation here
        # statistics losses, those of a per-voxel field included: the core computes their distance maps (no
        # JAX kernels: the scipy reference on a host copy, see segloss_core.distance_maps)
        return True

    def build(self, plan: LossPlan, **options: Any) -> Any:
        from .loss import JaxLoss

        return JaxLoss(plan, jit=options.get("jit", True))

    def status(self) -> Mapping[str, str]:
        import jax

        return {
            "jax": jax.__version__,
            "devices": ", ".join(str(d) for d in jax.devices()),
            "x64": "enabled" if jax.config.jax_enable_x64 else "disabled (float64 needs jax_enable_x64)",
        }

    def run_for_conformance(
        self,
        loss: Any,
        pred: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray | None,
        dtype: str,
        inputs: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        import jax.numpy as jnp

        # float64 exists in JAX only in 64-bit mode: switch it on for this call only
        with x64(dtype == "float64"):
            x = jnp.asarray(pred, dtype=jnp.dtype(dtype))
            t = jnp.asarray(target) if target.dtype.kind in "iub" else jnp.asarray(target, dtype=jnp.dtype(dtype))
            m = None if mask is None else jnp.asarray(mask, dtype=jnp.dtype(dtype))
            extra = {name: jnp.asarray(a) for name, a in (inputs or {}).items()}
            value, grad = loss.value_and_grad(x, t, m, grad_output="ones", **extra)
            return np.asarray(value, dtype=np.float64), np.asarray(grad, dtype=np.float64)

"""The PyTorch backend object: availability, options, conformance adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from segloss_core import Backend, ConformanceDtype, LossPlan, Param
from segloss_core.arrays import get_namespace, is_torch

IMPL = Param(
    "impl",
    "choice",
    "auto",
    "statistics implementation: native (plain torch ops, autograd), fused (C++/CUDA kernels: one read of the "
    "logits forward, one read + one gradient write backward), auto (fused when built and applicable)",
    choices=("auto", "native", "fused"),
)

DISTRIBUTED = Param(
    "distributed",
    "bool",
    False,
    "share the statistics of all ranks (torch.distributed): the loss of the global batch, exactly; "
    "see docs/distributed.md",
)
PROCESS_GROUP = Param(
    "process_group",
    "object",
    None,
    "torch.distributed process group to share statistics over (None: the default group), as SyncBatchNorm",
    optional=True,
)

VOXELWISE_LOSSES = frozenset({"topk_ce", "lovasz_softmax"})


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch nn.Module losses (CPU and CUDA; float16/bfloat16 accumulated in float32)"
    options = (IMPL, DISTRIBUTED, PROCESS_GROUP)
    voxelwise_losses = VOXELWISE_LOSSES
    operators = True
    conformance_dtypes = (
        ConformanceDtype("float64", 1e-7, 1e-9),
        ConformanceDtype("float32", 2e-4, 2e-5),
        ConformanceDtype("float16", 1e-2, 2e-3),
        ConformanceDtype("bfloat16", 5e-2, 2e-2),
    )

    def availability(self) -> str | None:
        try:
            import torch  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
            return f"torch cannot be imported ({type(exc).__name__}: {exc}); pip install 'segloss-registry[torch]'"
        return None

    def status(self) -> Mapping[str, str]:
        import torch

        from . import fused

        info = {"torch": torch.__version__, "fused": fused.status_line(), **fused.status_lines()}
        info["cuda"] = "available" if torch.cuda.is_available() else "not available"
        return info

    def distance_maps_for(self, array: Any) -> Any | None:
        """Torch tensors get :mod:`segloss_torch.distance_maps` (the EDT ops on the tensor's device)."""
        if not is_torch(get_namespace(array)):
            return None
        from . import distance_maps

        return distance_maps

    def prebuild(self) -> str | None:
        from . import build

        state = build.load(verbose=True)
        parts = []
        if state.loaded:
            parts.append(f"fused kernels built for CPU in {state.seconds:.1f} s: {state.library}")
        else:
            parts.append(f"fused kernels NOT built for CPU: {state.error}; the native implementation will be used")
        if state.with_cuda:
            arch = f", arch list {state.arch_list}" if state.arch_list and state.cuda_path == "nvcc" else ""
            where = state.cuda_library if state.cuda_path == "nvcc" else "kernels compiled with NVRTC at run time"
            parts.append(f"CUDA through {state.cuda_path}{arch}: {where}")
        else:
            parts.append(f"CUDA: {state.cuda_error}")
        return "; ".join(parts)

    def build(self, plan: LossPlan, **options: Any) -> Any:
        from .module import SeglossLoss

        return SeglossLoss(
            plan,
            impl=options.get("impl", "auto"),
            distributed=options.get("distributed", False),
            process_group=options.get("process_group"),
        )

    def run_for_conformance(
        self,
        loss: Any,
        pred: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray | None,
        dtype: str,
        inputs: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return _value_and_grad(loss, pred, target, mask, dtype, inputs)

    def run_on_mismatched_devices(
        self, loss: Any, pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None, dtype: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """pred on the conformance device, target (and mask) on ``meta``: a second device every
        machine has, so the contract's device check is exercised without two GPUs."""
        return _value_and_grad(loss, pred, target, mask, dtype, None, target_device="meta")


def _value_and_grad(
    loss: Any,
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None,
    dtype: str,
    inputs: Mapping[str, np.ndarray] | None,
    target_device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The loss's value and d value / d pred as float64 NumPy arrays; pred (cast to ``dtype``) on the
    conformance device, target and mask there too or on ``target_device``."""
    import torch

    device = "cuda" if torch.cuda.is_available() and _conformance_on_cuda() else "cpu"
    other = target_device or device
    torch_dtype = getattr(torch, dtype)
    x = torch.tensor(pred, dtype=torch_dtype, device=device, requires_grad=True)
    y = torch.from_numpy(np.ascontiguousarray(target)).to(other)
    if y.is_floating_point():
        y = y.to(torch_dtype)
    m = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).to(other)
    extra = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in (inputs or {}).items()}
    value = loss(x, y, m, **extra)
    value.sum().backward()  # reduction="none": the gradient of the sum, as the reference
    assert x.grad is not None
    return value.detach().double().cpu().numpy(), x.grad.double().cpu().numpy()


def _conformance_on_cuda() -> bool:
    import os

    return os.environ.get("SEGLOSS_CONFORMANCE_DEVICE", "cpu") == "cuda"

"""CuPy backend of segloss: the same losses and distance maps on CuPy arrays, from the same kernels.

``get_loss(name, backend="cupy")`` returns a loss with ``loss(pred, target)`` (the value) and
``loss.value_and_grad(pred, target)`` (value and d value / d logits), CuPy arrays on the current
device and stream. Zero-copy interop with PyTorch through DLPack::

    import cupy, torch
    from segloss_core import get_loss
    logits = torch.randn(2, 4, 64, 64, 64, device="cuda")
    labels = torch.randint(0, 4, (2, 64, 64, 64), device="cuda")
    loss = get_loss("dice_ce", backend="cupy")
    value, grad = loss.value_and_grad(cupy.from_dlpack(logits), cupy.from_dlpack(labels))
    grad_torch = torch.from_dlpack(grad)          # same memory, no copy

On a machine without CUDA or CuPy this package imports fine and the backend is listed as
unavailable, with the reason (``segloss backends``).
"""

from __future__ import annotations

__all__ = [
    "distance_map",
    "from_dlpack",
    "mask_distance_map",
    "signed_distance_map",
    "to_dlpack",
    "use_torch_allocator",
]


def __getattr__(name: str):  # lazy: importing segloss_cupy must not import cupy
    if name in ("signed_distance_map", "distance_map", "mask_distance_map"):
        from . import distance_maps

        return getattr(distance_maps, name)
    raise AttributeError(name)


def from_dlpack(tensor):
    """A CuPy view of any DLPack tensor (e.g. a torch CUDA tensor), without a copy."""
    import cupy

    return cupy.from_dlpack(tensor)


def to_dlpack(array):
    """A torch tensor sharing ``array``'s memory (``torch.from_dlpack``), without a copy."""
    import torch

    return torch.from_dlpack(array)


def use_torch_allocator() -> None:
    """Make CuPy allocate through torch's CUDA caching allocator (one memory pool for both).

    Mixing torch and CuPy otherwise keeps two caching pools on one GPU, each holding memory the
    other cannot use; through one pool ``torch.cuda.max_memory_allocated`` also counts CuPy's
    allocations (how the benchmarks measure the CuPy backend's memory).
    """
    import cupy
    import torch

    allocator = cupy.cuda.PythonFunctionAllocator(
        lambda size, device: torch.cuda.caching_allocator_alloc(size, device),
        lambda pointer, device: torch.cuda.caching_allocator_delete(pointer),
    )
    cupy.cuda.set_allocator(allocator.malloc)

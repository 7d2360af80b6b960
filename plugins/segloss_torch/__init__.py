"""PyTorch backend of segloss: ``nn.Module`` losses, native torch ops or fused C++/CUDA kernels.

>>> import torch
>>> from segloss_core import get_loss
>>> loss = get_loss("dice", backend="torch", preset="nnunet")
>>> logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
>>> labels = torch.zeros(1, 4, 4, dtype=torch.long)
>>> labels[:, :2] = 1
>>> round(loss(logits, labels).item(), 4)
-0.2
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .deep_supervision import DeepSupervisionLoss
    from .distance_maps import distance_map, mask_distance_map, signed_distance_map
    from .module import SeglossLoss

__all__ = ["DeepSupervisionLoss", "SeglossLoss", "distance_map", "mask_distance_map", "signed_distance_map"]

_HOMES = {
    "DeepSupervisionLoss": "deep_supervision",
    "SeglossLoss": "module",
    "distance_map": "distance_maps",
    "mask_distance_map": "distance_maps",
    "signed_distance_map": "distance_maps",
}


def __getattr__(name: str) -> Any:
    """Lazy exports: the entry point (``segloss_torch.plugin``) imports this package when the registry
    loads, and registering must not import torch (``segloss_core.hookspecs``); the first use does."""
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

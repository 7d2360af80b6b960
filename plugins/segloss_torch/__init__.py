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

from .deep_supervision import DeepSupervisionLoss
from .distance_maps import distance_map, mask_distance_map, signed_distance_map
from .module import SeglossLoss

__all__ = ["DeepSupervisionLoss", "SeglossLoss", "distance_map", "mask_distance_map", "signed_distance_map"]

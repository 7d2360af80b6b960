"""Deep supervision: one loss applied to every decoder output, weighted."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segloss_core.deep_supervision import deep_supervision_weights


class DeepSupervisionLoss(nn.Module):
    """Σ_i w_i · loss(outputs[i], targets[i]).

    ``outputs``: list of logits, highest resolution first. ``target``: one full-resolution
    target (integer labels or one-hot), resized to each output with nearest-exact
    interpolation (MONAI; nnU-Net downsamples in its data loader the same way), or a list
    of targets, one per output. ``weights``: ``"nnunet"`` (1/2^i, lowest 0, normalised),
    ``"exp"``, ``"same"``, ``"two"`` (MONAI modes) or explicit numbers.

    >>> from segloss_core import get_loss
    >>> ds = DeepSupervisionLoss(get_loss("dice_ce", backend="torch", preset="nnunet"), weights="nnunet")
    >>> outs = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    >>> float(ds(outs, torch.randint(0, 3, (1, 8, 8)))) != 0
    True
    """

    def __init__(self, loss: nn.Module, weights: str | Sequence[float] = "nnunet"):
        super().__init__()
        self.loss = loss
        self.weights = weights

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor], mask=None):
        if isinstance(outputs, torch.Tensor) or not outputs:
            raise TypeError("outputs must be a non-empty list of tensors, highest resolution first")
        weights = deep_supervision_weights(len(outputs), self.weights)
        targets = list(target) if isinstance(target, (list, tuple)) else [resize_target(target, o) for o in outputs]
        if len(targets) != len(outputs):
            raise ValueError(f"got {len(targets)} targets for {len(outputs)} outputs")
        masks = [None] * len(outputs) if mask is None else [resize_target(mask, o) for o in outputs]
        total = None
        for w, out, tgt, m in zip(weights, outputs, targets, masks, strict=True):
            if w == 0:
                continue
            value = w * self.loss(out, tgt, m)
            total = value if total is None else total + value
        return total


def resize_target(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``target`` resized to ``output``'s spatial size with nearest-exact interpolation."""
    spatial = tuple(output.shape[2:])
    has_channel = target.ndim == output.ndim
    if tuple(target.shape[-len(spatial) :]) == spatial:
        return target
    x = target if has_channel else target.unsqueeze(1)
    resized = F.interpolate(
        x.to(torch.float32 if not x.is_floating_point() else x.dtype), size=spatial, mode="nearest-exact"
    )
    resized = resized.to(target.dtype)
    return resized if has_channel else resized.squeeze(1)

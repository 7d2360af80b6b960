"""The voxelwise losses (those not computed from statistics) on torch tensors.

``topk_ce`` and ``lovasz_softmax`` run the core's one array-API definition of each under
autograd (vectorised over classes and images); ``array_forward`` losses get :class:`TorchOperators`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat.torch as xp_torch
import torch
import torch.nn.functional as F

from segloss_core.losses.voxelwise import lovasz_softmax_value, topk_ce_value, voxel_mask_required
from segloss_core.spec import Params
from segloss_core.statistics import Voxel
from segloss_core.validation import PreparedInputs

from .native import accumulation_dtype, target_and_weights

VoxelwiseFn = Callable[[PreparedInputs, Params, Mapping[str, Any]], torch.Tensor]


def _probabilities(prepared: PreparedInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(p, log p) of shape (B, C, N) in the accumulation dtype (log p only for softmax)."""
    pred = prepared.pred
    dtype = accumulation_dtype(pred.dtype)
    z = pred.reshape(prepared.batch_size, prepared.num_classes, -1).to(dtype)
    if prepared.activation == "softmax":
        log_p = torch.log_softmax(z, dim=1)
        return log_p.exp(), log_p
    if prepared.activation == "sigmoid":
        return torch.sigmoid(z), None
    return z, None


def _voxel(prepared: PreparedInputs) -> tuple[Voxel, torch.Tensor]:
    """(p, log p, g) (B, C, N) and the voxel weights (B, 1, N) of a voxelwise loss."""
    p, log_p = _probabilities(prepared)
    if log_p is None:
        log_p = torch.log(p)
    g, w = target_and_weights(prepared, p.dtype)
    if w is None:
        w = torch.ones_like(p[:, :1])
    return Voxel(p=p, g=g, log_p=log_p), w


def _largest(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x, k, sorted=False).indices


def topk_ce(prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any]) -> torch.Tensor:
    """segloss_core.losses.voxelwise.topk_ce_value under autograd, with torch.topk's selection."""
    voxel_mask_required(prepared, "topk_ce")
    v, w = _voxel(prepared)
    return topk_ce_value(xp_torch, v, w, params, _largest)


def lovasz_softmax(prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any]) -> torch.Tensor:
    """segloss_core.losses.voxelwise.lovasz_softmax_value under autograd."""
    voxel_mask_required(prepared, "lovasz_softmax")
    v, w = _voxel(prepared)
    return lovasz_softmax_value(xp_torch, v, w, params)


IMPLEMENTATIONS: dict[str, VoxelwiseFn] = {"topk_ce": topk_ce, "lovasz_softmax": lovasz_softmax}


class TorchOperators:
    """segloss_core.operators on torch tensors (B, C, *S): max pooling with −inf padding."""

    @staticmethod
    def max_pool(x: torch.Tensor, kernel: int = 3) -> torch.Tensor:
        pool = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}[x.dim()]
        return pool(x, kernel, stride=1, padding=kernel // 2)

    @staticmethod
    def min_pool(x: torch.Tensor, kernel: int = 3) -> torch.Tensor:
        return -TorchOperators.max_pool(-x, kernel)


def evaluate(spec: Any, prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any]) -> torch.Tensor:
    """topk_ce and lovasz_softmax; other voxelwise losses are array_forward ones (the executor's)."""
    return IMPLEMENTATIONS[spec.name](prepared, params, inputs)


def voxels(prepared: PreparedInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, g, w) of ``array_forward`` losses, in the accumulation dtype (w all ones when absent)."""
    p, _ = _probabilities(prepared)
    g, w = target_and_weights(prepared, p.dtype)
    return p, g, torch.ones_like(p[:, :1]) if w is None else w

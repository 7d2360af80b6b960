"""Torch implementations of the voxelwise losses (those not computed from statistics).

Both are vectorised over classes (and images): no Python loop over voxels or classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from segloss_core.losses.formula import included_classes
from segloss_core.losses.voxelwise import topk_count, voxel_mask_required
from segloss_core.spec import Params
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


def topk_ce(prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any]) -> torch.Tensor:
    voxel_mask_required(prepared, "topk_ce")
    p, log_p = _probabilities(prepared)
    if log_p is None:
        log_p = torch.log(p)
    g, w = target_and_weights(prepared, p.dtype)
    weighted_g = g
    if params.class_weights is not None:
        cw = torch.tensor(params.class_weights, dtype=p.dtype, device=p.device).view(1, -1, 1)
        weighted_g = g * cw
    ce = -torch.where(weighted_g == 0, torch.zeros_like(log_p), weighted_g * log_p).sum(1)  # (B, N)
    if w is not None:
        weight = w[:, 0].expand_as(ce)
        ce = torch.where(weight == 0, torch.zeros_like(ce), ce * weight)
        pool = ce.reshape(-1) if params.pool == "all" else ce.reshape(-1)[weight.reshape(-1) > 0]
    else:
        pool = ce.reshape(-1)
    if pool.numel() == 0:
        return (prepared.pred.sum() * 0).to(p.dtype)
    k = topk_count(int(pool.numel()), params.k)
    selected = torch.topk(pool, k, sorted=False).values
    return selected.mean() if params.reduction == "mean" else selected.sum()


def lovasz_softmax(prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any]) -> torch.Tensor:
    voxel_mask_required(prepared, "lovasz_softmax")
    p, _ = _probabilities(prepared)
    g, w = target_and_weights(prepared, p.dtype)
    batch, channels, n = p.shape
    columns = included_classes(params, channels)
    index = torch.tensor(columns, device=p.device)
    p, g = p.index_select(1, index), g.index_select(1, index)
    valid = torch.ones(batch, n, dtype=torch.bool, device=p.device) if w is None else (w[:, 0] > 0).expand(batch, n)
    if params.per_image:
        errors = (g - p).abs()  # (B, K, N)
        truth = g
        keep = valid.unsqueeze(1).expand_as(errors)
    else:  # one pooled "image": (1, K, B·N)
        errors = (g - p).abs().permute(1, 0, 2).reshape(1, len(columns), -1)
        truth = g.permute(1, 0, 2).reshape(1, len(columns), -1)
        keep = valid.reshape(1, 1, -1).expand_as(errors)
    # invalid voxels: error 0 and no truth, sorted last, so they change nothing
    errors = torch.where(keep, errors, torch.zeros_like(errors))
    truth = torch.where(keep, truth, torch.zeros_like(truth))
    sorted_errors, order = torch.sort(errors, dim=-1, descending=True, stable=True)
    sorted_truth = truth.gather(-1, order)
    total = sorted_truth.sum(-1, keepdim=True)
    valid_sorted = keep.gather(-1, order).to(p.dtype)
    intersection = total - sorted_truth.cumsum(-1)
    union = total + ((1 - sorted_truth) * valid_sorted).cumsum(-1)
    jaccard = 1 - intersection / union.clamp_min(torch.finfo(p.dtype).tiny)
    gradient = torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)
    per_class = (sorted_errors * gradient.detach()).sum(-1)  # (images, K)
    counted = (total[..., 0] > 0) if params.present_only else keep.any(-1)
    counted = counted & keep.any(-1)
    n_counted = counted.sum(-1)
    per_image = torch.where(counted, per_class, torch.zeros_like(per_class)).sum(-1) / n_counted.clamp_min(1)
    return per_image.mean()


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


def array_forward(spec: Any, prepared: PreparedInputs, params: Params) -> torch.Tensor:
    """A loss defined by ``spec.array_forward`` (array-API code plus operators), under autograd."""
    import array_api_compat.torch as xp

    p, _ = _probabilities(prepared)
    g, w = target_and_weights(prepared, p.dtype)
    shape = tuple(prepared.pred.shape)
    if w is None:
        w = torch.ones_like(p[:, :1])
    w = w.reshape(w.shape[0], w.shape[1], *shape[2:]).expand(shape[0], w.shape[1], *shape[2:])
    return spec.array_forward(xp, TorchOperators, p.reshape(shape), g.reshape(shape), w, params)


def evaluate(spec: Any, prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any]) -> torch.Tensor:
    if spec.name in IMPLEMENTATIONS:
        return IMPLEMENTATIONS[spec.name](prepared, params, inputs)
    return array_forward(spec, prepared, params)

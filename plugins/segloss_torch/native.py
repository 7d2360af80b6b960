"""Native statistics: plain torch ops with autograd (the fallback when no fused kernel runs).

Accumulates in float32 for float16/bfloat16 inputs (float64 stays float64), builds the
one-hot target under ``no_grad`` in the accumulation dtype with the voxel weights folded
in, and never indexes with an ignored label (ignored voxels get class 0 before one-hot and
weight 0). Memory: about three copies of the logits (activation, its saved output, the
weighted one-hot), which is what the fused path avoids.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from segloss_core import statistics as stat_names
from segloss_core.validation import PreparedInputs


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _neg_xlogy(x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """−x·log y with 0 where x == 0 (no 0·inf NaN from ignored or absent voxels)."""
    return -torch.where(x == 0, torch.zeros_like(log_y), x * log_y)


def _field(prepared: PreparedInputs, name: str, like: torch.Tensor) -> torch.Tensor:
    if not prepared.fields or name not in prepared.fields:
        raise ValueError(f"statistic needs the field {name!r}, which the loss did not provide")
    return prepared.fields[name].detach().reshape(like.shape).to(like.dtype)


def target_and_weights(prepared: PreparedInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g, w): target (B, C, N) and voxel weights (B|1, 1|C, N) or None, without gradient."""
    batch, channels = prepared.batch_size, prepared.num_classes
    with torch.no_grad():
        weight = None
        if prepared.labels is not None:
            labels = prepared.labels.reshape(batch, -1)
            if prepared.ignore_index is not None:
                keep = labels != prepared.ignore_index
                weight = keep.to(dtype).unsqueeze(1)
                labels = torch.where(keep, labels, torch.zeros_like(labels))
            if channels == 1 and prepared.activation != "softmax":
                g = (labels == 1).to(dtype).unsqueeze(1)
            else:
                g = F.one_hot(labels.long(), channels).to(dtype).permute(0, 2, 1)
        else:
            g = prepared.target.reshape(batch, channels, -1).to(dtype)
        if prepared.mask is not None:
            mask = prepared.mask.to(dtype)
            mask = mask.reshape(mask.shape[0], mask.shape[1], -1)
            weight = mask if weight is None else weight * mask
    return g, weight


def compute_statistics(prepared: PreparedInputs, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The requested statistics, each (B, C) in the accumulation dtype, differentiable."""
    names = set(names)
    pred = prepared.pred
    batch, channels = prepared.batch_size, prepared.num_classes
    dtype = accumulation_dtype(pred.dtype)
    z = pred.reshape(batch, channels, -1).to(dtype)
    g, w = target_and_weights(prepared, dtype)
    gw = g if w is None else g * w

    activation = prepared.activation
    bases = {stat_names.parse(n)[0] for n in names}
    needs_log = bases & {"ce_pos", "ce_neg", "neg_log_pred_sum", "focal_pos", "focal_neg"}
    log_p = log_1mp = None
    if activation == "softmax":
        p = torch.softmax(z, dim=1)
        if needs_log:
            log_p = torch.log_softmax(z, dim=1)
    elif activation == "sigmoid":
        p = torch.sigmoid(z)
        if needs_log:
            log_p = F.logsigmoid(z)
            log_1mp = F.logsigmoid(-z)
    else:
        p = z
        if needs_log:
            log_p = torch.log(p)
            log_1mp = torch.log1p(-p)

    def weighted_sum(term: torch.Tensor) -> torch.Tensor:
        if w is None:
            return term.sum(-1)
        return torch.where(w == 0, torch.zeros_like(term), term * w).sum(-1)

    out: dict[str, torch.Tensor] = {}
    for name in names:
        base, gamma = stat_names.parse(name)
        if base == "intersection":
            value = (p * gw).sum(-1)
        elif base == "pred_sum":
            value = weighted_sum(p)
        elif base == "target_sum":
            value = gw.sum(-1)
        elif base == "pred_sq_sum":
            value = weighted_sum(p * p)
        elif base == "target_sq_sum":
            value = (g * gw).sum(-1)
        elif base == "abs_diff_sum":
            value = weighted_sum((p - g).abs())
        elif base == "count":
            value = (torch.ones_like(p[:, :1]) if w is None else w).sum(-1).expand(batch, channels)
        elif base == "ce_pos":
            value = _neg_xlogy(gw, log_p).sum(-1)
        elif base == "ce_neg":
            value = weighted_sum(_neg_xlogy(1 - g, log_1mp))
        elif base == "neg_log_pred_sum":
            value = weighted_sum(-log_p)
        elif base == "focal_pos":
            value = _neg_xlogy(gw * (1 - p).pow(gamma), log_p).sum(-1)
        elif base == "focal_neg":
            value = weighted_sum(_neg_xlogy((1 - g) * p.pow(gamma), log_1mp))
        elif base == "field_pred_sum":
            value = weighted_sum(p * _field(prepared, gamma, p))
        elif base == "field_sq_err_sum":
            value = weighted_sum((p - g).square() * _field(prepared, gamma, p))
        else:  # pragma: no cover - parse() rejects unknown names
            raise AssertionError(name)
        out[name] = value
    return out

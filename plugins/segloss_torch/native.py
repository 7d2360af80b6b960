"""Native statistics: plain torch ops with autograd (the fallback when no fused kernel runs).

Accumulates in float32 for float16/bfloat16 inputs (float64 stays float64). Integer labels
take a sparse path: the target-side statistics are gathered at each voxel's label (no one-hot
is built) and ignored voxels get class 0 with weight 0, so no kernel ever indexes with an
ignored label; float (one-hot or soft) targets are used as given. Memory: the activation, its
saved output and autograd's intermediates, about 3–5 copies of the logits beyond the gradient
(docs/benchmarks.md), which is what the fused path avoids.
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
            if weight is not None:
                g = g * weight  # ignored voxels belong to no class, as in the reference
        else:
            g = prepared.target.reshape(batch, channels, -1).to(dtype)
        if prepared.mask is not None:
            mask = prepared.mask.to(dtype)
            mask = mask.reshape(mask.shape[0], mask.shape[1], -1)
            weight = mask if weight is None else weight * mask
    return g, weight


SPARSE = frozenset(
    {
        "intersection",
        "pred_sum",
        "target_sum",
        "pred_sq_sum",
        "target_sq_sum",
        "abs_diff_sum",
        "count",
        "ce_pos",
        "neg_log_pred_sum",
        "focal_pos",
    }
)


def _per_class(values: torch.Tensor, labels: torch.Tensor, channels: int) -> torch.Tensor:
    """Σ over voxels of ``values`` (B, N) into the class of each voxel: (B, C)."""
    out = values.new_zeros(values.shape[0], channels)
    return out.scatter_add(1, labels, values)


def _sparse_statistics(prepared: PreparedInputs, names: set[str]) -> dict[str, torch.Tensor]:
    """Integer labels with softmax (or probabilities): the one-hot is never built. Class sums are
    gathers and scatter-adds of (B, N) tensors; memory is the activation (and log-activation)."""
    batch, channels = prepared.batch_size, prepared.num_classes
    dtype = accumulation_dtype(prepared.pred.dtype)
    z = prepared.pred.reshape(batch, channels, -1).to(dtype)
    with torch.no_grad():
        labels = prepared.labels.reshape(batch, -1).long()
        w = torch.ones(labels.shape, dtype=dtype, device=labels.device)
        if prepared.ignore_index is not None:
            keep = labels != prepared.ignore_index
            w = keep.to(dtype)
            labels = torch.where(keep, labels, torch.zeros_like(labels))
        if prepared.mask is not None:
            w = w * prepared.mask.reshape(prepared.mask.shape[0], -1).to(dtype)
        index = labels.unsqueeze(1)
    bases = {stat_names.parse(n)[0]: n for n in names}
    needs_log = bool(set(bases) & {"ce_pos", "neg_log_pred_sum", "focal_pos"})
    if prepared.activation == "softmax":
        log_p = torch.log_softmax(z, dim=1) if needs_log else None
        p = log_p.exp() if log_p is not None else torch.softmax(z, dim=1)
    else:
        p = z
        log_p = torch.log(p) if needs_log else None
    p_y = p.gather(1, index).squeeze(1)  # (B, N)
    out: dict[str, torch.Tensor] = {}
    intersection = target_sum = None
    if set(bases) & {"intersection", "abs_diff_sum"}:
        intersection = _per_class(p_y * w, labels, channels)
    if set(bases) & {"target_sum", "target_sq_sum", "abs_diff_sum"}:
        target_sum = _per_class(w.expand_as(p_y), labels, channels)
    pred_sum = None
    if set(bases) & {"pred_sum", "abs_diff_sum"}:
        pred_sum = torch.einsum("bcn,bn->bc", p, w)
    for base, name in bases.items():
        if base == "intersection":
            out[name] = intersection
        elif base == "pred_sum":
            out[name] = pred_sum
        elif base in ("target_sum", "target_sq_sum"):
            out[name] = target_sum
        elif base == "pred_sq_sum":
            out[name] = torch.einsum("bcn,bcn,bn->bc", p, p, w)
        elif base == "abs_diff_sum":  # |p − g| summed: P + G − 2I for a one-hot g and p in [0, 1]
            out[name] = pred_sum + target_sum - 2 * intersection
        elif base == "count":
            out[name] = w.sum(-1, keepdim=True).expand(batch, channels)
        elif base == "ce_pos":
            log_p_y = log_p.gather(1, index).squeeze(1)
            out[name] = _per_class(-torch.where(w == 0, torch.zeros_like(log_p_y), log_p_y * w), labels, channels)
        elif base == "neg_log_pred_sum":
            out[name] = -torch.einsum("bcn,bn->bc", torch.where(w.unsqueeze(1) == 0, 0.0, log_p), w)
        elif base == "focal_pos":
            gamma = stat_names.parse(name)[1]
            log_p_y = log_p.gather(1, index).squeeze(1)
            term = (1 - p_y).pow(gamma) * log_p_y
            out[name] = _per_class(-torch.where(w == 0, torch.zeros_like(term), term * w), labels, channels)
    return out


def compute_statistics(prepared: PreparedInputs, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The requested statistics, each (B, C) in the accumulation dtype, differentiable."""
    names = set(names)
    if (
        prepared.labels is not None
        and prepared.activation != "sigmoid"
        and prepared.num_classes > 1
        and (prepared.mask is None or int(prepared.mask.shape[1]) == 1)
        and {stat_names.parse(n)[0] for n in names} <= SPARSE
        and not (prepared.pred.is_cuda and torch.are_deterministic_algorithms_enabled())
    ):
        return _sparse_statistics(prepared, names)
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

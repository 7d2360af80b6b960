"""Native statistics: plain torch ops with autograd (the fallback when no fused kernel runs).

Accumulates in float32 for float16/bfloat16 inputs (float64 stays float64). Integer labels
take a sparse path: the target-side statistics are gathered at each voxel's label (no one-hot
is built) and ignored voxels get class 0 with weight 0, so no kernel ever indexes with an
ignored label; float (one-hot or soft) targets are used as given. Memory: the activation, its
saved output and autograd's intermediates, about 3–5 copies of the logits beyond the gradient
(docs/benchmarks.md), which is what the fused path avoids.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import array_api_compat.torch as xp_torch
import torch
import torch.nn.functional as F

from segloss_core import regions as regions_module
from segloss_core import statistics as stat_names
from segloss_core.validation import PreparedInputs


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
            if prepared.regions is not None:
                g = region_targets(prepared, labels, dtype)
            elif channels == 1 and prepared.activation != "softmax":
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


def membership_table(prepared: PreparedInputs) -> torch.Tensor:
    """The regions' membership table (``segloss_core.regions.membership_table``) as int64 on the
    labels' device, memoised per (regions, device)."""
    return _membership_table(prepared.regions, prepared.labels.device)


@functools.lru_cache(maxsize=64)
def _membership_table(regions: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    table = [value - (1 << 64) if value >= 1 << 63 else value for value in regions_module.membership_table(regions)]
    return torch.tensor(table, dtype=torch.int64, device=device)


def region_targets(prepared: PreparedInputs, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g (B, R, N): bit r of each voxel's membership mask (0 for a label outside the table, which only
    an ignored voxel can have here)."""
    table = membership_table(prepared)
    inside = (labels >= 0) & (labels < table.shape[0])
    bits = table[torch.where(inside, labels, torch.zeros_like(labels)).long()]
    bits = torch.where(inside, bits, torch.zeros_like(bits))
    shifts = torch.arange(len(prepared.regions), device=labels.device, dtype=torch.int64).view(1, -1, 1)
    return ((bits.unsqueeze(1) >> shifts) & 1).to(dtype)


SPARSE = frozenset(name for name, entry in stat_names.TABLE.items() if entry.one_hot is not None)
"""Statistics the label path computes without a one-hot (their table entry splits them for one)."""


def _per_class(values: torch.Tensor, labels: torch.Tensor, channels: int) -> torch.Tensor:
    """Σ over voxels of ``values`` (B, N) into the class of each voxel: (B, C)."""
    out = values.new_zeros(values.shape[0], channels)
    return out.scatter_add(1, labels, values)


def _reads(names: Iterable[str]) -> frozenset[str]:
    return frozenset().union(*(stat_names.TABLE[stat_names.parse(n)[0]].reads for n in names))


def _sparse_statistics(prepared: PreparedInputs, names: set[str]) -> dict[str, torch.Tensor]:
    """Integer labels with softmax (or probabilities): the one-hot is never built. Each statistic
    is its table entry's one-hot split: the g = 0 part summed over all classes (einsum with the
    weights), the rest gathered at each voxel's label and scatter-added into its class (B, N
    tensors); memory is the activation (and log-activation)."""
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
    needs_log = "log_p" in _reads(names)
    if prepared.activation == "softmax":
        log_p = torch.log_softmax(z, dim=1) if needs_log else None
        p = log_p.exp() if log_p is not None else torch.softmax(z, dim=1)
    else:
        p = z
        log_p = torch.log(p) if needs_log else None
    p_y = p.gather(1, index)  # (B, 1, N): at each voxel's label
    log_p_y = None if log_p is None else log_p.gather(1, index)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        base, arg = stat_names.parse(name)
        entry = stat_names.TABLE[base]
        background, foreground = entry.one_hot
        value = None
        if background is not None:
            term = background(xp_torch, stat_names.Voxel(p=p, g=None, log_p=log_p, arg=arg))
            if not entry.finite:
                term = torch.where(w.unsqueeze(1) == 0, torch.zeros_like(term), term)
            if term.shape[1] == channels:
                value = torch.einsum("bcn,bn->bc", term, w)
            else:
                value = torch.einsum("bcn,bn->bc", term, w).expand(batch, channels)
        if foreground is not None:
            term = foreground(xp_torch, stat_names.Voxel(p=p_y, g=None, log_p=log_p_y, arg=arg))
            term = term.expand(batch, 1, -1).squeeze(1)
            weighted = term * w
            if not entry.finite:
                weighted = torch.where(w == 0, torch.zeros_like(weighted), weighted)
            scattered = _per_class(weighted, labels, channels)
            value = scattered if value is None else value + scattered
        out[name] = value
    return out


def compute_statistics(prepared: PreparedInputs, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The requested statistics, each (B, C) in the accumulation dtype, differentiable; each one's
    per-voxel term is its entry of ``segloss_core.statistics.TABLE``."""
    names = set(names)
    if (
        prepared.labels is not None
        and prepared.regions is None
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

    activation = prepared.activation
    reads = _reads(names)
    needs_log = bool(reads & {"log_p", "log_1mp"})
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

    out: dict[str, torch.Tensor] = {}
    for name in names:
        base, arg = stat_names.parse(name)
        entry = stat_names.TABLE[base]
        if entry.sigmoid_only and activation == "softmax":
            raise ValueError(f"statistic {name!r} needs activation 'sigmoid' or 'none'")
        field = _field(prepared, arg, p) if "field" in entry.reads else None
        v = stat_names.Voxel(p=p, g=g, log_p=log_p, log_1mp=log_1mp, field=field, arg=arg)
        out[name] = stat_names.weighted_sum(xp_torch, entry.term(xp_torch, v), w, channels, finite=entry.finite)
    return out

"""Native statistics: plain torch ops, chunked over voxels (the fallback when no fused kernel runs).

:class:`ChunkedStatistics` is a ``torch.autograd.Function``: its forward walks the voxels in
chunks under ``no_grad`` — activation, target (one-hot of the chunk's labels, or the given soft
target), voxel weights and the per-voxel terms of ``segloss_core.statistics.TABLE`` — and adds
each chunk's sums into the (B, C, K) statistics; it saves only its inputs. Its backward gets
d(loss)/d(statistics) from autograd of the formulas, recomputes each chunk and writes the
chunk's VJP (the table's partials, then the activation's chain rule, as the float64 reference)
straight into a preallocated gradient in the dtype of the logits. Nothing of size B·C·N exists
besides that gradient: extra memory is the gradient plus a few chunk-sized temporaries.

Integer labels with softmax (or probabilities) and all statistics split for one-hot targets
take the label path in forward: the g = 0 part of each term is summed over every class, the rest
gathered at each voxel's label and scatter-added into its class, so no one-hot is built (ignored
voxels get class 0 with weight 0, so no kernel indexes with an ignored label). The field
statistics (boundary's Σ w·p·φ, Hausdorff-DT's Σ w·(p − g)²·F) take their split from the table
like the others, the field at each voxel's label read from the whole field. Region targets
(``regions=``, sigmoid: the dense path) are one row lookup per voxel in a float membership table
(:func:`region_targets`). Accumulates in float32 for float16/bfloat16 logits (float64 stays
float64).

Chunk size (:func:`chunk_voxels`): elements (B·C·voxels) per chunk such that one temporary in
the accumulation dtype is at most 1/32 of the logits' bytes (:data:`TEMPORARY_SHARE`; a chunk
keeps about eight alive, so they add at most ~0.25× the logits whatever the dtype: half the
elements for float16/bfloat16 logits, whose float32 temporaries weigh twice), and at most 2^18
on the CPU (1 MiB per float32 temporary) and 2^22 on other devices (16 MiB: few kernel launches),
there at least 2^20 (launch overhead before memory); at least 512 voxels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import array_api_compat.torch as xp_torch
import torch
import torch.nn.functional as F

from segloss_core import regions as regions_module
from segloss_core import statistics as stat_names
from segloss_core.validation import PreparedInputs

CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 18, "default": 1 << 22}
"""Elements (B·C·voxels) per chunk, by device type ("default": every device but the CPU)."""
MIN_DEVICE_CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK_VOXELS = 512
TEMPORARY_SHARE = 32
"""One chunk temporary (accumulation dtype) is at most 1/TEMPORARY_SHARE of the logits' bytes."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_voxels(
    batch: int, channels: int, voxels: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> int:
    """Voxels per chunk for (batch, channels, voxels) logits of ``dtype`` on ``device`` (module docstring)."""
    total = batch * channels * voxels
    ratio = dtype.itemsize / accumulation_dtype(dtype).itemsize  # logits' bytes per temporary byte
    share = int(total * ratio) // TEMPORARY_SHARE
    if device.type == "cpu":
        budget = min(CHUNK_ELEMENTS["cpu"], share)
    else:
        budget = min(CHUNK_ELEMENTS["default"], max(MIN_DEVICE_CHUNK_ELEMENTS, share))
    return max(1, min(voxels, max(MIN_CHUNK_VOXELS, budget // (batch * channels))))


def field(
    prepared: PreparedInputs, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The field ``name`` of the inputs, without gradient, reshaped to ``shape`` (in ``dtype``)."""
    if not prepared.fields or name not in prepared.fields:
        raise ValueError(f"statistic needs the field {name!r}, which the loss did not provide")
    values = prepared.fields[name].detach().reshape(shape)
    return values if dtype is None else values.to(dtype)


def target_and_weights(prepared: PreparedInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g, w): target (B, C, N) and voxel weights (B|1, 1|C, N) or None, without gradient (the whole
    volume: the voxelwise losses use it)."""
    batch, channels = prepared.batch_size, prepared.num_classes
    labels = None if prepared.labels is None else prepared.labels.reshape(batch, -1)
    target = None if prepared.target is None else prepared.target.reshape(batch, channels, -1)
    mask = None if prepared.mask is None else prepared.mask.reshape(prepared.mask.shape[0], prepared.mask.shape[1], -1)
    with torch.no_grad():
        return _target_and_weights(
            labels, target, mask, channels, prepared.activation, prepared.ignore_index, prepared.regions, dtype
        )


def _target_and_weights(
    labels: torch.Tensor | None,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    channels: int,
    activation: str,
    ignore_index: int | None,
    regions: tuple[tuple[int, ...], ...] | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g, w) of flattened labels (B, n) or target (B, C, n) and mask (B|1, 1|C, n); with ``regions``
    g (B, R, n) is each voxel's region membership."""
    weight = None
    if labels is not None:
        if ignore_index is not None:
            keep = labels != ignore_index
            weight = keep.to(dtype).unsqueeze(1)
        if regions is not None:  # an ignored label is in no region (checked): its row is 0
            g = region_targets(regions, labels, dtype)
        else:
            if channels == 1 and activation != "softmax":
                hit = (labels == 1).unsqueeze(1)
            else:
                classes = torch.arange(channels, device=labels.device).reshape(1, channels, 1)
                hit = labels.unsqueeze(1) == classes
            if ignore_index is not None:
                hit = hit & keep.unsqueeze(1)  # ignored voxels belong to no class, as in the reference
            g = hit.to(dtype)
    else:
        assert target is not None
        g = target.to(dtype)
    if mask is not None:
        m = mask.to(dtype)
        weight = m if weight is None else weight * m
    return g, weight


def membership_table(regions: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """``segloss_core.regions.membership_table`` as int64 on ``device`` (the fused ops read it too):
    memoised per (regions, device) in eager mode, a constant of the graph under ``torch.compile``
    (whose tracing would skip the cache)."""
    if torch.compiler.is_compiling():
        return _table_tensor(regions, device)
    return _memoised_table(regions, device)


def _table_tensor(regions: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    # bit 63 (region 63) as a negative int64, the same bits
    table = [value - (1 << 64) if value >= 1 << 63 else value for value in regions_module.membership_table(regions)]
    return torch.tensor(table, dtype=torch.int64, device=device)


_memoised_table = functools.lru_cache(maxsize=64)(_table_tensor)


def region_targets(regions: tuple[tuple[int, ...], ...], labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, R, n) in ``dtype``: g_r = [label ∈ regions[r]] of labels (B, n), one row lookup per voxel
    in :func:`region_target_table` (0 for a label outside the table: an ignored voxel, or one the
    fused kernels would count as invalid), never a (B, R, n) integer or boolean temporary."""
    table = region_target_table(regions, labels.device, dtype)
    rows = (labels.long() + 1).clamp_(0, int(table.shape[0]) - 1)
    return F.embedding(rows, table).transpose(1, 2).contiguous()


def region_target_table(regions: tuple[tuple[int, ...], ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(L + 3, R) in ``dtype``: row l + 1 is label l's membership of each region (bit r of
    ``segloss_core.regions.membership_table``), rows 0 and L + 2 are 0 (labels below 0 and above L);
    memoised as :func:`membership_table`."""
    if torch.compiler.is_compiling():
        return _target_table_tensor(regions, device, dtype)
    return _memoised_target_table(regions, device, dtype)


def _target_table_tensor(
    regions: tuple[tuple[int, ...], ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    masks = regions_module.membership_table(regions)
    rows = [[0.0] * len(regions)]
    rows += [[float((mask >> r) & 1) for r in range(len(regions))] for mask in masks]
    rows.append([0.0] * len(regions))
    return torch.tensor(rows, dtype=dtype, device=device)


_memoised_target_table = functools.lru_cache(maxsize=64)(_target_table_tensor)


@dataclass(frozen=True)
class Layout:
    """What :class:`ChunkedStatistics` computes: the statistics (in output order), how the inputs
    read and the chunk size; static for a call, so ``torch.compile`` traces a fixed chunk loop."""

    names: tuple[str, ...]
    activation: str
    channels: int
    ignore_index: int | None
    regions: tuple[tuple[int, ...], ...] | None  # region-based targets (g_r = [label ∈ regions[r]])
    fields: tuple[str, ...]  # names of the field tensors passed after the mask
    step: int  # voxels per chunk
    label_path: bool  # forward without a one-hot (the table's one-hot split)

    def entries(self) -> list[tuple[stat_names.Statistic, Any]]:
        return [_entry(name) for name in self.names]

    def reads(self) -> frozenset[str]:
        return frozenset().union(*(entry.reads for entry, _ in self.entries()))


def _entry(name: str) -> tuple[stat_names.Statistic, Any]:
    base, arg = stat_names.parse(name)
    return stat_names.TABLE[base], arg


def _activation(z: torch.Tensor, activation: str, reads: frozenset[str]) -> tuple[torch.Tensor, ...]:
    """(p, log p, log(1 − p)) of a chunk's logits, log terms from the logits (None where not read)."""
    log_p = log_1mp = None
    if activation == "softmax":
        p = torch.softmax(z, dim=1)
        if "log_p" in reads:  # log p = z − lse, lse = max z − log max p (max p ≥ 1/C: no underflow); one exp
            log_p = z - (z.amax(dim=1, keepdim=True) - torch.log(p.amax(dim=1, keepdim=True)))
    elif activation == "sigmoid":
        p = torch.sigmoid(z)
        if reads & {"log_p", "log_1mp"}:
            log_p = F.logsigmoid(z)
            log_1mp = F.logsigmoid(-z)
    else:
        p = z
        if reads & {"log_p", "log_1mp"}:
            log_p = torch.log(p)
            log_1mp = torch.log1p(-p)
    return p, log_p, log_1mp


def _activation_backward(
    activation: str,
    p: torch.Tensor,
    d_p: torch.Tensor | None,
    d_logp: torch.Tensor | None,
    d_log1mp: torch.Tensor | None,
) -> torch.Tensor:
    """d/dz from d/dp, d/dlog p, d/dlog(1 − p) of a chunk (None = 0): the chain rule of
    ``segloss_core.reference.statistics.activation_backward`` in torch ops; softmax as
    p ⊙ (d_p − Σ_c p·d_p − Σ_c d_logp) + d_logp."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    if activation == "softmax":
        inner = None
        if d_p is not None:
            inner = d_p - (p * d_p).sum(dim=1, keepdim=True)
        if d_logp is not None:
            total = d_logp.sum(dim=1, keepdim=True)
            inner = -total if inner is None else inner - total
        if inner is None:
            return torch.zeros_like(p)
        grad = p * inner
        return grad if d_logp is None else grad + d_logp
    parts = []
    if activation == "sigmoid":
        if d_p is not None:
            parts.append(d_p * p * (1 - p))
        if d_logp is not None:
            parts.append(d_logp * (1 - p))
        if d_log1mp is not None:
            parts.append(-d_log1mp * p)
    else:
        if d_p is not None:
            parts.append(d_p.expand_as(p))
        if d_logp is not None:
            parts.append(torch.where(d_logp == 0, zero, d_logp / p))
        if d_log1mp is not None:
            parts.append(-torch.where(d_log1mp == 0, zero, d_log1mp / (1 - p)))
    if not parts:
        return torch.zeros_like(p)
    grad = parts[0]
    for part in parts[1:]:
        grad = grad + part
    return grad


class _Chunk:
    """The per-voxel values of voxels [start, stop): logits in the accumulation dtype, activation,
    target, weights and fields."""

    def __init__(
        self,
        layout: Layout,
        tensors: tuple[Any, ...],
        start: int,
        stop: int,
        with_target: bool,
        reads: frozenset[str],
    ):
        z, labels, target, mask, *fields = tensors
        dtype = accumulation_dtype(z.dtype)
        self.z = z[:, :, start:stop].to(dtype).contiguous()
        self.p, self.log_p, self.log_1mp = _activation(self.z, layout.activation, reads)
        self.labels = None if labels is None else labels[:, start:stop]
        chunk_mask = None if mask is None else mask[:, :, start:stop]
        self.g, self.w = None, None
        if with_target:
            chunk_target = None if target is None else target[:, :, start:stop]
            self.g, self.w = _target_and_weights(
                self.labels,
                chunk_target,
                chunk_mask,
                layout.channels,
                layout.activation,
                layout.ignore_index,
                layout.regions,
                dtype,
            )
        else:  # label path: weights (B, n) or None, ignored voxels' labels set to class 0
            if layout.ignore_index is not None:
                keep = self.labels != layout.ignore_index
                self.w = keep.to(dtype)
                self.labels = torch.where(keep, self.labels, torch.zeros_like(self.labels))
            if chunk_mask is not None:
                m = chunk_mask.reshape(chunk_mask.shape[0], -1).to(dtype)
                self.w = m if self.w is None else self.w * m
        self.start = start
        self.whole_fields = dict(zip(layout.fields, fields, strict=True))
        self.fields = {name: f[:, :, start:stop].to(dtype) for name, f in self.whole_fields.items()}

    def voxel(self, entry: stat_names.Statistic, arg: Any) -> stat_names.Voxel:
        field = self.fields[arg] if "field" in entry.reads else None
        return stat_names.Voxel(p=self.p, g=self.g, log_p=self.log_p, log_1mp=self.log_1mp, field=field, arg=arg)

    def field_at_label(self, name: str, bins: torch.Tensor) -> torch.Tensor:
        """The field ``name`` at each voxel's label (B, 1, n), read from the whole (B, C, N) field at
        (b·C + y)·N + start + i (1-D index_select, no copy of the chunk's strided slice)."""
        whole = self.whole_fields[name]
        voxels, n = int(whole.shape[2]), int(bins.shape[1])
        index = bins * voxels + (self.start + torch.arange(n, device=bins.device))
        values = whole.reshape(-1).index_select(0, index.reshape(-1)).view(int(bins.shape[0]), 1, n)
        return values.to(self.p.dtype)


def _label_index(labels: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bins, flat) of a chunk's labels y (B, n): b·C + y, the (sample, class) of each voxel in a
    flattened (B, C), and (b·C + y)·n + i, its element in a flattened contiguous (B, C, n) (1-D
    index_select and index_add_ are several times faster than gather and scatter along classes)."""
    batch, n = (int(k) for k in labels.shape)
    bins = labels.long() + torch.arange(batch, device=labels.device).unsqueeze(1) * channels
    return bins, bins * n + torch.arange(n, device=labels.device)


def _at_label(values: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """values (B, C, n), contiguous, at each voxel's label: (B, 1, n)."""
    return values.reshape(-1).index_select(0, flat.reshape(-1)).view(flat.shape[0], 1, flat.shape[1])


def _split_entries(layout: Layout) -> list[tuple[stat_names.Statistic, Any, tuple[Any, Any]]]:
    """(entry, argument, one-hot split) of each statistic of a label-path layout."""
    return [(entry, arg, entry.one_hot) for entry, arg in layout.entries()]  # type: ignore[misc]


def _label_sums(
    layout: Layout, chunk: _Chunk, entries: list[tuple[stat_names.Statistic, Any, Any]]
) -> list[torch.Tensor]:
    """Each statistic of a chunk from its one-hot split: the g = 0 part summed over every class
    (weights w (B, n), or None: all 1), the rest taken at each voxel's label and added into its class
    (no label index at all when no statistic has such a part, as boundary's p·φ)."""
    channels, w = layout.channels, chunk.w
    batch = int(chunk.p.shape[0])
    bins = flat = p_y = log_p_y = None
    if any(foreground is not None for _, _, (_, foreground) in entries):
        bins, flat = _label_index(chunk.labels, channels)
        p_y = _at_label(chunk.p, flat)
        log_p_y = None if chunk.log_p is None else _at_label(chunk.log_p, flat)
    sums = []
    for entry, arg, (background, foreground) in entries:
        field = chunk.fields[arg] if "field" in entry.reads else None
        value = None
        if entry.name == "count" and w is None:  # Σ 1 = n
            value = chunk.p.new_full((batch, channels), float(chunk.p.shape[2]))
        elif background is not None:
            voxel = stat_names.Voxel(p=chunk.p, g=None, log_p=chunk.log_p, field=field, arg=arg)
            term = background(xp_torch, voxel)
            if w is None:
                value = term.sum(dim=-1)
            else:
                if not entry.finite:
                    term = torch.where(w.unsqueeze(1) == 0, 0.0, term)
                value = torch.einsum("bcn,bn->bc", term, w)
            value = value.expand(batch, channels)
        if foreground is not None:
            assert bins is not None and flat is not None
            field_y = None if field is None else chunk.field_at_label(arg, bins)
            term = foreground(xp_torch, stat_names.Voxel(p=p_y, g=None, log_p=log_p_y, field=field_y, arg=arg))
            weighted = term.expand(batch, 1, flat.shape[1]).reshape(batch, -1)
            if w is not None:
                weighted = weighted * w
                if not entry.finite:
                    weighted = torch.where(w == 0, 0.0, weighted)
            scattered = weighted.new_zeros(batch * channels).index_add_(0, bins.reshape(-1), weighted.reshape(-1))
            scattered = scattered.view(batch, channels)
            value = scattered if value is None else value + scattered
        sums.append(value)
    return sums


def _add_product(total: torch.Tensor | None, upstream: torch.Tensor, partial: Any) -> torch.Tensor | None:
    """total + upstream·partial, where a partial of None or the number 0 adds nothing."""
    if partial is None or (isinstance(partial, float | int) and partial == 0):
        return total
    product = upstream * partial
    return product if total is None else total + product


def _difference(at_one: Any, at_zero: Any) -> Any:
    """at_one − at_zero of two partials (None: 0)."""
    if at_zero is None:
        return at_one
    return -at_zero if at_one is None else at_one - at_zero


def _label_backward(
    layout: Layout,
    chunk: _Chunk,
    entries: list[tuple[stat_names.Statistic, Any, Any]],
    grad_out: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """The chunk's gradient for softmax and integer labels from the table's one-hot split, without a
    one-hot: d/dp = a + δ_{c,y}·α and d/dlog p = b + δ_{c,y}·β, with a, b the partials at g = 0 over
    every class (only the statistics with a g = 0 part) and α, β the partials' change from g = 0 to
    g = 1 at each voxel's label y; then the softmax chain rule in closed form,

        dz = p ⊙ (a − S) + b + δ_{c,y}·(p_y·α + β),   S = Σ_c p_c·a_c + p_y·α + Σ_c b_c + β,

    times the voxel weights w; written into ``out`` (the gradient's slice, in the logits' dtype).
    Without a part at the label (α = β = 0: boundary's p·φ with count) no label index is built."""
    p = chunk.p  # the chunk without log terms: log p only where a partial may read it
    at_labels = any(foreground is not None for _, _, (_, foreground) in entries)
    reads_log_p = any("log_p" in entry.reads for entry, _, _ in entries)
    bins = flat = p_y = log_p = log_p_y = None
    if at_labels:
        bins, flat = _label_index(chunk.labels, layout.channels)
        p_y = _at_label(p, flat)
    if reads_log_p:
        lse = chunk.z.amax(dim=1, keepdim=True) - torch.log(p.amax(dim=1, keepdim=True))  # as in _activation
        if at_labels:
            assert flat is not None
            log_p_y = _at_label(chunk.z, flat) - lse
        if any("log_p" in entry.reads and split[0] is not None for entry, _, split in entries):
            log_p = chunk.z - lse
    a = b = alpha = beta = None
    for k, (entry, arg, (background, foreground)) in enumerate(entries):
        upstream = grad_out[:, :, k]
        field = chunk.fields[arg] if "field" in entry.reads else None
        field_y = None
        if foreground is not None and field is not None:
            assert bins is not None
            field_y = chunk.field_at_label(arg, bins)
        at_zero: tuple[Any, ...] = (None, None, None)
        if background is not None:
            voxel = stat_names.Voxel(p=p, g=0.0, log_p=log_p, field=field, arg=arg)
            d_p, d_logp, _ = entry.partials(xp_torch, voxel)
            a = _add_product(a, upstream.unsqueeze(-1), d_p)
            b = _add_product(b, upstream.unsqueeze(-1), d_logp)
            if foreground is not None:
                voxel_y = stat_names.Voxel(p=p_y, g=0.0, log_p=log_p_y, field=field_y, arg=arg)
                at_zero = entry.partials(xp_torch, voxel_y)
        if foreground is not None:
            assert bins is not None and p_y is not None
            voxel_y = stat_names.Voxel(p=p_y, g=1.0, log_p=log_p_y, field=field_y, arg=arg)
            at_one = entry.partials(xp_torch, voxel_y)
            upstream_y = upstream.reshape(-1).index_select(0, bins.reshape(-1)).view_as(p_y)
            alpha = _add_product(alpha, upstream_y, _difference(at_one[0], at_zero[0]))
            beta = _add_product(beta, upstream_y, _difference(at_one[1], at_zero[1]))
    if a is not None and a.shape == p.shape and b is None and alpha is None and beta is None:
        # d/dp only, per voxel (boundary's u·φ): dz = p·a' − p·Σ_c p·a' with a' = w·a, three passes
        if chunk.w is not None:
            a.mul_(chunk.w.unsqueeze(1))  # a is a fresh product
        pa = p * a
        _write(out, torch.addcmul, pa, p, pa.sum(dim=1, keepdim=True), value=-1.0)
        return
    total = None  # S
    at_label = None  # p_y·α + β
    if a is not None:
        if a.shape[-1] == 1:  # a per (sample, class): S's part is a matrix product
            total = torch.einsum("bcn,bc->bn", p, a.squeeze(-1)).unsqueeze(1)
        else:
            total = (p * a).sum(dim=1, keepdim=True)
    if alpha is not None:
        at_label = p_y * alpha
    if b is not None:
        total = _sum(total, b.sum(dim=1, keepdim=True))
    if beta is not None:
        at_label = _sum(at_label, beta)
    total = _sum(total, at_label)
    if total is None:
        out.zero_()
        return
    if a is None:
        inner = -total
    elif a.shape == p.shape:  # a fresh product per voxel (a field's partial): in place
        inner = a.sub_(total)
    else:
        inner = a - total
    if b is None and at_label is None:  # dz = w·p ⊙ (a − S), written straight into the gradient
        if chunk.w is not None:
            inner = inner * chunk.w.unsqueeze(1)
        _write(out, torch.mul, p, inner)
        return
    grad = p * inner
    if b is not None:
        grad = grad + b
    if at_label is not None:
        assert flat is not None
        grad.view(-1).index_add_(0, flat.reshape(-1), at_label.reshape(-1))
    if chunk.w is not None:
        grad.mul_(chunk.w.unsqueeze(1))
    out.copy_(grad)


def _write(out: torch.Tensor, op: Any, *args: Any, **kwargs: Any) -> None:
    """op(*args, **kwargs) written into ``out`` (a strided slice of the gradient): with ``out=``
    eagerly, as a copy under ``torch.compile`` (Dynamo takes no non-contiguous ``out=``)."""
    if torch.compiler.is_compiling():
        out.copy_(op(*args, **kwargs))
    else:
        op(*args, **kwargs, out=out)


def _sum(left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor | None:
    """left + right, None as 0."""
    if left is None:
        return right
    return left if right is None else left + right


def _bounds(layout: Layout, voxels: int) -> list[tuple[int, int]]:
    return [(start, min(start + layout.step, voxels)) for start in range(0, voxels, layout.step)]


class ChunkedStatistics(torch.autograd.Function):
    """(B, C, K) statistics ``layout.names`` of logits z (B, C, N), chunk by chunk (module docstring).

    ``apply(layout, z, labels (B, N) | None, target (B, C, N) | None, mask (B|1, 1|C, N) | None,
    *fields (B, C, N))``; only z gets a gradient.
    """

    @staticmethod
    def forward(ctx: Any, layout: Layout, *tensors: Any) -> torch.Tensor:
        z = tensors[0]
        batch, channels, voxels = (int(n) for n in z.shape)
        out = z.new_zeros((batch, channels, len(layout.names)), dtype=accumulation_dtype(z.dtype))
        entries = layout.entries()
        splits = _split_entries(layout) if layout.label_path else []
        reads = layout.reads()
        for start, stop in _bounds(layout, voxels):
            chunk = _Chunk(layout, tensors, start, stop, with_target=not layout.label_path, reads=reads)
            if layout.label_path:
                sums = _label_sums(layout, chunk, splits)
            else:
                sums = [
                    stat_names.weighted_sum(
                        xp_torch, entry.term(xp_torch, chunk.voxel(entry, arg)), chunk.w, channels, finite=entry.finite
                    )
                    for entry, arg in entries
                ]
            out += torch.stack(sums, dim=-1)
        ctx.layout = layout
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        layout: Layout = ctx.layout
        tensors = ctx.saved_tensors
        z = tensors[0]
        grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        entries = layout.entries()
        label_backward = layout.label_path and layout.activation == "softmax"
        splits = _split_entries(layout) if label_backward else []
        reads = frozenset() if label_backward else layout.reads()  # the label path: p alone (log p its own)
        for start, stop in _bounds(layout, int(z.shape[2])):
            chunk = _Chunk(layout, tensors, start, stop, with_target=not label_backward, reads=reads)
            if label_backward:
                _label_backward(layout, chunk, splits, grad_out, grad[:, :, start:stop])
                continue
            d: list[torch.Tensor | None] = [None, None, None]  # d/dp, d/dlog p, d/dlog(1 − p)
            for k, (entry, arg) in enumerate(entries):
                partials = entry.partials(xp_torch, chunk.voxel(entry, arg))
                upstream = grad_out[:, :, k].unsqueeze(-1)
                for i, partial in enumerate(partials):
                    if partial is not None:
                        d[i] = upstream * partial if d[i] is None else d[i] + upstream * partial
            if chunk.w is not None:  # w·d, 0 wherever w == 0 (no 0·inf from ignored voxels)
                d = [None if t is None else torch.where(chunk.w == 0, 0.0, chunk.w * t) for t in d]
            grad[:, :, start:stop] = _activation_backward(layout.activation, chunk.p, *d).to(z.dtype)
        return (None, grad) + (None,) * (len(tensors) - 1)


def compute_statistics(prepared: PreparedInputs, names: Any) -> dict[str, torch.Tensor]:
    """The requested statistics, each (B, C) in the accumulation dtype, differentiable w.r.t. the
    logits; each one's per-voxel term is its entry of ``segloss_core.statistics.TABLE``."""
    ordered = tuple(sorted(set(names)))
    batch, channels = prepared.batch_size, prepared.num_classes
    fields: list[str] = []
    for name in ordered:
        entry, arg = _entry(name)
        if entry.sigmoid_only and prepared.activation == "softmax":
            raise ValueError(f"statistic {name!r} needs activation 'sigmoid' or 'none'")
        if "field" in entry.reads and arg not in fields:
            fields.append(arg)
    z = prepared.pred.reshape(batch, channels, -1)
    labels = None if prepared.labels is None else prepared.labels.reshape(batch, -1)
    target = None if prepared.target is None else prepared.target.reshape(batch, channels, -1).detach()
    mask = prepared.mask
    if mask is not None:
        mask = mask.reshape(mask.shape[0], mask.shape[1], -1).detach()
    field_tensors = [field(prepared, name, (batch, channels, -1)) for name in fields]
    label_path = (
        labels is not None
        and prepared.regions is None
        and prepared.activation != "sigmoid"
        and channels > 1
        and (mask is None or int(mask.shape[1]) == 1)
        and all(_entry(name)[0].one_hot is not None for name in ordered)
        and not (z.is_cuda and torch.are_deterministic_algorithms_enabled())  # scatter_add
    )
    layout = Layout(
        names=ordered,
        activation=prepared.activation,
        channels=channels,
        ignore_index=prepared.ignore_index,
        regions=prepared.regions,
        fields=tuple(fields),
        step=chunk_voxels(batch, channels, int(z.shape[2]), z.device, z.dtype),
        label_path=label_path,
    )
    out = ChunkedStatistics.apply(layout, z, labels, target, mask, *field_tensors)
    return {name: out[:, :, k] for k, name in enumerate(ordered)}

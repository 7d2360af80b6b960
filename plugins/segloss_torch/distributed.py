"""Global statistics across processes: every region loss is a formula of per-(sample, class)
sums, so one all-gather of a (B, C, K) tensor gives every rank the statistics of the whole
global batch, and the exact loss of the concatenated batch.

Forward: the local statistics (B_r, C, K) are gathered from all ranks (padded to the largest
B_r, so batch sizes may differ) and concatenated in rank order. Backward: the upstream gradient
(B, C, K) is summed over ranks (an all-reduce) and each rank keeps its own rows. Every rank
computes the same global loss, so each rank's input gradient is world_size × the gradient of a
single process on the concatenated batch; DistributedDataParallel averages parameter
gradients over ranks (÷ world_size), so the parameter update equals the single-process one
exactly (the convention of nnU-Net's AllGatherGrad).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

_WARNED = False


def available(group: Any = None) -> bool:
    """True when torch.distributed is initialised (so statistics are shared)."""
    if dist.is_available() and dist.is_initialized():
        return True
    global _WARNED
    if not _WARNED:
        warnings.warn(
            "segloss: distributed=True but torch.distributed is not initialised; the loss uses this process's "
            "statistics only (initialise the process group, e.g. with torchrun, to share them)",
            RuntimeWarning,
            stacklevel=4,
        )
        _WARNED = True
    return False


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        sizes = torch.tensor([local.shape[0]], device=local.device, dtype=torch.long)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        counts = [int(s.item()) for s in all_sizes]
        largest = max(counts)
        padded = local.new_zeros((largest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        ctx.group = group
        ctx.rows = (sum(counts[:rank]), counts[rank])
        return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start, count = ctx.rows
        return grad[start : start + count], None


def gather_statistics(stats: dict[str, torch.Tensor], group: Any = None) -> dict[str, torch.Tensor]:
    """The statistics of the global batch: one all-gather of all of them stacked as (B, C, K)."""
    if not stats:
        return stats
    names = sorted(stats)
    stacked = torch.stack([stats[name] for name in names], dim=-1)
    gathered = _GatherRows.apply(stacked, group)
    return {name: gathered[..., index] for index, name in enumerate(names)}


def bytes_per_step(batch: int, classes: int, statistics: int, world_size: int, dtype_size: int = 4) -> int:
    """Bytes each rank receives per forward: ``batch`` is the largest per-rank batch (every rank's rows
    are padded to it), ``statistics`` the K of the (B, C, K) tensor, ``dtype_size`` 4 (8 for float64
    inputs). The backward all-reduce moves the same order of bytes."""
    return world_size * (8 + batch * classes * statistics * dtype_size)

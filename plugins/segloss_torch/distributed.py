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

Bad input on one rank: :func:`validate_on_every_rank` runs the input checks on every rank and
shares the outcome in one tiny all-reduce (a flag) before any statistics are exchanged; when a
rank's check failed, the failing ranks' messages are all-gathered (only then), and every rank
raises the same :class:`InputRejectedOnRank` naming the rank(s) and the problem, the failing
rank included, after it has taken part in both collectives. No rank is left waiting in a
collective that a peer will never enter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

_WARNED = False
_T = TypeVar("_T")
MESSAGE_BYTES = 1024
"""Longest message (UTF-8 bytes) a rank shares when its input is rejected; longer ones are cut."""


class InputRejectedOnRank(ValueError, TypeError):
    """Raised on every rank when the input of one or more ranks failed validation.

    The message names each failing rank and its problem, e.g. ``rank 1: target has labels
    outside [0, 4): 4``; ``ranks`` lists them. A subclass of both ``ValueError`` and
    ``TypeError``, the two types single-process validation raises, so code that catches those
    catches this too. On a failing rank it is chained to the local exception.
    """

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


class StatisticsExchangeError(RuntimeError):
    """A collective of the loss failed (a peer process died or left the step): says which."""


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


def _device(group: Any) -> torch.device:
    """Where this group's collectives need their tensors: the current CUDA device for NCCL."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, group: Any, call: Callable[[], Any]) -> Any:
    """``call()``, with a failure (a dead or departed peer) said in words, naming this rank."""
    try:
        return call()
    except RuntimeError as exc:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise StatisticsExchangeError(
            f"segloss distributed loss: the {what} failed on rank {rank} of {world} ({type(exc).__name__}: {exc}); "
            "another rank has probably died or stopped calling the loss at this step (its own error, if any, "
            "is in its log)"
        ) from exc


def validate_on_every_rank(validate: Callable[[], _T], group: Any = None) -> _T:
    """``validate()`` on this rank, its outcome shared with every rank of ``group``.

    Good path: one all-reduce (MAX) of a one-element int64 flag, 0 everywhere. When some rank's
    ``validate()`` raised ``ValueError``/``TypeError``: the flag is 1, each rank all-gathers the
    ranks' messages (a fixed ``MESSAGE_BYTES`` uint8 row each) and every rank raises the same
    :class:`InputRejectedOnRank`. The failing rank raises only after both collectives, so the
    others never wait for it; whatever it does afterwards (exit, or go on to the next step), the
    group stays consistent.
    """
    local: BaseException | None = None
    result: Any = None
    try:
        result = validate()
    except (ValueError, TypeError) as exc:
        local = exc
    device = _device(group)
    flag = torch.tensor([0 if local is None else 1], dtype=torch.int64, device=device)
    _collective("input-check all-reduce", group, lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group))
    if int(flag.item()) == 0:
        return result
    row = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=device)
    if local is not None:
        text = f"{type(local).__name__}: {local}".encode()[:MESSAGE_BYTES]
        row[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    _collective("input-check message gather", group, lambda: dist.all_gather(rows, row, group=group))
    failures = [
        (rank, bytes(r.cpu().tolist()).rstrip(b"\0").decode(errors="replace"))
        for rank, r in enumerate(rows)
        if bool(r.any())
    ]
    message = "segloss distributed loss: invalid input on " + "; ".join(
        f"rank {rank}: {text.partition(': ')[2]} ({text.partition(': ')[0]})" for rank, text in failures
    )
    raise InputRejectedOnRank(message, [rank for rank, _ in failures]) from local


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        sizes = torch.tensor([local.shape[0]], device=local.device, dtype=torch.long)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        _collective("batch-size all-gather", group, lambda: dist.all_gather(all_sizes, sizes, group=group))
        counts = [int(s.item()) for s in all_sizes]
        largest = max(counts)
        padded = local.new_zeros((largest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        padded = padded.contiguous()
        _collective("statistics all-gather", group, lambda: dist.all_gather(gathered, padded, group=group))
        ctx.group = group
        ctx.rows = (sum(counts[:rank]), counts[rank])
        return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        _collective(
            "gradient all-reduce", ctx.group, lambda: dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        )
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
    inputs); plus the 8-byte input-check flag. The backward all-reduce moves the same order of bytes."""
    return 8 + world_size * (8 + batch * classes * statistics * dtype_size)

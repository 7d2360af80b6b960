"""Global statistics with torch.distributed (gloo, CPU, processes spawned on localhost).

Each rank holds a slice of one global batch (uneven sizes, classes absent on some ranks,
ignored voxels); with ``distributed=True`` every rank must get the loss of the concatenated
batch exactly, and its input gradient must be world_size × the single-process gradient of its
rows (DDP then averages parameter gradients: the update equals the single-process one).
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segloss_core import get_loss

CASES = [
    ("dice", {"batch": True}),
    ("focal", {"ignore_index": 255}),
    ("cross_entropy", {"ignore_index": 255}),
    ("dice", {"batch": False}),
    ("dice", {"preset": "nnunet", "batch": True, "ignore_index": 255}),
    ("dice_ce", {"preset": "nnunet", "batch": True, "ignore_index": 255}),
    ("generalized_dice", {"batch": True}),
    ("tversky", {"batch": True, "alpha": 0.3, "beta": 0.7}),
    ("jaccard", {"preset": "smp"}),
    ("boundary", {}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.randn(total, 4, 6, 5, 4, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (total, 6, 5, 4), generator=g)
    rank0 = y[: sizes[0]]
    rank0[rank0 == 3] = 1  # class 3 absent from every sample of rank 0 (present on the other ranks)
    assert not (y[: sizes[0]] == 3).any() and (len(sizes) == 1 or (y[sizes[0] :] == 3).any())
    y[:, 0, 0] = 255  # ignored voxels everywhere
    return x, y


@contextlib.contextmanager
def _chunks(small: bool):
    """With ``small``, the native path walks a few voxels per chunk (a ragged last one included), so
    the chunked statistics and their backward are what the ranks share."""
    from segloss_torch import native

    saved = native.MIN_CHUNK_VOXELS, native.CHUNK_ELEMENTS["cpu"]
    if small:
        native.MIN_CHUNK_VOXELS, native.CHUNK_ELEMENTS["cpu"] = 1, 100
    try:
        yield
    finally:
        native.MIN_CHUNK_VOXELS, native.CHUNK_ELEMENTS["cpu"] = saved


def _check_losses(rank: int, world: int, sizes: list[int]) -> None:
    x, y = _global_batch(sizes)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    for impl, small in (("fused", False), ("native", False), ("native", True)):
        for name, params in CASES:
            if impl == "fused" and name == "focal":
                continue  # not fused (impl='fused' refuses it)
            params = dict(params)
            if name in ("dice", "generalized_dice", "tversky", "jaccard", "boundary") and "ignore_index" not in params:
                params["ignore_index"] = 255
            single = get_loss(name, backend="torch", impl=impl, **params)
            shared = get_loss(name, backend="torch", impl=impl, distributed=True, **params)
            xs = x.clone().requires_grad_(True)
            xr = x[rows].clone().requires_grad_(True)
            with _chunks(small):
                expected = single(xs, y)
                expected.backward()
                value = shared(xr, y[rows])
                value.backward()
            run = f"{impl} (small chunks)" if small else impl
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-13, msg=f"{name} {params} {run}")
            torch.testing.assert_close(
                xr.grad, world * xs.grad[rows], rtol=1e-10, atol=1e-13, msg=f"gradient {name} {params} {run}"
            )


def _check_ddp_step(rank: int, world: int, sizes: list[int]) -> None:
    x, y = _global_batch(sizes, seed=1)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    torch.manual_seed(0)
    reference = torch.nn.Conv3d(4, 4, 3, padding=1).double()
    model = torch.nn.Conv3d(4, 4, 3, padding=1).double()
    model.load_state_dict(reference.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_single = get_loss("dice_ce", backend="torch", preset="nnunet", batch=True, ignore_index=255)
    loss_shared = get_loss("dice_ce", backend="torch", preset="nnunet", batch=True, ignore_index=255, distributed=True)
    for net, loss, inputs, targets in ((reference, loss_single, x, y), (ddp, loss_shared, x[rows], y[rows])):
        optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
        optimiser.zero_grad()
        loss(net(inputs), targets).backward()
        optimiser.step()
    for p_ref, p_ddp in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p_ddp, p_ref, rtol=1e-12, atol=1e-14)


def _worker(rank: int, world: int, port: int, sizes: list[int], out: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        _check_losses(rank, world, sizes)
        _check_ddp_step(rank, world, sizes)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.parametrize("sizes", [[2, 2], [3, 1, 2]], ids=["2-ranks-even", "3-ranks-uneven"])
def test_global_statistics_equal_the_concatenated_batch(sizes, tmp_path):
    world = len(sizes)
    try:
        mp.spawn(_worker, args=(world, _free_port(), sizes, str(tmp_path)), nprocs=world, join=True)
    except Exception as exc:  # noqa: BLE001 - report the ranks' tracebacks instead
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.err")))
        raise AssertionError(errors or str(exc)) from None


def test_without_a_process_group_it_warns_once_and_stays_local():
    from segloss_torch import distributed

    distributed._WARNED = False
    x, y = _global_batch([2])
    shared = get_loss("dice", backend="torch", distributed=True, ignore_index=255)
    local = get_loss("dice", backend="torch", ignore_index=255)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = shared(x, y)
        shared(x, y)
    messages = [str(w.message) for w in caught if "not initialised" in str(w.message)]
    assert len(messages) == 1
    assert float(first) == float(local(x, y))


def test_voxelwise_losses_are_refused():
    with pytest.raises(ValueError, match=r"\['topk_ce'\] are not computed from statistics"):
        get_loss("dice_topk", backend="torch", distributed=True)


def test_bytes_per_step():
    from segloss_torch.distributed import bytes_per_step

    assert bytes_per_step(batch=2, classes=14, statistics=4, world_size=8) == 8 + 8 * (8 + 2 * 14 * 4 * 4)


# ---------------------------------------------------------------------------------------
# bad input on one rank: every rank raises the same error, no rank hangs
# ---------------------------------------------------------------------------------------
def _attempt(rank: int, loss, bad: bool, out: str, step: str) -> str:
    """One forward + backward; the outcome as 'ok' or 'ExceptionType|message', also written to a file."""
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    y = torch.randint(0, 4, (2, 5, 6), generator=torch.Generator().manual_seed(10 + rank))
    if bad:
        y[0, 0, 0] = 4  # not a class of 4
    try:
        loss(x, y).backward()
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank saw
        outcome = f"{type(exc).__name__}|{exc}"
    with open(os.path.join(out, f"{step}-rank{rank}.txt"), "w") as f:
        f.write(outcome)
    return outcome


def _bad_input_worker(rank: int, world: int, port: int, plan: list, out: str) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(timeout=timedelta(seconds=20))  # a hang becomes an error (not naming the rank) in 20 s
    loss = get_loss("dice", backend="torch", impl="native", distributed=True, process_group=group)
    for step, bad_ranks, exits in plan:
        outcome = _attempt(rank, loss, rank in bad_ranks, out, step)
        if exits and rank in bad_ranks and outcome != "ok":
            os._exit(3)  # the failing rank dies at once, as an uncaught exception would end it
        if exits:
            # the peer is gone: the next collective fails, saying so (not a 30-minute wait)
            _attempt(rank, loss, False, out, f"{step}-after")
            os._exit(0)


def _run_ranks(target, world: int, args: tuple, limit: float = 150.0) -> None:
    import multiprocessing
    import time

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + limit
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert not hung, f"ranks {hung} still running after {limit:.0f} s"


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(world, tmp_path):
    """Rank(s) with labels outside [0, C): every rank raises InputRejectedOnRank naming them, the
    failing ones staying alive (the next good step works) or exiting (the others already know)."""
    first_bad = [1] if world == 2 else [0, 2]
    plan = [("stays", first_bad, False), ("good", [], False), ("exits", [1], True)]
    _run_ranks(_bad_input_worker, world, (_free_port(), plan, str(tmp_path)))

    def seen(step: str) -> list[str]:
        return [(tmp_path / f"{step}-rank{rank}.txt").read_text() for rank in range(world)]

    stays = seen("stays")
    assert len(set(stays)) == 1, stays  # the very same error everywhere
    kind, message = stays[0].split("|", 1)
    assert kind == "InputRejectedOnRank"
    for rank in first_bad:
        assert f"rank {rank}: target has labels outside [0, 4): found 4" in message
    assert "(ValueError)" in message and all(f"rank {r}:" not in message for r in range(world) if r not in first_bad)

    assert seen("good") == ["ok"] * world  # the failing ranks stayed in step: the group still works

    exits = seen("exits")
    assert len(set(exits)) == 1 and exits[0].startswith("InputRejectedOnRank|")
    assert "rank 1: target has labels outside [0, 4): found 4" in exits[0]
    for rank in range(world):  # after rank 1 died, a collective with it fails and says what happened
        if rank != 1:
            after = (tmp_path / f"exits-after-rank{rank}.txt").read_text()
            assert after.startswith("StatisticsExchangeError|segloss distributed loss: the input-check all-reduce")
            assert f"failed on rank {rank} of {world}" in after and "another rank has probably died" in after


def test_one_rank_validation_outside_a_process_group_is_the_plain_error():
    """Without torch.distributed the local error is raised as in single-process training."""
    from segloss_torch import distributed

    distributed._WARNED = True  # the once-warning is tested above
    loss = get_loss("dice", backend="torch", distributed=True)
    with pytest.raises(ValueError, match=r"target has labels outside \[0, 4\): found 4") as caught:
        loss(torch.randn(1, 4, 3, 3), torch.full((1, 3, 3), 4))
    assert type(caught.value) is ValueError

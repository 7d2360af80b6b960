"""Global statistics with torch.distributed (gloo, CPU, processes spawned on localhost).

Each rank holds a slice of one global batch (uneven sizes, classes absent on some ranks,
ignored voxels); with ``distributed=True`` every rank must get the loss of the concatenated
batch exactly, and its input gradient must be world_size × the single-process gradient of its
rows (DDP then averages parameter gradients: the update equals the single-process one).
"""

from __future__ import annotations

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


def _check_losses(rank: int, world: int, sizes: list[int]) -> None:
    x, y = _global_batch(sizes)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    for impl in ("fused", "native"):
        for name, params in CASES:
            params = dict(params)
            if name in ("dice", "generalized_dice", "tversky", "jaccard", "boundary") and "ignore_index" not in params:
                params["ignore_index"] = 255
            single = get_loss(name, backend="torch", impl=impl, **params)
            xs = x.clone().requires_grad_(True)
            expected = single(xs, y)
            expected.backward()
            shared = get_loss(name, backend="torch", impl=impl, distributed=True, **params)
            xr = x[rows].clone().requires_grad_(True)
            value = shared(xr, y[rows])
            value.backward()
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-13, msg=f"{name} {params} {impl}")
            torch.testing.assert_close(
                xr.grad, world * xs.grad[rows], rtol=1e-10, atol=1e-13, msg=f"gradient {name} {params} {impl}"
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

    assert bytes_per_step(batch=2, classes=14, statistics=4, world_size=8) == 8 * (8 + 2 * 14 * 4 * 4)

"""The host block cache of the fused CPU kernels (``csrc/torch/host_buffers.cpp``).

The gradient of ``region_stats_backward`` and the distance maps of 4 MiB or more come from freed
blocks kept for reuse. These tests check what a user relies on: the values are those of a fresh
tensor (every element written, nothing left from the block's previous use), a block is reused only
once its tensor is gone (never shared by two live tensors), it comes back from any thread, the
tensors behave as ordinary ones (resize, in-place ops, autograd accumulation), a request no free
block fits unmaps them all first, ``SEGLOSS_HOST_CACHE_MB=0`` turns the cache off, and
``empty_host_cache`` returns the memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from segloss_core import get_loss

pytestmark = pytest.mark.usefixtures("fused_kernels")  # built at run time, never at collection

MIB = 1 << 20


def _maps(voxels: int, fill: bool = False) -> torch.Tensor:
    """A (1, 1, voxels) float32 output of the CPU distance-map op: masks without a boundary are filled
    with the no-boundary value (7.0 here) without a transform, so the call is cheap at any size."""
    masks = torch.full((1, 1, voxels), fill, dtype=torch.bool)
    return torch.ops.segloss.mask_distance_maps(masks, [1.0], 3, 7.0)


def test_a_freed_block_is_taken_again_and_never_while_in_use(fused_kernels):
    fused_kernels.empty_host_cache()
    first = _maps(2 * MIB)  # 8 MiB
    address = first.data_ptr()
    held = _maps(2 * MIB)  # `first` alive: another block
    assert held.data_ptr() != address
    del first
    assert fused_kernels.host_cache_bytes() == 8 * MIB
    again = _maps(2 * MIB)
    assert again.data_ptr() == address  # the freed block, its pages resident
    assert fused_kernels.host_cache_bytes() == 0
    assert torch.equal(again, torch.full_like(again, 7.0)) and torch.equal(held, again)
    del again, held
    assert fused_kernels.empty_host_cache() == 16 * MIB
    assert fused_kernels.host_cache_bytes() == 0


def test_small_outputs_do_not_use_the_cache(fused_kernels):
    fused_kernels.empty_host_cache()
    small = _maps(MIB - 1)  # just under 4 MiB: c10's allocator
    del small
    assert fused_kernels.host_cache_bytes() == 0


def test_a_miss_unmaps_the_free_blocks_first(fused_kernels):
    fused_kernels.empty_host_cache()
    _maps(2 * MIB)  # freed at once
    assert fused_kernels.host_cache_bytes() == 8 * MIB
    bigger = _maps(4 * MIB)  # 16 MiB: the 8 MiB block does not fit, and is not kept beside it
    assert fused_kernels.host_cache_bytes() == 0
    smaller = _maps(MIB + MIB // 2)  # 6 MiB: nothing free, a fresh block
    del bigger
    assert fused_kernels.host_cache_bytes() == 16 * MIB
    tiny = _maps(MIB + MIB // 4)  # 5 MiB: the 16 MiB block is over 1.5× its size: a miss
    assert fused_kernels.host_cache_bytes() == 0
    del smaller, tiny
    fused_kernels.empty_host_cache()


def test_a_block_up_to_half_again_the_request_is_taken(fused_kernels):
    fused_kernels.empty_host_cache()
    block = _maps(2 * MIB)  # 8 MiB
    address = block.data_ptr()
    del block
    three_quarters = _maps(3 * MIB // 2)  # 6 MiB in the 8 MiB block (e.g. C − 1 of C classes)
    assert three_quarters.data_ptr() == address
    del three_quarters
    fused_kernels.empty_host_cache()


def test_a_block_freed_on_another_thread_comes_back(fused_kernels):
    fused_kernels.empty_host_cache()
    box = [_maps(2 * MIB)]
    address = box[0].data_ptr()
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert fused_kernels.host_cache_bytes() == 8 * MIB
    assert _maps(2 * MIB).data_ptr() == address
    fused_kernels.empty_host_cache()


def test_cached_tensors_behave_as_ordinary_ones(fused_kernels):
    out = _maps(2 * MIB)
    out.add_(1.0)
    assert float(out[0, 0, -1]) == 8.0
    out.resize_(1, 1, 3 * MIB)  # a larger storage through the same allocator
    out[..., 2 * MIB :] = 1.0
    assert float(out[0, 0, 0]) == 8.0 and float(out[0, 0, -1]) == 1.0
    out.resize_(4)
    assert out.tolist() == [8.0] * 4
    clone = out.clone()
    del out
    assert clone.tolist() == [8.0] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_from_reused_blocks_are_exact_and_accumulate(fused_kernels, dtype):
    """Dice+CE with a gradient of 4 MiB or more (cached): the second step's gradient is written into
    the block the first one's freed, with the same values, equal to the native path's; two backward
    passes into one .grad add."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 64, 64, 64) if dtype == torch.float32 else (1, 4, 96, 96, 96)
    logits = (torch.randn(shape, generator=g) * 2).to(dtype)
    labels = torch.randint(0, 4, (shape[0], *shape[2:]), generator=g)
    fused_loss = get_loss("dice_ce", backend="torch", impl="fused")
    x = logits.detach().float().requires_grad_()
    get_loss("dice_ce", backend="torch", impl="native")(x, labels).backward()
    expected = x.grad.to(dtype).float()
    tolerance = {"rtol": 1e-5, "atol": 1e-9} if dtype == torch.float32 else {"rtol": 2.0**-7, "atol": 1e-9}
    fused_kernels.empty_host_cache()
    x = logits.detach().requires_grad_()
    fused_loss(x, labels).backward()
    first, address = x.grad.clone(), x.grad.data_ptr()
    del x
    x = logits.detach().requires_grad_()
    fused_loss(x, labels).backward()
    assert x.grad.data_ptr() == address  # the freed block
    assert torch.equal(x.grad, first)
    torch.testing.assert_close(first.float(), expected, **tolerance)
    fused_loss(x, labels).backward()  # the second gradient adds into .grad
    torch.testing.assert_close(x.grad.float(), 2 * first.float(), **tolerance)


def test_distance_maps_from_reused_blocks_are_exact(fused_kernels):
    """Signed maps of a 4-class 96³ volume (14 MiB, cached) into a block that held other maps."""
    from segloss_core import distance_maps

    g = torch.Generator().manual_seed(1)
    labels = torch.nn.functional.interpolate(torch.randn(1, 4, 6, 6, 6, generator=g), size=(96, 96, 96)).argmax(1)
    first = distance_maps.signed_distance_map(labels, 4, (1.0, 1.0, 2.0))
    reference = first.clone()
    del first
    other = distance_maps.signed_distance_map(torch.roll(labels, 17, dims=1), 4, (1.0, 1.0, 2.0))
    del other
    again = distance_maps.signed_distance_map(labels, 4, (1.0, 1.0, 2.0))
    assert torch.equal(again, reference)


def test_cache_off_with_zero_megabytes(tmp_path):
    script = (
        "from segloss_torch import fused\n"
        "import torch\n"
        "assert fused.is_built()\n"
        "for _ in range(2):\n"
        "    out = torch.ops.segloss.mask_distance_maps(torch.zeros(1, 1, 1 << 21, dtype=torch.bool), [1.0], 3, 5.0)\n"
        "    assert float(out.min()) == 5.0\n"
        "    del out\n"
        "print(fused.host_cache_bytes())\n"
    )
    env = {**os.environ, "SEGLOSS_HOST_CACHE_MB": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "0"

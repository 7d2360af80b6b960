"""Every ``torch.ops.segloss`` op passes ``torch.library.opcheck`` (schema, fake kernel, autograd
registration, dispatch under FakeTensor and functionalization) on the CPU kernels."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from segloss_torch import fused, ops  # noqa: E402

pytestmark = pytest.mark.usefixtures("fused_kernels")  # built at run time, never at collection


def _problem(seed=0, shape=(2, 3, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    return x, y


def test_every_op_is_defined_from_python():
    for name, schema in ops.SCHEMAS.items():
        assert str(getattr(torch.ops.segloss, name).default._schema) == f"segloss::{schema}"


@pytest.mark.parametrize("variant", ["labels", "soft-sigmoid", "mask-ignore", "float32"])
def test_opcheck_region_stats(variant):
    x, y = _problem()
    mask = None
    if variant == "float32":
        x = x.float()
    args = (x.requires_grad_(True), y, None, None, 0, 0, False, False, False)
    if variant == "soft-sigmoid":
        args = (x.requires_grad_(True), None, torch.sigmoid(x.detach()), None, 1, 0, False, True, False)
    elif variant == "mask-ignore":
        mask = torch.rand(2, 1, 5, 4, dtype=torch.float64).reshape(2, -1)
        y = y.clone()
        y[:, 0] = 255
        args = (x.requires_grad_(True), y, None, mask, 0, 255, True, False, False)
    torch.library.opcheck(torch.ops.segloss.region_stats.default, args)


def test_opcheck_region_stats_backward():
    x, y = _problem()
    grad = torch.randn(2, 3, fused.NUM_SLOTS, dtype=torch.float64)
    torch.library.opcheck(torch.ops.segloss.region_stats_backward.default, (grad, x, y, None, None, 0, 0, False))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_opcheck_label_distance_maps(dtype):
    _, y = _problem(shape=(2, 3, 6, 5))
    args = (y.to(dtype), 3, [1.0, 0.5], 0, 0.0, 0, False)
    torch.library.opcheck(torch.ops.segloss.label_distance_maps.default, args)
    out = torch.ops.segloss.label_distance_maps(*args)
    assert out.shape == (2, 3, 6, 5) and out.dtype == torch.float32


def test_opcheck_mask_distance_maps():
    masks = torch.rand(2, 2, 6, 5) > 0.5
    args = (masks, [1.0, 1.0], 0, 0.0)
    torch.library.opcheck(torch.ops.segloss.mask_distance_maps.default, args)
    assert torch.ops.segloss.mask_distance_maps(*args).shape == (2, 2, 6, 5)

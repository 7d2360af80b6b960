"""PyTorch backend, native path: autograd, dtypes, AMP, devices, modules."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from segloss_core import get_loss

LOSSES = ["dice", "jaccard", "tversky", "focal_tversky", "generalized_dice", "cross_entropy", "bce", "dice_ce"]


def _inputs(seed=0, shape=(2, 3, 5, 4, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    return x, y


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("impl", ["native"])
def test_gradcheck_float64(name, impl):
    x, y = _inputs(shape=(2, 3, 3, 4))
    loss = get_loss(name, backend="torch", impl=impl)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("impl", ["native", "auto"])
def test_low_precision_inputs_accumulate_in_float32(name, dtype, impl):
    x, y = _inputs()
    reference = get_loss(name, backend="numpy")
    expected = float(reference(x.to(dtype).double().numpy(), y.numpy()))
    loss = get_loss(name, backend="torch", impl=impl)
    xd = x.to(dtype).requires_grad_(True)
    value = loss(xd, y)
    assert value.dtype == torch.float32
    value.backward()
    assert xd.grad is not None and xd.grad.dtype == dtype
    assert float(value) == pytest.approx(expected, rel=2e-5, abs=2e-6)


def test_fp16_large_sums_do_not_overflow():
    """segmentation_models.pytorch#463: Σp·g over 512² in fp16 overflowed to inf."""
    x = torch.full((2, 2, 512, 512), 4.0, dtype=torch.float16)
    y = torch.ones(2, 512, 512, dtype=torch.long)
    value = get_loss("dice", backend="torch")(x, y)
    assert torch.isfinite(value)


def test_autocast_cpu_bfloat16():
    x, y = _inputs()
    conv = torch.nn.Conv3d(3, 3, 1)
    loss = get_loss("dice_ce", backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x.float())
        assert out.dtype == torch.bfloat16
        value = loss(out, y)
    assert value.dtype == torch.float32
    value.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_module_behaviour_pickle_deepcopy_repr():
    loss = get_loss("dice", backend="torch", preset="nnunet", batch=True)
    assert isinstance(loss, torch.nn.Module)
    x, y = _inputs()
    again = pickle.loads(pickle.dumps(loss))
    twin = copy.deepcopy(loss)
    assert float(again(x, y)) == float(loss(x, y)) == float(twin(x, y))
    assert "dice" in repr(loss) and "impl='auto'" in repr(loss)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    x, y = _inputs(shape=(2, 3, 8, 8, 8))
    net = torch.nn.Conv3d(3, 3, 3, padding=1).double()
    loss = get_loss("dice_ce", backend="torch", preset="nnunet")
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    first = None
    for _ in range(20):
        opt.zero_grad()
        value = loss(net(x), y)
        value.backward()
        opt.step()
        first = float(value) if first is None else first
    assert float(value) < first


def test_reduction_none_shapes():
    x, y = _inputs()
    assert get_loss("dice", backend="torch", reduction="none")(x, y).shape == (2, 3)
    assert get_loss("dice", backend="torch", reduction="none", batch=True)(x, y).shape == (3,)
    assert get_loss("dice", backend="torch", reduction="none", include_background=False)(x, y).shape == (2, 2)
    assert get_loss("cross_entropy", backend="torch", reduction="per_sample")(x, y).shape == (2,)
    assert get_loss("cross_entropy", backend="torch", reduction="none")(x, y).shape == y.shape  # as torch
    assert get_loss("bce", backend="torch", reduction="none")(x, x.sigmoid()).shape == x.shape


def test_sum_of_none_equals_sum():
    x, y = _inputs()
    none = get_loss("dice", backend="torch", reduction="none")(x, y)
    total = get_loss("dice", backend="torch", reduction="sum")(x, y)
    assert float(none.sum()) == pytest.approx(float(total))


def test_mask_after_activation_differs_from_monai_masked_dice():
    """A masked-out voxel must not change the loss at all, whatever its logit."""
    x, y = _inputs()
    mask = torch.ones(2, 1, *x.shape[2:], dtype=torch.float64)
    mask[:, :, 0] = 0
    loss = get_loss("dice", backend="torch")
    x2 = x.clone()
    x2[:, :, 0] = 100.0 * torch.randn_like(x2[:, :, 0])
    assert float(loss(x, y, mask)) == pytest.approx(float(loss(x2, y, mask)), rel=1e-12)


def test_numpy_and_torch_agree_on_random_problem(rng):
    x = rng.normal(size=(2, 4, 6, 5, 4))
    y = rng.integers(0, 4, size=(2, 6, 5, 4))
    for name in LOSSES:
        ref = get_loss(name, backend="numpy", ignore_index=None)
        value, grad = ref.value_and_grad(x, y)
        xt = torch.tensor(x, requires_grad=True)
        got = get_loss(name, backend="torch")(xt, torch.from_numpy(y))
        got.backward()
        np.testing.assert_allclose(float(got), float(value), rtol=1e-12)
        np.testing.assert_allclose(xt.grad.numpy(), grad, atol=1e-13)

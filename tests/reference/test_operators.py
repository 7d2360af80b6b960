"""Losses defined by array-API code + operators: the tape's VJPs and the torch path agree."""

from __future__ import annotations

import array_api_compat.numpy as xnp
import numpy as np
import pytest
import torch

from segloss_core import LossSpec, get_loss, hookimpl, plugin_manager
from segloss_core.operators import ArrayOperators, TapeOperators
from segloss_core.reference.autodiff import TapeNamespace, gradients
from segloss_torch.voxelwise import TorchOperators


@pytest.mark.parametrize("spatial", [(7,), (5, 6), (4, 5, 3)])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_max_pool_matches_torch_value_and_gradient(spatial, kernel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, *spatial))
    weights = rng.normal(size=x.shape)
    tape = TapeNamespace(xnp)
    leaf = tape.variable(x)
    out = TapeOperators(tape).max_pool(leaf, kernel)
    (grad,) = gradients(tape.sum(out * weights), [leaf])
    xt = torch.tensor(x, requires_grad=True)
    ot = TorchOperators.max_pool(xt, kernel)
    (ot * torch.from_numpy(weights)).sum().backward()
    np.testing.assert_allclose(out.value, ot.detach().numpy())
    np.testing.assert_allclose(grad, xt.grad.numpy())
    np.testing.assert_allclose(ArrayOperators(xnp).min_pool(x, kernel), -TorchOperators.max_pool(-xt, kernel).detach())


def test_kernel_must_be_odd():
    with pytest.raises(ValueError, match="positive odd int"):
        ArrayOperators(xnp).max_pool(np.zeros((1, 1, 4)), 2)


def _soft_erode_dice(xp, ops, p, g, w, params):
    """A toy loss using operators: 1 − Dice between soft-eroded p and g (per class, mean)."""
    ep = ops.min_pool(p, 3)
    inter = xp.sum(ep * g * w, axis=tuple(range(2, p.ndim)))
    total = xp.sum(ep * w, axis=tuple(range(2, p.ndim))) + xp.sum(g * w, axis=tuple(range(2, p.ndim)))
    dice = (2.0 * inter + 1.0) / (total + 1.0)
    return xp.sum(1.0 - dice) / float(dice.shape[0] * dice.shape[1])


class ToyLossPlugin:
    @hookimpl
    def segloss_register_losses(self, register):
        from segloss_core.losses import common

        register(
            LossSpec(
                "toy_eroded_dice",
                "test",
                (common.ACTIVATION, common.IGNORE_INDEX),
                "1 − Dice(erode(p), g)",
                array_forward=_soft_erode_dice,
            )
        )


@pytest.fixture
def toy_loss():
    pm = plugin_manager()
    pm.register(ToyLossPlugin(), name="toy-loss")
    yield
    pm.unregister(name="toy-loss")


def test_array_forward_loss_runs_on_every_backend_with_operators(toy_loss):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 6, 5))
    y = rng.integers(0, 3, size=(2, 6, 5))
    y[0, 0] = 255
    ref = get_loss("toy_eroded_dice", backend="numpy", ignore_index=255)
    value, grad = ref.value_and_grad(x, y)
    xt = torch.tensor(x, requires_grad=True)
    got = get_loss("toy_eroded_dice", backend="torch", ignore_index=255)(xt, torch.from_numpy(y))
    got.backward()
    assert float(got) == pytest.approx(float(value), rel=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), grad, atol=1e-12)
    eps = 1e-6
    index = (1, 2, 3, 1)
    up, down = x.copy(), x.copy()
    up[index] += eps
    down[index] -= eps
    fd = (float(ref(up, y)) - float(ref(down, y))) / (2 * eps)
    assert grad[index] == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_conformance_covers_array_forward_losses(toy_loss):
    from segloss_core.conformance import check_backend

    report = check_backend("torch", losses=["toy_eroded_dice"])
    assert report.ok, str(report)
    assert len([o for o in report.outcomes if o.status == "pass"]) > 10

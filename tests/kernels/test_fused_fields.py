"""Field statistics in the fused kernels: Σ w·p·φ (boundary) and Σ w·(p − g)²·F (Hausdorff-DT).

Value and gradient against the float64 reference, fused against native, float64 gradcheck of the
hand-written backward with fields, the op with fields (opcheck), and one read of the logits for a
compound of a region and a distance loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from segloss_core import compound, get_loss
from segloss_core.statistics import fused_fields, fused_slot
from segloss_core.validation import validate_inputs

pytestmark = pytest.mark.usefixtures("fused_kernels")  # built at run time, never at collection

DISTANCE_LOSSES = ["boundary", "hausdorff_dt", "log_hausdorff_dt", "generalized_dice_boundary"]
IMPLS = ("native", "fused")


def _blobs(seed: int, shape=(2, 3, 9, 8, 5), dtype=torch.float64):
    """Logits and labels with a few connected objects per class (maps with real boundaries)."""
    g = torch.Generator().manual_seed(seed)
    batch, channels, *spatial = shape
    coarse = torch.randn(batch, channels, *(max(2, s // 3) for s in spatial), generator=g, dtype=torch.float64)
    smooth = torch.nn.functional.interpolate(
        coarse, size=spatial, mode="trilinear" if len(spatial) == 3 else "bilinear"
    )
    y = smooth.argmax(1)
    x = (smooth * 3 + torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return x, y


def _value_and_grad(loss, x, *args, **inputs):
    x = x.detach().clone().requires_grad_(True)
    value = loss(x, *args, **inputs)
    value.sum().backward()
    return value.detach(), x.grad


def _reference(name, x, y, mask=None, **params):
    loss = get_loss(name, backend="numpy", **params)
    value, grad = loss.value_and_grad(
        x.detach().double().numpy(), y.numpy(), None if mask is None else mask.double().numpy()
    )
    return float(value), np.asarray(grad)


def test_fused_fields_names_and_slots():
    assert fused_fields(["dice_pos"]) is None  # not a statistic of the kernels
    assert fused_fields(["field_sq_err_sum:w", "count"]) == {"field_sq_err_sum": "w"}
    assert fused_fields(["field_sq_err_sum:w", "field_sq_err_sum:v"]) is None
    assert (fused_slot("field_pred_sum:phi"), fused_slot("field_sq_err_sum:F"), fused_slot("count")) == (10, 11, 8)


@pytest.mark.parametrize("name", DISTANCE_LOSSES)
def test_auto_uses_the_fused_kernels(name):
    x, y = _blobs(0, dtype=torch.float32)
    loss = get_loss(name, backend="torch")
    prepared = validate_inputs(x, y, None, loss.plan, activation="softmax")
    assert loss.implementation(prepared) == "fused"


@pytest.mark.parametrize("name", DISTANCE_LOSSES)
@pytest.mark.parametrize("variant", ["labels", "ignore", "mask", "sigmoid", "spacing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_match_the_float64_reference(name, variant, dtype):
    x, y = _blobs(1, dtype=dtype)
    params: dict = {}
    mask = None
    if variant == "ignore":
        y = y.clone()
        y[:, :2] = 255
        params["ignore_index"] = 255
    elif variant == "mask":
        mask = torch.rand(2, 1, 9, 8, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    elif variant == "sigmoid":
        params["activation"] = "sigmoid"
    elif variant == "spacing":
        params["spacing"] = (0.8, 1.0, 2.5)
    loss = get_loss(name, backend="torch", impl="fused", **params)
    value, grad = _value_and_grad(loss, x, y, *(() if mask is None else (mask,)))
    ref_value, ref_grad = _reference(name, x, y, mask, **params)
    # the maps are exact to float32 rounding (the specs' tolerance_floor), so float64 agrees to ~1e-7
    rtol, atol = (1e-6, 1e-9) if dtype == torch.float64 else (2e-5, 2e-7)
    assert float(value) == pytest.approx(ref_value, rel=rtol, abs=atol)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("name", DISTANCE_LOSSES)
@pytest.mark.parametrize("variant", ["labels", "ignore", "sigmoid", "probabilities", "given_map"])
def test_gradcheck_of_the_fused_backward_with_fields(name, variant):
    """float64 gradcheck of the hand-written backward kernel through each distance formula."""
    x, y = _blobs(2, shape=(1, 3, 5, 4, 3))
    params: dict = {}
    inputs: dict = {}
    if variant == "ignore":
        y = y.clone()
        y[:, 0] = 255
        params["ignore_index"] = 255
    elif variant == "sigmoid":
        params["activation"] = "sigmoid"
    elif variant == "probabilities":
        x = torch.softmax(x, 1)
        params["activation"] = "none"
    elif variant == "given_map":
        if name not in ("boundary",):
            pytest.skip("a given map is the boundary loss's call input")
        inputs["distance_map"] = torch.randn(x.shape, dtype=torch.float64)
    loss = get_loss(name, backend="torch", impl="fused", **params)
    assert torch.autograd.gradcheck(lambda t: loss(t, y, **inputs), (x.requires_grad_(True),), eps=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(DISTANCE_LOSSES),
    channels=st.integers(1, 10),
    spatial=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    ignore=st.booleans(),
    include_background=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_native(name, channels, spatial, dtype, ignore, include_background, seed):
    g = torch.Generator().manual_seed(seed)
    activation = "sigmoid" if channels == 1 else "softmax"
    x = (torch.randn(2, channels, *spatial, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, 2 if channels == 1 else channels, (2, *spatial), generator=g)
    params = {"activation": activation, "include_background": include_background or channels == 1}
    if ignore:
        y = torch.where(torch.rand(y.shape, generator=g) < 0.2, torch.full_like(y, 255), y)
        params["ignore_index"] = 255
    native, fused = (_value_and_grad(get_loss(name, backend="torch", impl=i, **params), x, y) for i in IMPLS)
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (2e-5, 1e-6)
    torch.testing.assert_close(fused[0], native[0], rtol=rtol, atol=atol)  # value
    torch.testing.assert_close(fused[1], native[1], rtol=rtol * 10, atol=atol)  # gradient


def test_given_map_with_non_finite_values_at_ignored_voxels_adds_nothing():
    x, y = _blobs(4, dtype=torch.float32)
    y = y.clone()
    y[:, :3] = 255
    phi = torch.randn(x.shape)
    loss = get_loss("boundary", backend="torch", impl="fused", ignore_index=255)
    clean = _value_and_grad(loss, x, y, distance_map=phi)
    phi[:, :, :3] = float("nan")
    dirty = _value_and_grad(loss, x, y, distance_map=phi)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    native = _value_and_grad(get_loss("boundary", backend="torch", impl="native", ignore_index=255), x, y,
                             distance_map=phi.nan_to_num())  # fmt: skip
    torch.testing.assert_close(clean, native, rtol=1e-5, atol=1e-7)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "make",
    [
        lambda: get_loss("generalized_dice_boundary", backend="torch"),
        lambda: compound([("dice_ce", 1.0, {}), ("boundary", 0.05, {})], backend="torch"),
        lambda: compound([("dice", 1.0, {}), ("hausdorff_dt", 0.1, {})], backend="torch"),
    ],
)
def test_a_compound_reads_the_logits_once(make):
    """One forward and one backward kernel for the region and the distance terms together, and no
    softmax (or any other op of the logits' size) beside them."""
    x, y = _blobs(5, dtype=torch.float32)
    loss = make()
    x = x.requires_grad_(True)
    counter = _CountOps()
    with counter:
        value = loss(x, y)
        value.backward()
    assert counter.calls.count("segloss.region_stats") == 1, counter.calls
    assert counter.calls.count("segloss.region_stats_backward") == 1, counter.calls
    assert not any(name.startswith("aten._softmax") or name.startswith("aten._log_softmax") for name in counter.calls)


def test_opcheck_with_fields():
    x, y = _blobs(6, shape=(2, 3, 5, 4))
    phi, weight = torch.randn(x.shape, dtype=torch.float64), torch.rand(x.shape, dtype=torch.float64)
    args = (x.requires_grad_(True), y, None, None, 0, 0, False, False, False, None, phi, weight)
    torch.library.opcheck(torch.ops.segloss.region_stats.default, args)
    stats = torch.ops.segloss.region_stats(*args).detach()
    p = torch.softmax(x.detach(), 1)
    g = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).double()
    torch.testing.assert_close(stats[:, :, 10], (p * phi).sum((2, 3)))
    torch.testing.assert_close(stats[:, :, 11], ((p - g) ** 2 * weight).sum((2, 3)))
    without = torch.ops.segloss.region_stats(*args[:9]).detach()
    assert torch.equal(without[:, :, :10], stats[:, :, :10]) and not without[:, :, 10:].any()


def test_a_field_of_the_wrong_shape_is_refused_by_the_op():
    x, y = _blobs(7, shape=(2, 3, 5, 4))
    with pytest.raises(RuntimeError, match="field_pred must have the logits' shape"):
        torch.ops.segloss.region_stats(x, y, None, None, 0, 0, False, False, False, None, torch.zeros(2, 3, 5), None)


def test_nothing_of_size_bcn_but_the_field_is_saved_for_backward():
    x, y = _blobs(8, shape=(2, 4, 16, 16, 8), dtype=torch.float32)
    phi = torch.randn(x.shape)
    x.requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = get_loss("boundary", backend="torch")(x, y, distance_map=phi)
    big = [t for t in saved if t.numel() >= x.numel() // 4]
    assert all(t.data_ptr() in (x.data_ptr(), y.data_ptr(), phi.data_ptr()) for t in big), [t.shape for t in big]
    value.backward()

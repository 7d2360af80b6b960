"""The fused C++ kernels (CPU here; CUDA in tests/gpu): values, hand-written backward, compile, safety."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segloss_core import get_loss
from segloss_torch import fused

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("fused_kernels")  # built at run time, never at collection

FUSED_LOSSES = ["dice", "jaccard", "tversky", "focal_tversky", "generalized_dice", "cross_entropy", "dice_ce"]


def _problem(seed=0, shape=(2, 3, 5, 4, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    return x, y


def _value_and_grad(loss, x, *args):
    x = x.detach().clone().requires_grad_(True)
    value = loss(x, *args)
    value.sum().backward()
    return value.detach(), x.grad


def test_fused_is_used_by_default():
    x, y = _problem()
    loss = get_loss("dice_ce", backend="torch")
    from segloss_core.validation import validate_inputs

    assert loss.implementation(validate_inputs(x, y, None, loss.plan)) == "fused"


@pytest.mark.parametrize("name", FUSED_LOSSES)
@pytest.mark.parametrize(
    "variant", ["labels", "ignore", "mask", "soft", "sigmoid", "sigmoid-binary", "probabilities", "uint8"]
)
def test_gradcheck_fused_backward(name, variant):
    """float64 gradcheck of the hand-written backward kernel (through every formula)."""
    x, y = _problem(shape=(2, 3, 3, 4))
    params: dict = {}
    args = _label_variant(variant, y, params, ignore=255)
    if variant == "soft":
        t = torch.rand(2, 3, 3, 4, dtype=torch.float64)
        args = (t / t.sum(1, keepdim=True),)
    elif variant == "sigmoid":
        params["activation"] = "sigmoid"
    elif variant == "sigmoid-binary":
        x, y = x[:, :1].contiguous(), (y > 0).long()
        params["activation"] = "sigmoid"
        args = (y,)
    elif variant == "probabilities":
        x = torch.softmax(x, 1)
        params["activation"] = "none"
    if name == "cross_entropy" and variant == "probabilities":
        pytest.skip("covered by the conformance suite (1/p gradients are ill-conditioned for gradcheck)")
    _gradcheck(get_loss(name, backend="torch", impl="fused", **params), x, args)


def _label_variant(variant: str, y: torch.Tensor, params: dict, ignore: int) -> tuple:
    """The call arguments of a gradcheck variant on labels (B, 3, 4): ignored voxels (ignore_index set in
    ``params``), a voxel mask, uint8 labels, or the labels as given."""
    if variant == "ignore":
        y = y.clone()
        y[:, 0] = ignore
        params["ignore_index"] = ignore
    elif variant == "mask":
        return (y, torch.rand(2, 1, 3, 4, dtype=torch.float64))
    elif variant == "uint8":
        return (y.to(torch.uint8),)
    return (y,)


def _gradcheck(loss, x: torch.Tensor, args: tuple) -> None:
    assert torch.autograd.gradcheck(lambda t: loss(t, *args), (x.requires_grad_(True),), eps=1e-6, atol=1e-6)


@given(
    name=st.sampled_from(FUSED_LOSSES),
    batch=st.booleans(),
    include_background=st.booleans(),
    channels=st.integers(1, 17),
    spatial=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    ignore=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_native(name, batch, include_background, channels, spatial, dtype, ignore, seed):
    g = torch.Generator().manual_seed(seed)
    activation = "sigmoid" if channels == 1 else "softmax"
    x = torch.randn(2, channels, *spatial, generator=g, dtype=torch.float64).to(dtype) * 3
    high = 2 if channels == 1 else channels
    y = torch.randint(0, high, (2, *spatial), generator=g)
    params = {"activation": activation}
    if ignore:
        y = torch.where(torch.rand(y.shape, generator=g) < 0.2, torch.full_like(y, 255), y)
        params["ignore_index"] = 255
    if name not in ("cross_entropy",):
        params["include_background"] = include_background
        if name != "generalized_dice":
            params["batch"] = batch
    _assert_fused_matches_native(name, params, x, y)


def _assert_fused_matches_native(name: str, params: dict, x: torch.Tensor, y: torch.Tensor) -> None:
    v_native, g_native = _value_and_grad(get_loss(name, backend="torch", impl="native", **params), x, y)
    v_fused, g_fused = _value_and_grad(get_loss(name, backend="torch", impl="fused", **params), x, y)
    rtol, atol = (1e-12, 1e-14) if x.dtype == torch.float64 else (2e-5, 1e-6)
    torch.testing.assert_close(v_fused, v_native, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_fused, g_native, rtol=rtol * 10, atol=atol)


def test_opcheck():
    x, y = _problem()
    args = (x.requires_grad_(True), y, None, None, 0, 0, False, False, False)
    torch.library.opcheck(torch.ops.segloss.region_stats.default, args)
    t = torch.softmax(x.detach(), 1)
    torch.library.opcheck(torch.ops.segloss.region_stats.default, (x, None, t, None, 1, 0, False, True, False))


@pytest.mark.parametrize("name", ["dice", "dice_ce", "generalized_dice", "dice_ce-regions"])
def test_torch_compile_fullgraph(name):
    x, y = _problem(shape=(2, 4, 6, 5, 4), dtype=torch.float32)
    if name == "dice_ce-regions":  # the membership table a constant of the graph
        x, y = _region_problem(spatial=(6, 5, 4))
        x = x.float()
        params = {"preset": "nnunet_regions", "regions": BRATS, "ignore_index": 9}
        loss = get_loss("dice_ce", backend="torch", impl="fused", **params)
    else:
        loss = get_loss(name, backend="torch", impl="fused", preset="nnunet" if name != "generalized_dice" else None)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    v_eager, g_eager = _value_and_grad(loss, x, y)
    v_comp, g_comp = _value_and_grad(compiled, x, y)
    torch.testing.assert_close(v_comp, v_eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_torch_compile_inductor_cpu():
    if shutil.which("g++") is None:
        pytest.skip("inductor needs a C++ compiler")
    x, y = _problem(shape=(2, 3, 8, 8), dtype=torch.float32)
    loss = get_loss("dice_ce", backend="torch", impl="fused")
    compiled = torch.compile(loss, fullgraph=True)
    v_eager, g_eager = _value_and_grad(loss, x, y)
    v_comp, g_comp = _value_and_grad(compiled, x, y)
    torch.testing.assert_close(v_comp, v_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-7)


def test_out_of_range_labels_under_compile_raise_in_the_kernel():
    x, y = _problem(shape=(1, 3, 4, 4), dtype=torch.float32)
    y[0, 0, 0] = 7
    y[0, 1, :2] = -2
    y[0, 2, 3] = 255  # the ignore label is not an offender
    loss = torch.compile(
        get_loss("dice", backend="torch", impl="fused", ignore_index=255), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(RuntimeError, match=r"labels outside \[0, 3\) or ignore_index=255: -2, 7 \(3 voxel\(s\)\)"):
        loss(x, y)


def test_deterministic_bitwise_across_runs_and_threads():
    x, y = _problem(shape=(2, 5, 40, 40, 24), dtype=torch.float32)
    loss = get_loss("dice_ce", backend="torch", impl="fused")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            results.append(_value_and_grad(loss, x, y))
    finally:
        torch.set_num_threads(threads)
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0])
        assert torch.equal(grad, results[0][1])


def test_works_under_use_deterministic_algorithms():
    x, y = _problem(dtype=torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        value, grad = _value_and_grad(get_loss("dice_ce", backend="torch", impl="fused"), x, y)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_non_contiguous_inputs():
    x, y = _problem(shape=(2, 3, 6, 5, 4), dtype=torch.float64)
    x_nc = x.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)  # same values, other strides
    assert not x_nc.is_contiguous()
    y_nc = y.transpose(1, 2).contiguous().transpose(1, 2)
    loss = get_loss("dice_ce", backend="torch", impl="fused")
    v1, g1 = _value_and_grad(loss, x, y)
    v2, g2 = _value_and_grad(loss, x_nc, y_nc)
    torch.testing.assert_close(v2, v1, rtol=0, atol=0)
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)


def test_nothing_of_size_bcn_is_saved_for_backward():
    x, y = _problem(shape=(2, 4, 16, 16, 8), dtype=torch.float32)
    x.requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = get_loss("dice_ce", backend="torch", impl="fused")(x, y)
    big = [t for t in saved if t.numel() >= x.numel() // 4]
    assert all(t.data_ptr() in (x.data_ptr(), y.data_ptr()) for t in big), [t.shape for t in big]
    value.backward()


def test_fused_request_that_cannot_be_served_is_refused_early():
    with pytest.raises(ValueError, match=r"impl='fused' cannot compute loss 'focal'.*native only"):
        get_loss("focal", backend="torch", impl="fused")
    # auto falls back to native for it, silently and correctly
    x, y = _problem(dtype=torch.float32)
    assert torch.isfinite(get_loss("focal", backend="torch")(x, y))


def test_per_class_mask_falls_back_to_native():
    x, y = _problem()
    mask = torch.rand(2, 3, 5, 4, 3, dtype=torch.float64)
    auto = get_loss("dice", backend="torch")
    native = get_loss("dice", backend="torch", impl="native")
    torch.testing.assert_close(auto(x, y, mask), native(x, y, mask))
    with pytest.raises(ValueError, match="per-class masks"):
        get_loss("dice", backend="torch", impl="fused")(x, y, mask)


def test_status_is_reported():
    from segloss_core import describe

    assert fused.status_line().startswith("active (CPU")
    assert "fused: active" in describe("dice").backends["torch"]


# ---------------------------------------------------------------------------------------------------------
# region-based training (regions=): the targets come from a membership table inside the kernels
# ---------------------------------------------------------------------------------------------------------
BRATS = ((1, 2, 3), (2, 3), (3,))
REGION_LOSSES = ["dice", "jaccard", "tversky", "generalized_dice", "bce", "dice_ce"]


def _region_params(name, **extra):
    return {**({} if name == "bce" else {"activation": "sigmoid"}), **extra}


def _region_problem(seed=0, spatial=(3, 4), batch=2, labels=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *spatial, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, labels, (batch, *spatial), generator=g)
    return x, y


@pytest.mark.parametrize("name", REGION_LOSSES)
@pytest.mark.parametrize("variant", ["labels", "ignore", "mask", "uint8", "probabilities"])
def test_gradcheck_fused_backward_regions(name, variant):
    """float64 gradcheck of the backward kernel with region targets (sigmoid, or probabilities)."""
    x, y = _region_problem()
    params = _region_params(name, regions=BRATS)
    args = _label_variant(variant, y, params, ignore=9)
    if variant == "probabilities":
        if name in ("bce", "dice_ce"):
            pytest.skip("1/p gradients are ill-conditioned for gradcheck (the conformance suite covers them)")
        x = torch.sigmoid(x)
        params["activation"] = "none"
    _gradcheck(get_loss(name, backend="torch", impl="fused", **params), x, args)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from([*REGION_LOSSES, "focal_tversky"]),
    batch_dice=st.booleans(),
    regions=st.sampled_from([BRATS, ((1,), (2,), (1, 2)), ((0, 5), (3,), (1, 2, 4)), ((2,), (0,), (7, 1))]),
    spatial=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    ignore=st.sampled_from(["none", "some", "all"]),
    label_type=st.sampled_from([torch.int64, torch.int32, torch.uint8]),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_native_regions(name, batch_dice, regions, spatial, dtype, ignore, label_type, seed):
    """Fused CPU kernels vs the native path with region targets: empty regions, every voxel ignored, labels in no
    region, the three label types."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, len(regions), *spatial, generator=g, dtype=torch.float64).to(dtype) * 3
    top = max(max(r) for r in regions)
    y = torch.randint(0, top + 1, (2, *spatial), generator=g)
    params = _region_params(name, regions=regions)
    if ignore != "none":
        ignored = torch.rand(y.shape, generator=g) < 0.3 if ignore == "some" else torch.ones(y.shape, dtype=torch.bool)
        y = torch.where(ignored, torch.full_like(y, 200), y)
        params["ignore_index"] = 200
    if name not in ("bce", "generalized_dice"):
        params["batch"] = batch_dice
    y = y.to(label_type)
    _assert_fused_matches_native(name, params, x, y)


def test_fused_regions_match_the_reference():
    import numpy as np

    x, y = _region_problem(seed=3, spatial=(7, 6, 5))
    y[0][y[0] == 3] = 2  # region (3,) empty in sample 0
    fused_loss = get_loss("dice_ce", backend="torch", impl="fused", preset="nnunet_regions", regions=BRATS)
    assert fused_loss.implementation(None) == "fused"
    value, grad = _value_and_grad(fused_loss, x, y)
    ref_value, ref_grad = get_loss("dice_ce", backend="numpy", preset="nnunet_regions", regions=BRATS).value_and_grad(
        x.numpy(), y.numpy()
    )
    np.testing.assert_allclose(value.numpy(), ref_value, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-14)


def test_region_labels_beyond_the_table_raise_in_the_kernel():
    """Under torch.compile the label check moves into the kernel: a label beyond the table (or negative) is
    counted, never used as an index, and the op raises naming it."""
    x, y = _region_problem(spatial=(4, 4))
    x = x.float()
    y[0, 0, 0] = 4
    y[1, 1, :2] = -3
    y[1, 2, 2] = 255  # ignore_index: not an offender
    loss = get_loss("dice", backend="torch", impl="fused", activation="sigmoid", regions=BRATS, ignore_index=255)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"labels outside \[0, 4\) or ignore_index=255: -3, 4 \(3 voxel\(s\)\)"):
        compiled(x, y)
    eager = get_loss("dice", backend="torch", impl="fused", activation="sigmoid", regions=BRATS, ignore_index=255)
    with pytest.raises(ValueError, match=r"labels outside \[0, 4\)"):
        eager(x, y)  # checked before any kernel runs


def test_opcheck_regions():
    x, y = _region_problem()
    table = torch.tensor([0, 1, 3, 7])
    args = (x.requires_grad_(True), y, None, None, 1, 0, False, True, False, table)
    torch.library.opcheck(torch.ops.segloss.region_stats.default, args)


def test_nothing_of_size_bcn_is_saved_for_backward_regions():
    x, y = _region_problem(spatial=(16, 16, 8))
    x = x.float().requires_grad_(True)
    saved: list[torch.Tensor] = []
    loss = get_loss("dice_ce", backend="torch", impl="fused", preset="nnunet_regions", regions=BRATS)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = loss(x, y)
    big = [t for t in saved if t.numel() >= x.numel() // 4]
    assert all(t.data_ptr() in (x.data_ptr(), y.data_ptr()) for t in big), [t.shape for t in big]
    value.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["labels", "soft", "sigmoid"])
def test_low_precision_is_float32_on_the_same_values_rounded_once(dtype, variant):
    """float16/bfloat16 logits: the kernels convert them to float32 (vectorised), accumulate in float32
    and round the gradient once to the logits' dtype, so statistics and gradient equal the float32 run
    on the upcast logits (gradient rounded to nearest even), bit for bit; 131 voxels: a ragged tile."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 3, 131, generator=g) * 4).to(dtype)
    x[0, 1, :5] = torch.tensor([0.0, -0.0, 65504.0 if dtype == torch.float16 else 1e30, -30.0, 1e-7]).to(dtype)
    labels = torch.randint(0, 3, (2, 131), generator=g)
    target = torch.softmax(torch.randn(2, 3, 131, generator=g), 1).to(dtype)
    act = {"labels": 0, "soft": 0, "sigmoid": 1}[variant]
    lab, tgt = (labels, None) if variant != "soft" else (None, target)

    def run(z, t):
        z = z.clone().requires_grad_(True)
        stats = torch.ops.segloss.region_stats(z, lab, t, None, act, 0, False, act == 1, False)
        upstream = torch.linspace(-1, 1, stats.numel()).view_as(stats)
        (grad,) = torch.autograd.grad((stats * upstream).sum(), z)
        return stats, grad

    stats, grad = run(x, tgt)
    stats32, grad32 = run(x.float(), None if tgt is None else tgt.float())
    assert grad.dtype == dtype and stats.dtype == torch.float32
    torch.testing.assert_close(stats, stats32, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad32.to(dtype), rtol=0, atol=0)

"""Every ``torch.ops.segloss`` op passes ``torch.library.opcheck`` (schema, fake kernel, autograd
registration, dispatch under FakeTensor and functionalization) on the CPU kernels."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_opcheck_softmax_prediction_labels():
    x, _ = _problem(shape=(2, 3, 6, 5))
    torch.library.opcheck(torch.ops.segloss.softmax_prediction_labels.default, (x, 0.5))
    out = torch.ops.segloss.softmax_prediction_labels(x, 0.5)
    assert out.shape == (2, 6, 5) and out.dtype == torch.uint8


def _thresholded_argmax(x, threshold):
    """The definition in float64: the class whose softmax probability exceeds the threshold (the
    largest, unique for a threshold >= 1/2), else C."""
    p = torch.softmax(x.double(), 1)
    largest, label = p.max(1)
    return torch.where(largest > threshold, label, x.shape[1]).to(torch.uint8)


@given(
    st.integers(0, 2**16),
    st.integers(1, 6),
    st.sampled_from(["ties", "normal", "large"]),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    st.sampled_from([0.5, 0.6, 0.9, 0.999]),
    st.sampled_from([(7,), (5, 3), (4, 3, 5), (1, 1, 1)]),
)
@settings(deadline=None, max_examples=60)
def test_softmax_prediction_labels_is_the_thresholded_softmax(seed, channels, logits, dtype, threshold, spatial):
    """Against the float64 softmax: tied largest logits (integers in {−1, 0, 1}: p ≤ 1/2, no class),
    ordinary and large logits (exp(z − max) underflows), every dtype, 1 to 3 spatial dims."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, channels, *spatial)
    if logits == "ties":
        x = torch.randint(-1, 2, shape, generator=g).double()
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (3.0 if logits == "normal" else 200.0)
    x = x.to(dtype)
    got = torch.ops.segloss.softmax_prediction_labels(x, threshold)
    expected = _thresholded_argmax(x, threshold)
    p = torch.softmax(x.double(), 1).max(1).values
    near = (p - threshold).abs() < 1e-5  # within float32 rounding of the threshold: either answer
    assert torch.equal(got[~near], expected[~near])


def test_softmax_prediction_labels_edge_cases():
    x = torch.zeros(1, 3, 4)
    x[0, 1, 0] = 5.0
    x[0, 2, 1] = float("nan")
    x[0, :, 2] = torch.tensor([1.0, 1.0, -50.0])  # two tied: 1/2 each, not above 1/2
    x[0, 0, 3] = 1e4  # one huge logit: p = 1
    assert torch.ops.segloss.softmax_prediction_labels(x, 0.5).tolist() == [[1, 3, 3, 0]]
    one = torch.randn(2, 1, 3, 3)  # a single class: p = 1 everywhere
    assert torch.ops.segloss.softmax_prediction_labels(one, 0.9).eq(0).all()
    strided = torch.randn(2, 5, 4, 3).transpose(2, 3)  # non-contiguous input
    assert torch.equal(torch.ops.segloss.softmax_prediction_labels(strided, 0.5), _thresholded_argmax(strided, 0.5))
    with pytest.raises(RuntimeError, match="255 classes"):
        torch.ops.segloss.softmax_prediction_labels(torch.zeros(1, 256, 2), 0.5)
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.segloss.softmax_prediction_labels(torch.zeros(1, 2, 2, dtype=torch.long), 0.5)

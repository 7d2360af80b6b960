"""The native statistics Function (segloss_torch.native.ChunkedStatistics): chunk by chunk over the
voxels, forward and hand-written VJP from the statistics table, equal to the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segloss_core import get_loss
from segloss_core import statistics as stat_names
from segloss_core.reference import statistics as reference_statistics
from segloss_core.validation import PreparedInputs
from segloss_torch import native

SOFTMAX_STATS = (
    "intersection",
    "pred_sum",
    "target_sum",
    "pred_sq_sum",
    "target_sq_sum",
    "abs_diff_sum",
    "count",
    "ce_pos",
    "neg_log_pred_sum",
    "focal_pos:2.0",
    "focal_pos:0.5",
    "field_pred_sum:phi",
    "field_sq_err_sum:phi",
)
SIGMOID_STATS = (*SOFTMAX_STATS, "ce_neg", "neg_log_1mp_sum", "focal_neg:2.0", "focal_neg:0.5")

# (activation, target form): labels, labels with an ignore label, soft targets, a per-class mask
CASES = [
    ("softmax", "labels"),
    ("softmax", "ignore"),
    ("softmax", "soft"),
    ("softmax", "class_mask"),
    ("softmax", "mask"),
    ("sigmoid", "soft"),
    ("sigmoid", "labels"),
    ("none", "soft"),
]


def _prepared(activation: str, form: str, seed: int = 0, shape=(2, 3, 5, 7)) -> PreparedInputs:
    g = torch.Generator().manual_seed(seed)
    batch, channels, *spatial = shape
    z = torch.randn(*shape, generator=g, dtype=torch.float64)
    if activation == "none":
        z = torch.softmax(z, 1) * 0.9 + 0.05  # probabilities away from 0 and 1
    labels = target = mask = None
    ignore = None
    if activation == "sigmoid" and form == "labels":
        shape = (batch, 1, *spatial)
        z = z[:, :1].contiguous()
        channels = 1
    if form in ("labels", "ignore", "class_mask", "mask"):
        labels = torch.randint(0, channels if channels > 1 else 2, (batch, *spatial), generator=g)
    if form == "ignore":
        ignore = 255
        labels[torch.rand(labels.shape, generator=g) < 0.3] = 255
    if form == "soft":
        target = torch.rand(shape, generator=g, dtype=torch.float64)
    if form == "mask":
        mask = (torch.rand((batch, 1, *spatial), generator=g) < 0.7).double()
    if form == "class_mask":
        mask = torch.rand((batch, channels, *spatial), generator=g, dtype=torch.float64)
    phi = torch.randn(z.shape, generator=g, dtype=torch.float64)
    return PreparedInputs(
        pred=z,
        labels=labels,
        target=target,
        mask=mask,
        num_classes=channels,
        ignore_index=ignore,
        activation=activation,
        fields={"phi": phi},
    )


def _names(activation: str) -> tuple[str, ...]:
    return SOFTMAX_STATS if activation == "softmax" else SIGMOID_STATS


def _to_numpy(prepared: PreparedInputs) -> PreparedInputs:
    def np_(t):
        return None if t is None else t.detach().numpy()

    return PreparedInputs(
        pred=np_(prepared.pred),
        labels=np_(prepared.labels),
        target=np_(prepared.target),
        mask=np_(prepared.mask),
        num_classes=prepared.num_classes,
        ignore_index=prepared.ignore_index,
        activation=prepared.activation,
        fields={k: np_(v) for k, v in prepared.fields.items()},
    )


@pytest.fixture
def small_chunks(monkeypatch):
    """A few voxels per chunk, so every test crosses chunk boundaries (and a ragged last chunk)."""
    monkeypatch.setattr(native, "MIN_CHUNK_VOXELS", 1)
    monkeypatch.setitem(native.CHUNK_ELEMENTS, "cpu", 2 * 3 * 4)


@pytest.mark.parametrize(("activation", "form"), CASES)
def test_values_and_vjp_equal_the_float64_reference(activation, form, small_chunks):
    prepared = _prepared(activation, form)
    names = _names(activation)
    z = prepared.pred.clone().requires_grad_(True)
    stats = native.compute_statistics(PreparedInputs(**{**prepared.__dict__, "pred": z}), names)
    expected, vjp = reference_statistics.compute(_to_numpy(prepared), names)
    g = torch.Generator().manual_seed(1)
    upstream = {name: torch.randn(stats[name].shape, generator=g, dtype=torch.float64) for name in names}
    for name in names:
        np.testing.assert_allclose(stats[name].detach().numpy(), expected[name], rtol=1e-12, atol=1e-12, err_msg=name)
    total = sum((stats[name] * upstream[name]).sum() for name in names)
    (grad,) = torch.autograd.grad(total, z)
    expected_grad = vjp({name: u.numpy() for name, u in upstream.items()})
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("activation", "form"), CASES)
def test_gradcheck_float64(activation, form):
    prepared = _prepared(activation, form, shape=(2, 3, 3, 4))
    names = tuple(sorted(_names(activation)))
    labels = None if prepared.labels is None else prepared.labels.reshape(2, -1)
    channels = prepared.num_classes
    target = None if prepared.target is None else prepared.target.reshape(2, channels, -1)
    mask = None if prepared.mask is None else prepared.mask.reshape(2, prepared.mask.shape[1], -1)
    phi = prepared.fields["phi"].reshape(2, channels, -1)
    for label_path in (False, True) if form in ("labels", "ignore", "mask") and activation == "softmax" else (False,):
        chosen = tuple(n for n in names if not label_path or not n.startswith("field_"))
        layout = native.Layout(chosen, activation, channels, prepared.ignore_index, None, ("phi",), 5, label_path)
        z = prepared.pred.reshape(2, channels, -1).clone().requires_grad_(True)

        def statistics(t, layout=layout):
            return native.ChunkedStatistics.apply(layout, t, labels, target, mask, phi)

        assert torch.autograd.gradcheck(statistics, (z,), eps=1e-6, atol=1e-7, fast_mode=True)


LABEL_STATS = tuple(sorted(n for n in SOFTMAX_STATS if not n.startswith("field_")))


@pytest.mark.parametrize("form", ["labels", "ignore", "mask"])
@pytest.mark.parametrize(
    "names",
    [LABEL_STATS, ("ce_pos", "intersection", "pred_sum", "target_sum"), ("count", "focal_pos:0.5", "focal_pos:2.0")],
    ids=["all", "dice_ce", "focal"],
)
def test_label_path_equals_the_one_hot_path(form, names, small_chunks):
    """Forward (the one-hot split) and backward (the closed-form softmax VJP from the split) of the
    label path equal the one-hot path's, float64, values and VJP for a random upstream."""
    prepared = _prepared("softmax", form)
    labels = prepared.labels.reshape(2, -1)
    mask = None if prepared.mask is None else prepared.mask.reshape(2, 1, -1)
    upstream = torch.randn(2, 3, len(names), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for path in (False, True):
        z = prepared.pred.reshape(2, 3, -1).clone().requires_grad_(True)
        layout = native.Layout(names, "softmax", 3, prepared.ignore_index, None, (), 4, path)
        stats = native.ChunkedStatistics.apply(layout, z, labels, None, mask)
        (grad,) = torch.autograd.grad((stats * upstream).sum(), z)
        results.append((stats.detach(), grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_label_path_low_precision_equals_float64(dtype, small_chunks):
    """The label path in low precision: statistics and VJP accumulate in float32, the gradient is
    written once in the logits' dtype (one rounding: within a few of its units in the last place)."""
    prepared = _prepared("softmax", "ignore", shape=(2, 3, 6, 7))
    labels = prepared.labels.reshape(2, -1)
    z64 = prepared.pred.reshape(2, 3, -1)
    upstream = torch.randn(2, 3, len(LABEL_STATS), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    layout = native.Layout(LABEL_STATS, "softmax", 3, 255, None, (), 4, True)
    results = []
    for z in (z64.to(dtype), z64.to(dtype).double()):
        z = z.clone().requires_grad_(True)
        stats = native.ChunkedStatistics.apply(layout, z, labels, None, None)
        (grad,) = torch.autograd.grad((stats * upstream.to(stats.dtype)).sum(), z)
        assert grad.dtype == z.dtype
        results.append((stats.double(), grad.double()))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2 * eps, atol=1e-6)


def test_chunk_rule():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert native.chunk_voxels(2, 4, 128**3, cpu) == (1 << 18) // 8  # 1 MiB per float32 temporary
    # bfloat16 logits: a float32 temporary at most 1/32 of the logits' bytes, 2^17 elements
    assert native.chunk_voxels(1, 4, 128**3, cpu, torch.bfloat16) == (1 << 17) // 4
    assert native.chunk_voxels(1, 4, 128**3, cpu, torch.float64) == (1 << 18) // 4
    assert native.chunk_voxels(2, 4, 128**3, gpu) == (1 << 20) // 8  # the device minimum
    assert native.chunk_voxels(1, 14, 256**3, gpu) == (1 << 22) // 14  # the device budget
    assert native.chunk_voxels(1, 2, 100, cpu) == 100  # one chunk
    assert native.chunk_voxels(8, 1000, 10**6, cpu) == native.MIN_CHUNK_VOXELS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_gradient_in_the_input_dtype(dtype, small_chunks):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 5, generator=g).to(dtype)
    y = torch.randint(0, 4, (2, 6, 5), generator=g)
    loss = get_loss("dice_ce", backend="torch", impl="native")
    xd = x.clone().requires_grad_(True)
    loss(xd, y).backward()
    x64 = x.double().requires_grad_(True)
    loss(x64, y).backward()
    assert xd.grad.dtype == dtype
    torch.testing.assert_close(xd.grad.double(), x64.grad, rtol=2e-2, atol=2e-4)


@pytest.mark.parametrize("name", ["dice", "dice_ce", "generalized_dice", "bce", "focal", "tversky"])
def test_torch_compile_fullgraph(name, small_chunks):
    g = torch.Generator().manual_seed(4)
    channels = 1 if name == "bce" else 3
    x = torch.randn(2, channels, 6, 5, generator=g)
    y = torch.randint(0, 2 if channels == 1 else 3, (2, 6, 5), generator=g)
    loss = get_loss(name, backend="torch", impl="native")
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")

    def value_and_grad(fn):
        xd = x.clone().requires_grad_(True)
        value = fn(xd, y)
        value.backward()
        return value.detach(), xd.grad

    v_eager, g_eager = value_and_grad(loss)
    v_comp, g_comp = value_and_grad(compiled)
    torch.testing.assert_close(v_comp, v_eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_every_table_statistic_is_covered():
    bases = {stat_names.parse(n)[0] for n in SIGMOID_STATS}
    assert bases == set(stat_names.TABLE)

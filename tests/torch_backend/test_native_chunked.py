"""The native statistics Function (segloss_torch.native.ChunkedStatistics): chunk by chunk over the
voxels, forward and hand-written VJP from the statistics table, equal to the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segloss_core import get_loss
from segloss_core import statistics as stat_names
from segloss_core.reference import statistics as reference_statistics
from segloss_core.regions import region_targets as reference_region_targets
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
        layout = native.Layout(names, activation, channels, prepared.ignore_index, None, ("phi",), 5, label_path)
        z = prepared.pred.reshape(2, channels, -1).clone().requires_grad_(True)

        def statistics(t, layout=layout):
            return native.ChunkedStatistics.apply(layout, t, labels, target, mask, phi)

        assert torch.autograd.gradcheck(statistics, (z,), eps=1e-6, atol=1e-7, fast_mode=True)


LABEL_STATS = tuple(sorted(SOFTMAX_STATS))
BOUNDARY_STATS = ("count", "field_pred_sum:phi")  # what boundary reads
HAUSDORFF_STATS = ("count", "field_sq_err_sum:phi")


@pytest.mark.parametrize("form", ["labels", "ignore", "mask"])
@pytest.mark.parametrize(
    "names",
    [
        LABEL_STATS,
        ("ce_pos", "intersection", "pred_sum", "target_sum"),
        ("count", "focal_pos:0.5", "focal_pos:2.0"),
        BOUNDARY_STATS,
        HAUSDORFF_STATS,
        ("field_pred_sum:phi", "field_sq_err_sum:psi", "intersection", "pred_sum", "target_sum"),
    ],
    ids=["all", "dice_ce", "focal", "boundary", "hausdorff", "dice_and_two_fields"],
)
def test_label_path_equals_the_one_hot_path(form, names, small_chunks):
    """Forward (the one-hot split) and backward (the closed-form softmax VJP from the split) of the
    label path equal the one-hot path's, float64, values and VJP for a random upstream (the field
    statistics from the table's split too, their field read at each voxel's label)."""
    prepared = _prepared("softmax", form)
    labels = prepared.labels.reshape(2, -1)
    mask = None if prepared.mask is None else prepared.mask.reshape(2, 1, -1)
    phi = prepared.fields["phi"].reshape(2, 3, -1)
    fields = tuple(sorted({stat_names.parse(n)[1] for n in names if n.startswith("field_")}))
    tensors = [{"phi": phi, "psi": phi.flip(-1) ** 2}[name] for name in fields]
    upstream = torch.randn(2, 3, len(names), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for path in (False, True):
        z = prepared.pred.reshape(2, 3, -1).clone().requires_grad_(True)
        layout = native.Layout(names, "softmax", 3, prepared.ignore_index, None, fields, 4, path)
        stats = native.ChunkedStatistics.apply(layout, z, labels, None, mask, *tensors)
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
    phi = prepared.fields["phi"].reshape(2, 3, -1).float()  # a float32 field, as signed_distance_map's
    layout = native.Layout(LABEL_STATS, "softmax", 3, 255, None, ("phi",), 4, True)
    results = []
    for z in (z64.to(dtype), z64.to(dtype).double()):
        z = z.clone().requires_grad_(True)
        stats = native.ChunkedStatistics.apply(layout, z, labels, None, None, phi)
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


def test_boundary_and_hausdorff_take_the_label_path(monkeypatch):
    """Softmax with integer labels: boundary's and Hausdorff-DT's statistics run without a one-hot
    (the label path), and region targets are never one (sigmoid: the dense path)."""
    layouts = []
    apply = native.ChunkedStatistics.apply
    monkeypatch.setattr(
        native.ChunkedStatistics, "apply", lambda layout, *t: layouts.append(layout) or apply(layout, *t)
    )
    x, y = torch.randn(2, 3, 6, 5), torch.randint(0, 3, (2, 6, 5))
    phi = torch.randn(2, 3, 6, 5)
    get_loss("boundary", backend="torch", impl="native")(x, y, distance_map=phi)
    get_loss("hausdorff_dt", backend="torch", impl="native", ignore_index=7)(x, y)
    get_loss("dice_ce", backend="torch", impl="native", preset="nnunet_regions", regions=((1, 2), (2,)))(x[:, :2], y)
    assert [layout.label_path for layout in layouts] == [True, True, False]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 3),
    channels=st.integers(2, 4),
    voxels=st.integers(1, 40),
    ignored=st.sampled_from(["none", "some", "all"]),
    absent=st.booleans(),
    names=st.sampled_from([BOUNDARY_STATS, HAUSDORFF_STATS, (*BOUNDARY_STATS, "field_sq_err_sum:psi")]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
)
def test_field_label_path_equals_float64_one_hot_path(seed, batch, channels, voxels, ignored, absent, names, dtype):
    """Field statistics on the label path against the float64 one-hot path on the same (rounded)
    logits, in any chunking: every voxel ignored, classes absent from the labels, low precision
    (statistics in float32, the gradient rounded once into the logits' dtype)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, channels, voxels, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, channels, (batch, voxels), generator=g)
    if absent:
        labels[labels == channels - 1] = 0  # the last class in no sample
    if ignored == "some":
        labels[torch.rand(labels.shape, generator=g) < 0.3] = -1
    elif ignored == "all":
        labels[:] = -1
    phi = torch.randn(batch, channels, voxels, generator=g).float()  # float32 fields, as the losses'
    psi = phi.abs() + 1.0
    fields = tuple(sorted({stat_names.parse(n)[1] for n in names if n.startswith("field_")}))
    tensors = [{"phi": phi, "psi": psi}[name] for name in fields]
    upstream = torch.randn(batch, channels, len(names), generator=g, dtype=torch.float64)
    step = 1 + seed % max(1, voxels)
    results = []
    for path, logits in ((True, z), (False, z.double())):
        x = logits.clone().requires_grad_(True)
        layout = native.Layout(names, "softmax", channels, -1, None, fields, step, path)
        stats = native.ChunkedStatistics.apply(
            layout, x, labels, None, None, *[t.double() if not path else t for t in tensors]
        )
        (grad,) = torch.autograd.grad((stats * upstream.to(stats.dtype)).sum(), x)
        assert grad.dtype == x.dtype
        results.append((stats.double(), grad.double()))
    (stats, grad), (stats64, grad64) = results
    if ignored == "all":
        assert torch.count_nonzero(stats) == 0 and torch.count_nonzero(grad) == 0
    exact = dtype == torch.float64
    scale = float(phi.abs().max()) * 4.0
    torch.testing.assert_close(
        stats, stats64, rtol=1e-12 if exact else 1e-5, atol=1e-12 if exact else 1e-5 * scale * voxels
    )
    eps = 1e-12 if exact else float(torch.finfo(dtype).eps)
    torch.testing.assert_close(grad, grad64, rtol=2 * eps, atol=eps * scale * float(upstream.abs().max()))


@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.int32, torch.uint8])
def test_region_targets_equal_the_core_definition(labels_dtype):
    """g_r = [label ∈ regions[r]] by one table row per voxel, 0 for labels outside the table (an
    ignore label below 0 or beyond the largest region label), as segloss_core.regions.region_targets."""
    regions = ((1, 2, 3), (2, 3), (3,), (0, 5))
    labels = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 200], [3, 3, 5, 0, 1, 2, 255, 4]], dtype=labels_dtype)
    got = native.region_targets(regions, labels, torch.float32)
    expected = reference_region_targets(np, labels.numpy().astype(np.int64), regions, np.float32)
    assert got.shape == (2, 4, 8) and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), expected)
    if labels_dtype != torch.uint8:
        negative = native.region_targets(regions, torch.tensor([[-1, 3]], dtype=labels_dtype), torch.float64)
        assert negative[0, :, 0].tolist() == [0.0] * 4 and negative[0, :, 1].tolist() == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("case", ["boundary", "regions"])
def test_torch_compile_fullgraph_fields_and_regions(case, small_chunks):
    """The field label path (boundary with a given φ) and region targets (the table lookup) under
    torch.compile(fullgraph=True): value and gradient as eager."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 6, 5, generator=g)
    y = torch.randint(0, 3, (2, 6, 5), generator=g)
    if case == "boundary":
        phi = torch.randn(2, 3, 6, 5, generator=g)
        module = get_loss("boundary", backend="torch", impl="native")

        def loss(x, y):
            return module(x, y, distance_map=phi)
    else:
        loss = get_loss(
            "dice_ce", backend="torch", impl="native", preset="nnunet_regions", regions=((1, 2), (2,), (0,))
        )
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        xd = x.clone().requires_grad_(True)
        value = fn(xd, y)
        value.backward()
        results.append((value.detach(), xd.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_every_table_statistic_is_covered():
    bases = {stat_names.parse(n)[0] for n in SIGMOID_STATS}
    assert bases == set(stat_names.TABLE)

"""boundary, hausdorff_dt, log_hausdorff_dt: against their papers' code, MONAI, and the schedule."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.ndimage import distance_transform_edt

from segloss_core import get_loss
from segloss_core.schedules import RebalanceSchedule
from segloss_torch import signed_distance_map

monai_losses = pytest.importorskip("monai.losses")


def _problem(seed=0, shape=(2, 3, 12, 10, 6)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    y = torch.zeros(shape[0], *shape[2:], dtype=torch.long)
    y[:, 2:8, 3:7, 1:5] = 1
    y[:, 4:6, 4:6, 2:4] = 2
    y[-1, 0, 0, 0] = 2
    return x, y


def _value_and_grad(loss, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = loss(x, *args, **kwargs)
    value.backward()
    return value.detach(), x.grad


def livi_surface_loss(probs, y, idc, spacing=None):
    """LIVIAETS/boundary-loss losses.py SurfaceLoss(idc) on utils.one_hot2dist maps (transcribed)."""
    dist = np.zeros(probs.shape)
    onehot = np.eye(probs.shape[1])[y.numpy()].transpose(0, 4, 1, 2, 3)
    for b in range(probs.shape[0]):
        for k in range(probs.shape[1]):
            pos = onehot[b, k].astype(bool)
            if pos.any():
                neg = ~pos
                dist[b, k] = (
                    distance_transform_edt(neg, sampling=spacing) * neg
                    - (distance_transform_edt(pos, sampling=spacing) - 1) * pos
                )
    dist_t = torch.from_numpy(dist)
    return (probs[:, idc] * dist_t[:, idc]).mean()


@pytest.mark.parametrize("spacing", [None, (1.0, 0.8, 2.5)])
def test_boundary_matches_liviaets(spacing):
    x, y = _problem()
    ours = get_loss("boundary", backend="torch", spacing=spacing)  # classes 1..C-1 (idc=[1, 2])
    v_o, g_o = _value_and_grad(ours, x, y)
    v_l, g_l = _value_and_grad(lambda t, yy: livi_surface_loss(torch.softmax(t, 1), yy, [1, 2], spacing), x, y)
    torch.testing.assert_close(v_o, v_l, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_o, g_l, rtol=1e-5, atol=1e-8)


def test_boundary_with_precomputed_map_equals_on_the_fly():
    x, y = _problem(1)
    loss = get_loss("boundary", backend="torch")
    phi = signed_distance_map(y, 3).double()
    v1, g1 = _value_and_grad(loss, x, y)
    v2, g2 = _value_and_grad(loss, x, y, distance_map=phi)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="distance_map must have the shape of pred"):
        loss(x, y, distance_map=phi[:, :2])


@pytest.mark.parametrize(
    "options",
    [
        {"classes": (0, 2)},
        {"include_background": True, "convention": "signed"},
        {"ignore_index": 2, "spacing": (1.0, 0.8, 2.5)},
        {"normalize": "max", "convention": "signed_inside_positive"},
    ],
)
def test_boundary_on_the_fly_maps_only_the_classes_it_reads(options):
    """On the fly only the classes the loss reads get maps (the others are empty masks): the same loss
    and gradient as with every class's signed map given (ignored voxels belong to no class)."""
    x, y = _problem(7)
    loss = get_loss("boundary", backend="torch", **options)
    phi = signed_distance_map(
        y,
        3,
        options.get("spacing"),
        convention=options.get("convention", "boundary_loss"),
        normalize=options.get("normalize"),
        ignore_index=options.get("ignore_index"),
    ).double()
    v1, g1 = _value_and_grad(loss, x, y)
    v2, g2 = _value_and_grad(loss, x, y, distance_map=phi)
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)
    reference = get_loss("boundary", backend="numpy", **options)  # scipy, float64
    assert float(v1) == pytest.approx(float(reference(x.numpy(), y.numpy())), rel=1e-6)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("alpha", [2.0, 1.0])
def test_hausdorff_dt_matches_monai(batch, include_background, alpha):
    x, y = _problem(2)
    monai = monai_losses.HausdorffDTLoss(
        alpha=alpha, include_background=include_background, softmax=True, to_onehot_y=True, batch=batch
    )
    ours = get_loss("hausdorff_dt", backend="torch", alpha=alpha, include_background=include_background, batch=batch)
    v_m, g_m = _value_and_grad(monai, x, y[:, None])
    v_o, g_o = _value_and_grad(ours, x, y)
    torch.testing.assert_close(v_o, v_m, rtol=1e-5, atol=1e-6)  # MONAI's field is float32
    torch.testing.assert_close(g_o, g_m, rtol=1e-5, atol=1e-7)
    log_m = monai_losses.LogHausdorffDTLoss(
        alpha=alpha, include_background=include_background, softmax=True, to_onehot_y=True, batch=batch
    )
    log_o = get_loss(
        "log_hausdorff_dt", backend="torch", alpha=alpha, include_background=include_background, batch=batch
    )
    torch.testing.assert_close(
        _value_and_grad(log_o, x, y)[0], _value_and_grad(log_m, x, y[:, None])[0], rtol=1e-5, atol=1e-6
    )


@given(
    st.integers(0, 2**16),
    st.integers(2, 4),
    st.sampled_from(["blobs", "empty", "one_class", "single_voxel"]),
    st.booleans(),
    st.sampled_from([1.0, 2.0]),
)
def test_hausdorff_dt_matches_monai_on_ties_and_degenerate_masks(seed, channels, target, include_background, alpha):
    """Logits from {−1, 0, 1} (many voxels whose largest logits tie: p = 1/2 or less for each, no class of
    the thresholded prediction), targets without some classes, of one class only, or a single voxel:
    values and gradients are MONAI's (MONAI gives a zero field for a mask without both sides)."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, channels, 5, 4, 3)
    x = torch.randint(-1, 2, shape, generator=g).double()
    if target == "blobs":
        coarse = torch.randint(0, channels, (2, 1, 2, 2, 2), generator=g).double()
        y = torch.nn.functional.interpolate(coarse, size=(5, 4, 3), mode="nearest")[:, 0].long()
    elif target == "empty":
        y = torch.zeros(2, 5, 4, 3, dtype=torch.long)
    elif target == "one_class":
        y = torch.full((2, 5, 4, 3), channels - 1, dtype=torch.long)
    else:
        y = torch.zeros(2, 5, 4, 3, dtype=torch.long)
        y[:, 2, 1, 1] = 1
    monai = monai_losses.HausdorffDTLoss(
        alpha=alpha, include_background=include_background, softmax=True, to_onehot_y=True
    )
    ours = get_loss("hausdorff_dt", backend="torch", alpha=alpha, include_background=include_background)
    v_m, g_m = _value_and_grad(monai, x, y[:, None])
    v_o, g_o = _value_and_grad(ours, x, y)
    torch.testing.assert_close(v_o, v_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_o, g_m, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"include_background": True},
        {"classes": (0, 2), "threshold": 0.7},
        {"classes": (1,)},  # two classes left out: the masks path
        {"ignore_index": 2, "alpha": 1.0, "spacing": (1.0, 0.8, 2.5)},
        {"batch": True, "alpha": 1.5},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["hausdorff_dt", "log_hausdorff_dt"])
def test_hausdorff_dt_prediction_label_map_equals_the_masks(monkeypatch, fused_kernels, name, dtype, options):
    """The thresholded softmax as one label map (segloss::softmax_prediction_labels, then the
    label-map transform) gives the field of the per-class masks exactly: same value and gradient as
    the masks path (the op removed), and the op runs where at most one class is left out."""
    from segloss_core import distance_maps

    x, y = _problem(8)
    x[:, :, :2] = torch.randint(-1, 2, x[:, :, :2].shape).double()  # tied logits: no class there
    x = x.to(dtype)
    calls = []
    original = distance_maps.softmax_prediction_labels

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(distance_maps, "softmax_prediction_labels", counted)
    loss = get_loss(name, backend="torch", **options)
    fast = _value_and_grad(loss, x, y)
    left_out = 3 - len(options.get("classes", (0, 1, 2) if options.get("include_background") else (1, 2)))
    assert len(calls) == (1 if left_out <= 1 else 0)
    monkeypatch.setattr(distance_maps, "softmax_prediction_labels", lambda *args: None)
    masks = _value_and_grad(loss, x, y)
    torch.testing.assert_close(fast, masks, rtol=0, atol=0)


def _thresholded_field(x, y, threshold, alpha, classes, spacing):
    """F = d_g^α + d_p^α of the given classes (float64, scipy), p = softmax(x) > threshold per class, with
    the distance to the other side of each mask (0 for a mask without both sides): MONAI's field,
    transcribed, with a threshold and spacing."""
    p = torch.softmax(x, 1).numpy()
    field = np.zeros(p.shape)
    for b in range(p.shape[0]):
        for c in classes:
            for mask in (y[b].numpy() == c, p[b, c] > threshold):
                if mask.any() and not mask.all():
                    d = distance_transform_edt(~mask, sampling=spacing) + distance_transform_edt(mask, sampling=spacing)
                    field[b, c] += d**alpha
    return torch.from_numpy(field)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("classes", [None, (0, 2)])
def test_hausdorff_dt_threshold_and_classes_match_a_transcription(threshold, classes):
    """Below 1/2 several classes of a voxel may pass the threshold (the masks come from the probabilities
    class by class), at or above it only the largest (the fast form): both are the per-class definition."""
    x, y = _problem(6)
    spacing = (1.0, 0.8, 2.5)
    kwargs = {"classes": classes} if classes is not None else {}
    loss = get_loss("hausdorff_dt", backend="torch", threshold=threshold, alpha=1.0, spacing=spacing, **kwargs)
    columns = list(classes) if classes is not None else [1, 2]
    field = _thresholded_field(x, y, threshold, 1.0, columns, spacing)
    onehot = torch.nn.functional.one_hot(y, 3).permute(0, 4, 1, 2, 3).double()
    xr = x.detach().clone().requires_grad_(True)
    expected = ((torch.softmax(xr, 1) - onehot) ** 2 * field)[:, columns].mean(dim=(2, 3, 4)).mean()
    expected.backward()
    v_o, g_o = _value_and_grad(loss, x, y)
    torch.testing.assert_close(v_o, expected.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_o, xr.grad, rtol=1e-6, atol=1e-9)


def test_hausdorff_spacing_matters_and_is_exact():
    x, y = _problem(3)
    iso = get_loss("hausdorff_dt", backend="torch")
    aniso = get_loss("hausdorff_dt", backend="torch", spacing=(1.0, 1.0, 3.0))
    assert float(iso(x, y)) != pytest.approx(float(aniso(x, y)))
    ref = get_loss("hausdorff_dt", backend="numpy", spacing=(1.0, 1.0, 3.0))
    assert float(aniso(x, y)) == pytest.approx(float(ref(x.numpy(), y.numpy())), rel=1e-6)


@pytest.mark.parametrize("name", ["boundary", "hausdorff_dt", "log_hausdorff_dt", "generalized_dice_boundary"])
def test_gradcheck(name):
    x, y = _problem(4, shape=(1, 3, 5, 4, 3))
    y = y[:, :5, :4, :3]
    loss = get_loss(name, backend="torch")
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x.requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_sigmoid_binary_and_soft_targets():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 9, 8, generator=g, dtype=torch.float64)
    y = torch.zeros(2, 9, 8, dtype=torch.long)
    y[:, 2:6, 3:6] = 1
    for name in ("boundary", "hausdorff_dt"):
        loss = get_loss(name, backend="torch", activation="sigmoid")
        ref = get_loss(name, backend="numpy", activation="sigmoid")
        assert float(loss(x, y)) == pytest.approx(float(ref(x.numpy(), y.numpy())), rel=1e-6)
        soft = y[:, None].double()
        assert float(loss(x, soft)) == pytest.approx(float(loss(x, y)), rel=1e-12)


def test_schedule_rises_by_step_and_stops_at_the_cap():
    schedule = RebalanceSchedule(start=0.01, step=0.01, cap=0.5)
    alphas = [schedule.alpha(e) for e in range(100)]
    assert alphas[0] == 0.01 and alphas[10] == pytest.approx(0.11)
    assert max(alphas) == 0.5 and alphas[-1] == 0.5  # min(), not the recipe's max(): α stops at the cap
    assert all(b >= a for a, b in itertools.pairwise(alphas))
    steal = RebalanceSchedule(start=0.1, step=0.2, cap=0.9, mode="steal")
    assert steal.weights(2) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="mode='steal' needs cap <= 1"):
        RebalanceSchedule(cap=2.0, mode="steal")


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_schedule_applies_to_the_compound(backend):
    x, y = _problem(6)
    loss = get_loss("generalized_dice_boundary", backend=backend, preset="kervadec2019")
    gdl = get_loss("generalized_dice", backend=backend, include_background=False)
    bl = get_loss("boundary", backend=backend)
    schedule = RebalanceSchedule(start=0.01, step=0.05, cap=0.3)
    xa, ya = (x, y) if backend == "torch" else (x.numpy(), y.numpy())
    for epoch in (0, 3, 20):
        region, boundary = schedule.apply(loss, epoch)
        expected = region * float(gdl(xa, ya)) + boundary * float(bl(xa, ya))
        assert float(loss(xa, ya)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="0 terms named 'dice'"):
        loss.set_weights(dice=1.0)


def livi_generalized_dice(probs, y, idc):
    """LIVIAETS/boundary-loss losses.py GeneralizedDice(idc) (171c32d), transcribed in float64 (theirs casts to
    float32): w = 1/(Σg + 1e-10)², per sample 1 − 2(Σ_k w·I + 1e-10)/(Σ_k w·(P + G) + 1e-10), mean over samples."""
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).movedim(-1, 1).double()
    pc, tc = probs[:, idc].flatten(2), onehot[:, idc].flatten(2)
    w = 1 / (tc.sum(2) + 1e-10) ** 2
    intersection = w * (pc * tc).sum(2)
    union = w * (pc.sum(2) + tc.sum(2))
    return (1 - 2 * (intersection.sum(1) + 1e-10) / (union.sum(1) + 1e-10)).mean()


def test_kervadec2019_recipe():
    """The preset: GDL (MONAI's weights, foreground classes) + 0.01 · SurfaceLoss(idc=[1..C-1]); and the
    isles.make/wmh.make recipe itself, GeneralizedDice(idc=[0, 1]) + 0.01 · SurfaceLoss(idc=[1]), through compound()."""
    from segloss_core import compound

    x, y = _problem(7, shape=(2, 2, 12, 10, 6))
    y = (y > 0).long()  # binary, as ISLES/WMH; every class present in every sample
    preset = get_loss("generalized_dice_boundary", backend="torch", preset="kervadec2019")
    gdl_fg = get_loss("generalized_dice", backend="torch", include_background=False)
    v_o, g_o = _value_and_grad(preset, x, y)
    v_r, g_r = _value_and_grad(
        lambda t, yy: gdl_fg(t, yy) + 0.01 * livi_surface_loss(torch.softmax(t, 1), yy, [1]), x, y
    )
    torch.testing.assert_close(v_o, v_r, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_o, g_r, rtol=1e-5, atol=1e-8)

    recipe = compound(
        [
            ("generalized_dice", 1.0, {"include_background": True, "smooth_nr": 1e-10, "smooth_dr": 1e-10}),
            ("boundary", 0.01, {}),
        ],
        backend="torch",
    )
    v_o, g_o = _value_and_grad(recipe, x, y)
    v_r, g_r = _value_and_grad(
        lambda t, yy: (
            livi_generalized_dice(torch.softmax(t, 1), yy, [0, 1])
            + 0.01 * livi_surface_loss(torch.softmax(t, 1), yy, [1])
        ),
        x,
        y,
    )
    torch.testing.assert_close(v_o, v_r, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_o, g_r, rtol=1e-5, atol=1e-8)

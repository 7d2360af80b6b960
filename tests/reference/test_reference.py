"""The float64 reference: hand-computed values, exact gradients, the differentiating tape."""

from __future__ import annotations

import array_api_compat.numpy as xnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from segloss_core import get_loss
from segloss_core.reference.autodiff import TapeNamespace, gradients

# probabilities for 1 sample, 2 classes, 4 voxels; labels [0, 1, 1, 0]
P = np.array([[[0.9, 0.2, 0.1, 0.6], [0.1, 0.8, 0.9, 0.4]]])
Y = np.array([[0, 1, 1, 0]])


def test_dice_by_hand():
    # class 0: I = 0.9 + 0.6 = 1.5, P = 1.8, G = 2;  class 1: I = 1.7, P = 2.2, G = 2
    loss = get_loss("dice", backend="numpy", activation="none", smooth_nr=0.0, smooth_dr=0.0)
    dice0, dice1 = 3.0 / 3.8, 3.4 / 4.2
    value, grad = loss.value_and_grad(P, Y)
    assert float(value) == pytest.approx(1 - (dice0 + dice1) / 2, abs=1e-15)
    # d(1 - mean dice)/dp_c,x = -1/2 (2 g D - 2 I) / D^2
    g = np.eye(2)[Y[0]].T
    expected = np.stack([-0.5 * (2 * g[0] * 3.8 - 3.0) / 3.8**2, -0.5 * (2 * g[1] * 4.2 - 3.4) / 4.2**2])
    np.testing.assert_allclose(grad[0], expected, atol=1e-15)


def test_dice_smoothing_and_clamp_by_hand():
    loss = get_loss("dice", backend="numpy", activation="none", smooth_nr=1.0, smooth_dr=2.0, clamp_dr=5.0)
    # class 0 denominator 3.8 + 2 = 5.8 > 5; class 1: 4.2 + 2 = 6.2
    expected = 1 - ((3.0 + 1) / 5.8 + (3.4 + 1) / 6.2) / 2
    assert float(loss(P, Y)) == pytest.approx(expected, abs=1e-15)
    clamped = get_loss("dice", backend="numpy", activation="none", smooth_nr=0.0, smooth_dr=0.0, clamp_dr=4.0)
    assert float(clamped(P, Y)) == pytest.approx(1 - (3.0 / 4.0 + 3.4 / 4.2) / 2, abs=1e-15)


def test_loss_forms_by_hand():
    dice = (3.0 / 3.8 + 3.4 / 4.2) / 2
    kw = {"activation": "none", "smooth_nr": 0.0, "smooth_dr": 0.0}
    assert float(get_loss("dice", backend="numpy", loss_form="negative", **kw)(P, Y)) == pytest.approx(-dice)
    per_class = -(np.log(3.0 / 3.8) + np.log(3.4 / 4.2)) / 2
    assert float(get_loss("dice", backend="numpy", log_loss=True, **kw)(P, Y)) == pytest.approx(per_class)


def test_squared_and_jaccard_and_tversky_by_hand():
    kw = {"activation": "none", "smooth_nr": 0.0, "smooth_dr": 0.0}
    p2 = (P[0] ** 2).sum(-1)  # [1.22, 1.5]
    squared = 1 - (3.0 / (p2[0] + 2) + 3.4 / (p2[1] + 2)) / 2
    assert float(get_loss("dice", backend="numpy", squared=True, **kw)(P, Y)) == pytest.approx(squared)
    jac = 1 - (1.5 / (1.8 + 2 - 1.5) + 1.7 / (2.2 + 2 - 1.7)) / 2
    assert float(get_loss("jaccard", backend="numpy", **kw)(P, Y)) == pytest.approx(jac)
    tv = 1 - (1.5 / (1.5 + 0.3 * 0.3 + 0.7 * 0.5) + 1.7 / (1.7 + 0.3 * 0.5 + 0.7 * 0.3)) / 2
    got = get_loss("tversky", backend="numpy", alpha=0.3, beta=0.7, **kw)(P, Y)
    assert float(got) == pytest.approx(tv)


def test_class_weights_normalisations_by_hand():
    kw = {"activation": "none", "smooth_nr": 0.0, "smooth_dr": 0.0, "class_weights": [1.0, 3.0]}
    l0, l1 = 1 - 3.0 / 3.8, 1 - 3.4 / 4.2
    assert float(get_loss("dice", backend="numpy", **kw)(P, Y)) == pytest.approx((l0 + 3 * l1) / 2)
    norm = get_loss("dice", backend="numpy", class_weight_normalization="weight_sum", **kw)
    assert float(norm(P, Y)) == pytest.approx((l0 + 3 * l1) / 4)
    rows = get_loss("dice", backend="numpy", class_weight_normalization="rows", **kw)
    assert float(rows(P, Y)) == pytest.approx(l0 + 3 * l1)


def test_cross_entropy_by_hand():
    loss = get_loss("cross_entropy", backend="numpy", activation="none")
    expected = -np.mean(np.log([0.9, 0.8, 0.9, 0.6]))
    assert float(loss(P, Y)) == pytest.approx(expected, abs=1e-15)
    weighted = get_loss("cross_entropy", backend="numpy", activation="none", class_weights=[1.0, 2.0])
    num = -(np.log(0.9) + 2 * np.log(0.8) + 2 * np.log(0.9) + np.log(0.6))
    assert float(weighted(P, Y)) == pytest.approx(num / 6, abs=1e-15)


EMPTY = np.zeros((1, 2, 4))  # logits 0: p = 0.5 everywhere
BG_ONLY = np.zeros((1, 4), dtype=np.int64)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("monai", 1 - ((4 + 1e-5) / (6 + 1e-5) + 1e-5 / (2 + 1e-5)) / 2),  # fg absent: its score ~0
        ("nnunet", -(1e-5 / (2 + 1e-5))),  # background dropped; fg absent
        ("smp", (1 - 2 * 2 / 6 + 0) / 2),  # batch-global; fg absent: zeroed but counted
    ],
)
def test_absent_class_policies_by_hand(preset, expected):
    loss = get_loss("dice", backend="numpy", preset=preset)
    assert float(loss(EMPTY, BG_ONLY)) == pytest.approx(expected, rel=1e-9)


def test_all_ignored_gives_zero_loss_and_zero_gradient():
    labels = np.full((1, 4), 255)
    for preset in (None, "nnunet", "smp", "diceloss_cpp"):
        loss = get_loss("dice", backend="numpy", preset=preset, ignore_index=255)
        value, grad = loss.value_and_grad(EMPTY, labels)
        form = loss.plan.terms[0].params.loss_form
        assert float(value) == (-1.0 if form == "negative" else 0.0), preset
        assert not grad.any(), preset
    ce_value, ce_grad = get_loss("cross_entropy", backend="numpy", ignore_index=255).value_and_grad(EMPTY, labels)
    assert float(ce_value) == 0.0 and not ce_grad.any()


def _finite_difference(loss, x, y, eps=1e-6):
    fd = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        fd[index] = (float(loss(up, y)) - float(loss(down, y))) / (2 * eps)
    return fd


@given(
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    channels=st.integers(2, 4),
    batch=st.integers(1, 2),
    name=st.sampled_from(["dice", "jaccard", "tversky", "generalized_dice", "cross_entropy", "dice_ce"]),
    batch_mode=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_gradient_matches_finite_differences(spatial, channels, batch, name, batch_mode, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, channels, *spatial))
    y = rng.integers(0, channels, size=(batch, *spatial))
    params = {"batch": batch_mode} if name != "cross_entropy" else {}
    loss = get_loss(name, backend="numpy", **params)
    _, grad = loss.value_and_grad(x, y)
    np.testing.assert_allclose(grad, _finite_difference(loss, x, y), atol=2e-7, rtol=1e-5)


def test_tape_matches_hand_derivatives():
    tape = TapeNamespace(xnp)
    a = tape.variable(np.array([1.0, 2.0, 0.25]))
    b = tape.variable(np.array([3.0, 0.5, 2.0]))
    out = tape.sum(tape.where(a.value > 0.5, tape.log(a) * b, b**2) + tape.maximum(a, b) / 2)
    ga, gb = gradients(out, [a, b])
    np.testing.assert_allclose(ga, [3.0 / 1.0 + 0.0, 0.5 / 2.0 + 0.5, 0.0])
    np.testing.assert_allclose(gb, [np.log(1.0) + 0.5, np.log(2.0), 2 * 2.0 + 0.5])


def test_tape_maximum_splits_ties_like_torch():
    tape = TapeNamespace(xnp)
    a = tape.variable(np.array([1.0]))
    (g,) = gradients(tape.sum(tape.maximum(a, tape.full_like(a, 1.0))), [a])
    assert g[0] == 0.5


def test_tape_take_max_and_broadcast():
    tape = TapeNamespace(xnp)
    x = tape.variable(np.array([[1.0, 5.0, 2.0], [4.0, 4.0, 0.0]]))
    picked = tape.take(x, np.array([0, 2]), axis=1)
    out = tape.sum(picked * np.array([[2.0, 3.0]])) + tape.sum(tape.max(x, axis=1))
    (g,) = gradients(out, [x])
    np.testing.assert_allclose(g, [[2.0, 1.0, 3.0], [2.5, 0.5, 3.0]])

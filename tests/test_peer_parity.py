"""Focal and cross-entropy family parity with the peers (issue 19 item 2).

MONAI is installed (a test dependency) and called directly. segmentation_models_pytorch and
kornia are not: their formulas are transcribed here from the source files named in each
docstring (qubvel-org/segmentation_models.pytorch main 0.5.1.dev0 @ 5006616, kornia 0.9.0rc1 @
b4f5a78), with torch ops, and compared in value and gradient (float64).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segloss_core import get_loss

monai_losses = pytest.importorskip("monai.losses")


def _problem(seed, channels=3, spatial=(5, 4), batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, channels, (batch, *spatial), generator=g)
    return x, y


def _value_and_grad(fn, x, *args, seed_grad=None):
    """fn(x, *args) and d⟨seed, value⟩/dx (seed: a fixed random array of the value's shape)."""
    x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = fn(x, *args)
    seed = torch.ones_like(value) if seed_grad is None else seed_grad(value.shape)
    (value * seed).sum().backward()
    return value.detach(), x.grad


def _random_seed(shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5


def _assert_same(peer, ours, x, peer_args, our_args, rtol=1e-10, atol=1e-12):
    v_p, g_p = _value_and_grad(peer, x, *peer_args, seed_grad=_random_seed)
    v_o, g_o = _value_and_grad(ours, x, *our_args, seed_grad=_random_seed)
    assert v_o.shape == v_p.shape
    torch.testing.assert_close(v_o.to(v_p.dtype), v_p, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_o, g_p, rtol=max(rtol, 1e-7), atol=max(atol, 1e-10))


def _reference(name, x, y, seed_shape=None, **params):
    """The float64 reference's value and d⟨seed, value⟩/d pred (NumPy backend)."""
    loss = get_loss(name, backend="numpy", **params)
    value = loss(x.numpy(), y.numpy())
    seed = _random_seed(np.shape(value)).numpy() if np.ndim(value) else None
    return loss.value_and_grad(x.numpy(), y.numpy(), grad_output=seed)


# ---------------------------------------------------------------------------------------
# f. Lovász-softmax class weights
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("present_only", [False, True])
def test_lovasz_class_weights_weigh_the_per_class_terms(per_image, present_only):
    """Σ_c w_c·L_c / Σ_c w_c over the counted classes, each L_c the one-class Lovász term."""
    x, y = _problem(13, channels=4, spatial=(6, 5))
    y[0][y[0] == 3] = 0  # class 3 absent from image 0 (and present in image 1)
    weights = [0.5, 2.0, 1.0, 3.0]
    common = {"per_image": per_image, "present_only": present_only}
    weighted = float(get_loss("lovasz_softmax", backend="torch", class_weights=weights, **common)(x, y))
    images = [(x[b : b + 1], y[b : b + 1]) for b in range(2)] if per_image else [(x, y)]
    expected = []
    for xi, yi in images:
        counted = [c for c in range(4) if not present_only or bool((yi == c).any())]
        terms = [float(get_loss("lovasz_softmax", backend="torch", classes=(c,), **common)(xi, yi)) for c in counted]
        w = [weights[c] for c in counted]
        expected.append(sum(a * b for a, b in zip(w, terms, strict=True)) / sum(w))
    assert weighted == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    unit = float(get_loss("lovasz_softmax", backend="torch", class_weights=[1.0] * 4, **common)(x, y))
    assert unit == pytest.approx(float(get_loss("lovasz_softmax", backend="torch", **common)(x, y)), rel=1e-14)
    value, grad = _reference("lovasz_softmax", x, y, class_weights=weights, **common)
    v_t, g_t = _value_and_grad(get_loss("lovasz_softmax", backend="torch", class_weights=weights, **common), x, y)
    assert float(value) == pytest.approx(float(v_t), rel=1e-12)
    np.testing.assert_allclose(g_t.numpy(), grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------
# g. Dice class_weights with average="micro"
# ---------------------------------------------------------------------------------------
def kornia_dice_loss_micro(pred, target, weight, eps=1e-8):
    """kornia/losses/dice.py dice_loss(average='micro', weight=w) (0.9.0rc1 @ b4f5a78), transcribed:
    softmax, w multiplies the softmax and the one-hot before the sums over (C, H, W), mean over B."""
    pred_soft = F.softmax(pred, dim=1)
    target_one_hot = F.one_hot(target, pred.shape[1]).movedim(-1, 1).to(pred.dtype)
    w = weight.view(-1, 1, 1)
    pred_soft, target_one_hot = pred_soft * w, target_one_hot * w
    intersection = torch.sum(pred_soft * target_one_hot, (1, 2, 3))
    cardinality = torch.sum(pred_soft + target_one_hot, (1, 2, 3))
    return torch.mean(1.0 - 2.0 * intersection / (cardinality + eps))


@pytest.mark.parametrize("impl", ["native", "auto"])
def test_dice_micro_class_weights_match_kornia(impl):
    x, y = _problem(14, channels=4, spatial=(6, 5), batch=3)
    weight = torch.tensor([0.25, 1.0, 2.0, 0.5], dtype=torch.float64)
    params = {"average": "micro", "class_weights": weight.tolist(), "smooth_nr": 0.0, "smooth_dr": 1e-8}
    ours = get_loss("dice", backend="torch", impl=impl, **params)
    _assert_same(lambda x, y: kornia_dice_loss_micro(x, y, weight), ours, x, (y,), (y,))
    unit = get_loss("dice", backend="torch", average="micro", class_weights=[1.0] * 4)(x, y)
    assert float(unit) == pytest.approx(float(get_loss("dice", backend="torch", average="micro")(x, y)), rel=1e-14)


# ---------------------------------------------------------------------------------------
# h. (B, C) inputs without spatial dimensions
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["native", "auto"])
def test_classification_inputs(impl):
    x, y = _problem(15, channels=5, spatial=(), batch=7)
    y[2] = 255
    peer_ce = torch.nn.CrossEntropyLoss(ignore_index=255, label_smoothing=0.05)
    ours = get_loss("cross_entropy", backend="torch", impl=impl, ignore_index=255, label_smoothing=0.05)
    _assert_same(peer_ce, ours, x, (y,), (y,))
    t = (x > 0.3).double()
    _assert_same(torch.nn.BCEWithLogitsLoss(), get_loss("bce", backend="torch", impl=impl), x, (t,), (t,))
    focal = get_loss("focal", backend="torch", impl=impl, gamma=0.0, ignore_index=255)
    assert float(focal(x, y)) == pytest.approx(float(F.cross_entropy(x, y, ignore_index=255)), rel=1e-12)
    topk = get_loss("topk_ce", backend="torch", k=50.0, ignore_index=255)
    per_sample = F.cross_entropy(x, y, ignore_index=255, reduction="none")[y != 255]
    assert float(topk(x, y)) == pytest.approx(float(per_sample.topk(3).values.mean()), rel=1e-12)
    value, grad = _reference("cross_entropy", x, y, ignore_index=255, label_smoothing=0.05)
    v_p, g_p = _value_and_grad(peer_ce, x, y)
    assert float(value) == pytest.approx(float(v_p), rel=1e-12)
    np.testing.assert_allclose(grad, g_p.numpy(), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="needs a spatial dim"):
        get_loss("dice", backend="torch")(x, y.clamp(max=4))

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
from hypothesis import given, settings
from hypothesis import strategies as st

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
# a. MONAI FocalLoss reduction="sum" and "none"
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
@pytest.mark.parametrize(
    ("preset", "monai_kwargs"), [("monai", {}), ("monai_softmax", {"use_softmax": True})], ids=["sigmoid", "softmax"]
)
@pytest.mark.parametrize("include_background", [True, False])
def test_monai_focal_reductions(reduction, preset, monai_kwargs, include_background):
    """MONAI sums the (B, C) spatial means for 'sum' and returns the (B, C, *spatial) map for 'none'."""
    if monai_kwargs and not include_background:
        pytest.skip("MONAI's softmax focal drops channel 0 before the softmax (a softmax over the foreground)")
    x, y = _problem(3, spatial=(5, 4, 3))
    monai = monai_losses.FocalLoss(
        to_onehot_y=True, reduction=reduction, include_background=include_background, alpha=0.25, **monai_kwargs
    )
    ours = get_loss(
        "focal", backend="torch", preset=preset, reduction=reduction, include_background=include_background, alpha=0.25
    )
    _assert_same(monai, ours, x, (y[:, None],), (y,), rtol=1e-5, atol=1e-7)  # MONAI's focal runs in float32


def test_monai_dice_focal_reduction_none():
    """MONAI DiceFocalLoss(reduction='none'): the Dice (B, C, 1, 1) values broadcast onto the focal map."""
    x, y = _problem(4)
    for monai, preset in (
        (monai_losses.DiceFocalLoss(softmax=True, to_onehot_y=True, reduction="none"), "monai"),
        (monai_losses.DiceFocalLoss(sigmoid=True, to_onehot_y=True, reduction="none"), "monai_sigmoid"),
    ):
        ours = get_loss("dice_focal", backend="torch", preset=preset, reduction="none")
        _assert_same(monai, ours, x, (y[:, None],), (y,), rtol=1e-5, atol=1e-7)


def test_dice_focal_none_refuses_maps_that_do_not_line_up():
    with pytest.raises(ValueError, match="channel_mean"):
        get_loss("dice_focal", backend="torch", reduction="none")  # softmax focal: (B, *spatial) map
    with pytest.raises(ValueError, match="batch=False"):
        get_loss("dice_focal", backend="torch", preset="monai", reduction="none", batch=True)


# ---------------------------------------------------------------------------------------
# b. element maps: reduction="none" as PyTorch returns them, "per_sample" the (B,) means
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["native", "auto"])
@pytest.mark.parametrize("spatial", [(), (6,), (5, 4), (3, 4, 2)], ids=["0d", "1d", "2d", "3d"])
def test_cross_entropy_none_is_torch_map(impl, spatial):
    x, y = _problem(5, channels=4, spatial=spatial, batch=3)
    y.view(-1)[::5] = 255
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    ours = get_loss(
        "cross_entropy",
        backend="torch",
        impl=impl,
        reduction="none",
        ignore_index=255,
        class_weights=weight.tolist(),
        label_smoothing=0.1,
    )

    def peer(x, y):
        return F.cross_entropy(x, y, weight=weight, ignore_index=255, label_smoothing=0.1, reduction="none")

    _assert_same(peer, ours, x, (y,), (y,))
    value, grad = _reference(
        "cross_entropy", x, y, reduction="none", ignore_index=255, class_weights=weight.tolist(), label_smoothing=0.1
    )
    v_p, g_p = _value_and_grad(peer, x, y, seed_grad=_random_seed)
    np.testing.assert_allclose(value, v_p.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, g_p.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["native", "auto"])
@pytest.mark.parametrize("spatial", [(), (5, 4)], ids=["0d", "2d"])
def test_bce_none_is_torch_map(impl, spatial):
    x, _ = _problem(6, channels=3, spatial=spatial)
    t = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) > 0.6).double()
    pos_weight, weight = [2.0, 0.5, 1.0], [1.0, 3.0, 0.25]
    shape = (1, 3, *([1] * len(spatial)))
    ours = get_loss("bce", backend="torch", impl=impl, reduction="none", pos_weight=pos_weight, class_weights=weight)

    def peer(x, t):
        return F.binary_cross_entropy_with_logits(
            x,
            t,
            weight=torch.tensor(weight, dtype=x.dtype).reshape(shape),
            pos_weight=torch.tensor(pos_weight, dtype=x.dtype).reshape(shape),
            reduction="none",
        )

    _assert_same(peer, ours, x, (t,), (t,))


def test_per_sample_is_the_mean_of_each_sample():
    x, y = _problem(8, batch=3)
    y[1, :2] = 255
    for name in ("cross_entropy", "focal"):
        per_sample = get_loss(name, backend="torch", reduction="per_sample", ignore_index=255)(x, y)
        means = [float(get_loss(name, backend="torch", ignore_index=255)(x[b : b + 1], y[b : b + 1])) for b in range(3)]
        assert per_sample.shape == (3,)
        np.testing.assert_allclose(per_sample.numpy(), means, rtol=1e-12)
        mapped = get_loss(name, backend="torch", reduction="none", ignore_index=255)(x, y)
        assert mapped.shape == y.shape
        assert float(mapped[1, :2].abs().sum()) == 0.0  # ignored voxels hold 0
        valid = (y != 255).double()
        np.testing.assert_allclose(
            (mapped.sum((1, 2)) / valid.sum((1, 2))).numpy(), per_sample.detach().numpy(), rtol=1e-12
        )


# ---------------------------------------------------------------------------------------
# c. focal pos_weight and SMP's Σ w·L / Σ w
# ---------------------------------------------------------------------------------------
def smp_focal_loss(y_pred, y_true, *, mode, gamma=2.0, alpha=None, ignore_index=None, class_weights=None):
    """segmentation_models_pytorch/losses/focal.py FocalLoss.forward + _functional.py focal_loss_with_logits
    (main 0.5.1.dev0 @ 5006616), multiclass/multilabel modes, from_logits=True, reduction='mean',
    transcribed: per class the one-vs-rest sigmoid focal mean over the non-ignored voxels, then
    Σ w_c·L_c / Σ w_c (class_weights) or the mean over classes."""

    def focal_loss_with_logits(output, target):
        target = target.to(output.dtype)
        logpt = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        pt = torch.exp(-logpt)
        loss = (1.0 - pt).pow(gamma) * logpt
        if alpha is not None:
            loss = loss * (alpha * target + (1 - alpha) * (1 - target))
        return loss.mean()

    not_ignored = None if ignore_index is None else y_true != ignore_index
    class_losses = []
    for cls in range(y_pred.size(1)):
        cls_y_true = (y_true == cls).long() if mode == "multiclass" else y_true[:, cls, ...]
        cls_y_pred = y_pred[:, cls, ...]
        if not_ignored is not None:
            cls_y_true, cls_y_pred = cls_y_true[not_ignored], cls_y_pred[not_ignored]
        class_losses.append(focal_loss_with_logits(cls_y_pred, cls_y_true))
    class_losses = torch.stack(class_losses)
    if class_weights is not None:
        weights = torch.tensor(class_weights, dtype=class_losses.dtype)
        return (class_losses * weights).sum() / weights.sum()
    return class_losses.mean()


@given(
    seed=st.integers(0, 10_000),
    channels=st.integers(2, 4),
    weighted=st.booleans(),
    ignore=st.booleans(),
    alpha=st.sampled_from([None, 0.25]),
    gamma=st.sampled_from([0.0, 2.0]),
)
@settings(max_examples=25, deadline=None)
def test_focal_smp_preset_matches_smp(seed, channels, weighted, ignore, alpha, gamma):
    x, y = _problem(seed, channels=channels)
    if ignore:
        y.view(-1)[::3] = 255
    weights = [0.5 + 1.5 * c for c in range(channels)] if weighted else None
    ours = get_loss(
        "focal",
        backend="torch",
        preset="smp",
        class_weights=weights,
        ignore_index=255 if ignore else None,
        alpha=alpha,
        gamma=gamma,
    )

    def peer(x, y):
        ignore_index = 255 if ignore else None
        return smp_focal_loss(
            x, y, mode="multiclass", class_weights=weights, ignore_index=ignore_index, alpha=alpha, gamma=gamma
        )

    _assert_same(peer, ours, x, (y,), (y,))


def test_focal_pos_weight_scales_the_positive_term():
    """pos_weight multiplies the positive term as in BCEWithLogitsLoss: at γ = 0 focal is BCE."""
    x, _ = _problem(9)
    t = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) > 0.5).double()
    pos_weight = [3.0, 0.5, 1.0]
    ours = get_loss("focal", backend="torch", activation="sigmoid", gamma=0.0, pos_weight=pos_weight)

    def peer(x, t):
        pw = torch.tensor(pos_weight, dtype=x.dtype).reshape(1, 3, 1, 1)
        return F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)

    _assert_same(peer, ours, x, (t,), (t,))
    value, grad = _reference("focal", x, t, activation="sigmoid", gamma=2.0, pos_weight=pos_weight)
    v_t, g_t = _value_and_grad(
        get_loss("focal", backend="torch", activation="sigmoid", gamma=2.0, pos_weight=pos_weight), x, t
    )
    assert float(v_t) == pytest.approx(float(value), rel=1e-12)
    np.testing.assert_allclose(g_t.numpy(), grad, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="pos_weight"):
        get_loss("focal", backend="numpy", pos_weight=pos_weight)  # softmax


# ---------------------------------------------------------------------------------------
# d, e. SMP SoftBCEWithLogitsLoss and SoftCrossEntropyLoss
# ---------------------------------------------------------------------------------------
def smp_soft_bce(y_pred, y_true, *, smooth_factor=None, ignore_index=-100, pos_weight=None):
    """segmentation_models_pytorch/losses/soft_bce.py SoftBCEWithLogitsLoss.forward (main 0.5.1.dev0 @
    5006616), reduction='mean', transcribed: soft target (1 − s)·g + s·(1 − g), ignored elements
    zeroed, mean over every element."""
    soft = y_true if smooth_factor is None else (1 - y_true) * smooth_factor + y_true * (1 - smooth_factor)
    loss = F.binary_cross_entropy_with_logits(y_pred, soft, pos_weight=pos_weight, reduction="none")
    if ignore_index is not None:
        loss = loss * (y_true != ignore_index).type_as(loss)
    return loss.mean()


def smp_soft_cross_entropy(y_pred, y_true, *, smooth_factor, ignore_index=-100, dim=1):
    """segmentation_models_pytorch/losses/soft_ce.py SoftCrossEntropyLoss.forward + _functional.py
    label_smoothed_nll_loss (main 0.5.1.dev0 @ 5006616), reduction='mean', transcribed: ignored
    voxels are zeroed but stay in the mean's denominator."""
    lprobs = F.log_softmax(y_pred, dim=dim)
    target = y_true.unsqueeze(dim)
    pad_mask = target.eq(ignore_index)
    target = target.masked_fill(pad_mask, 0)
    nll_loss = (-lprobs.gather(dim=dim, index=target)).masked_fill(pad_mask, 0.0)
    smooth_loss = (-lprobs.sum(dim=dim, keepdim=True)).masked_fill(pad_mask, 0.0)
    eps_i = smooth_factor / lprobs.size(dim)
    return (1.0 - smooth_factor) * nll_loss.mean() + eps_i * smooth_loss.mean()


@pytest.mark.parametrize("smooth_factor", [None, 0.1, 0.3])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("impl", ["native", "auto"])
def test_bce_smp_preset_matches_soft_bce(smooth_factor, ignore, impl):
    x, _ = _problem(10, channels=1, spatial=(6, 5), batch=3)
    labels = (torch.rand(x.shape[:1] + x.shape[2:], generator=torch.Generator().manual_seed(3)) > 0.5).long()
    if ignore:
        labels.view(-1)[::4] = -100
    pos_weight = torch.tensor([1.7], dtype=torch.float64).reshape(1, 1, 1, 1)
    ours = get_loss(
        "bce",
        backend="torch",
        impl=impl,
        preset="smp",
        label_smoothing=0.0 if smooth_factor is None else 2 * smooth_factor,  # SMP's s is ε/2
        ignore_index=-100 if ignore else None,
        pos_weight=[1.7],
    )

    def peer(x, labels):
        return smp_soft_bce(x, labels[:, None].double(), smooth_factor=smooth_factor, pos_weight=pos_weight)

    _assert_same(peer, ours, x, (labels,), (labels,))


def test_bce_label_smoothing_multilabel_soft_targets_match_reference():
    x, _ = _problem(11)
    t = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = get_loss("bce", backend="torch", label_smoothing=0.2)

    def peer(x, t):
        return smp_soft_bce(x, t, smooth_factor=0.1, ignore_index=None)

    _assert_same(peer, ours, x, (t,), (t,))
    value, grad = _reference("bce", x, t, label_smoothing=0.2)
    v_p, g_p = _value_and_grad(peer, x, t)
    assert float(value) == pytest.approx(float(v_p), rel=1e-12)
    np.testing.assert_allclose(grad, g_p.numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("smooth_factor", [0.0, 0.1])
@pytest.mark.parametrize("spatial", [(), (6, 5)], ids=["0d", "2d"])
def test_cross_entropy_smp_preset_matches_soft_cross_entropy(smooth_factor, spatial):
    x, y = _problem(12, channels=4, spatial=spatial, batch=5)
    y.view(-1)[::3] = -100
    ours = get_loss("cross_entropy", backend="torch", preset="smp", label_smoothing=smooth_factor, ignore_index=-100)

    def peer(x, y):
        return smp_soft_cross_entropy(x, y, smooth_factor=smooth_factor)

    _assert_same(peer, ours, x, (y,), (y,))
    # the default divides by the valid voxels, as torch.nn.CrossEntropyLoss
    default = get_loss("cross_entropy", backend="torch", label_smoothing=smooth_factor, ignore_index=-100)
    expected = F.cross_entropy(x, y, ignore_index=-100, label_smoothing=smooth_factor)
    assert float(default(x, y)) == pytest.approx(float(expected), rel=1e-12)


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

"""Differential tests against MONAI (a test dependency): same parameters, same numbers.

MONAI DiceLoss/DiceCELoss/GeneralizedDiceLoss/TverskyLoss with ``softmax=True,
to_onehot_y=True`` (or ``sigmoid=True``) against segloss's dice/dice_ce/generalized_dice/
tversky, values and gradients, for every parameter both libraries share. Mapping notes:
MONAI ``jaccard=True`` is segloss jaccard with smooth_nr/2, smooth_dr/2; MONAI ``weight``
lists the included classes only (segloss ``class_weights`` lists all C).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

monai_losses = pytest.importorskip("monai.losses")
from segloss_core import get_loss  # noqa: E402

MONAI_HAS_IGNORE = "ignore_index" in inspect.signature(monai_losses.DiceLoss.__init__).parameters


def _problem(seed, channels, spatial, batch, soft=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, channels, (batch, *spatial), generator=g)
    if soft:
        t = torch.rand(batch, channels, *spatial, generator=g, dtype=torch.float64)
        return x, t / t.sum(1, keepdim=True)
    return x, y


def _value_and_grad(fn, x, *args):
    x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = fn(x, *args)
    value.backward()
    return float(value), x.grad


def _assert_same(monai_fn, monai_target, ours, our_target, x, rtol=1e-10, atol=1e-12):
    v_m, g_m = _value_and_grad(monai_fn, x, monai_target)
    v_o, g_o = _value_and_grad(ours, x, our_target)
    assert v_o == pytest.approx(v_m, rel=rtol, abs=atol)
    torch.testing.assert_close(g_o, g_m, rtol=max(rtol, 1e-7), atol=max(atol, 1e-10))


spatial_st = st.lists(st.integers(2, 5), min_size=1, max_size=3)


@given(
    seed=st.integers(0, 10_000),
    channels=st.integers(2, 4),
    spatial=spatial_st,
    batch_size=st.integers(1, 3),
    include_background=st.booleans(),
    batch=st.booleans(),
    squared=st.booleans(),
    jaccard=st.booleans(),
    smooth_nr=st.sampled_from([0.0, 1e-5, 1.0]),
    smooth_dr=st.sampled_from([1e-5, 1.0]),
    reduction=st.sampled_from(["mean", "sum"]),
    weighted=st.booleans(),
)
def test_dice_loss_matches_monai(
    seed,
    channels,
    spatial,
    batch_size,
    include_background,
    batch,
    squared,
    jaccard,
    smooth_nr,
    smooth_dr,
    reduction,
    weighted,
):
    x, y = _problem(seed, channels, spatial, batch_size)
    weights = [0.5 + c for c in range(channels)] if weighted else None
    if weighted and not include_background and channels == 2:
        weights = None  # MONAI ignores `weight` when a single class remains (`num_of_classes != 1`)
    monai_weight = None if weights is None else (weights if include_background else weights[1:])
    monai = monai_losses.DiceLoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        squared_pred=squared,
        jaccard=jaccard,
        reduction=reduction,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
        weight=monai_weight,
    )
    name = "jaccard" if jaccard else "dice"
    scale = 0.5 if jaccard else 1.0
    ours = get_loss(
        name,
        backend="torch",
        include_background=include_background,
        squared=squared,
        reduction=reduction,
        smooth_nr=smooth_nr * scale,
        smooth_dr=smooth_dr * scale,
        batch=batch,
        class_weights=weights,
    )
    # MONAI's one-hot target is float32, which its squared (vector-norm) path mixes in: ~1e-8 relative
    _assert_same(monai, y[:, None], ours, y, x, rtol=1e-6 if squared else 1e-10, atol=1e-7 if squared else 1e-12)


@given(seed=st.integers(0, 10_000), channels=st.integers(2, 4), spatial=spatial_st, batch=st.booleans())
def test_soft_label_dice_matches_monai(seed, channels, spatial, batch):
    x, t = _problem(seed, channels, spatial, 2, soft=True)
    monai = monai_losses.DiceLoss(softmax=True, soft_label=True, batch=batch)
    ours = get_loss("dice", backend="torch", soft_intersection=True, batch=batch)
    _assert_same(monai, t, ours, t, x, rtol=1e-9)


@pytest.mark.skipif(not MONAI_HAS_IGNORE, reason="this MONAI DiceLoss has no ignore_index")
@given(seed=st.integers(0, 10_000), channels=st.integers(2, 4), spatial=spatial_st, in_range=st.booleans())
def test_ignore_index_matches_monai(seed, channels, spatial, in_range):
    x, y = _problem(seed, channels, spatial, 2)
    ignore = 1 if in_range else 255
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.where(torch.rand(y.shape, generator=g) < 0.3, torch.full_like(y, ignore), y)
    monai = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, ignore_index=ignore)
    ours = get_loss("dice", backend="torch", ignore_index=ignore)
    _assert_same(monai, y[:, None], ours, y, x)


@given(
    seed=st.integers(0, 10_000),
    channels=st.integers(2, 4),
    spatial=spatial_st,
    include_background=st.booleans(),
    batch=st.booleans(),
    lambda_dice=st.sampled_from([1.0, 0.3]),
    lambda_ce=st.sampled_from([1.0, 2.0]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    weighted=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_dice_ce_matches_monai(
    seed, channels, spatial, include_background, batch, lambda_dice, lambda_ce, label_smoothing, weighted, reduction
):
    assume(not (weighted and not include_background and channels == 2))  # MONAI drops a lone class's weight
    x, y = _problem(seed, channels, spatial, 2)
    weights = [0.5 + c for c in range(channels)] if weighted else None
    monai = monai_losses.DiceCELoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        batch=batch,
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
        label_smoothing=label_smoothing,
        reduction=reduction,
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float64),
    )
    ours = get_loss(
        "dice_ce",
        backend="torch",
        include_background=include_background,
        batch=batch,
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
        label_smoothing=label_smoothing,
        class_weights=weights,
        reduction=reduction,
    )
    _assert_same(monai, y[:, None], ours, y, x)


@given(seed=st.integers(0, 10_000), spatial=spatial_st, pos_weight=st.sampled_from([None, 3.0]))
def test_binary_dice_ce_matches_monai(seed, spatial, pos_weight):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, *spatial, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 1, *spatial), generator=g)
    monai = monai_losses.DiceCELoss(
        sigmoid=True, weight=None if pos_weight is None else torch.tensor([pos_weight], dtype=torch.float64)
    )
    ours = get_loss(
        "dice_ce", backend="torch", activation="sigmoid", pos_weight=None if pos_weight is None else [pos_weight]
    )
    _assert_same(monai, y.double(), ours, y, x)


@given(
    seed=st.integers(0, 10_000),
    channels=st.integers(2, 4),
    spatial=spatial_st,
    batch=st.booleans(),
    w_type=st.sampled_from(["square", "simple", "uniform"]),
    include_background=st.booleans(),
    absent=st.booleans(),
)
def test_generalized_dice_matches_monai(seed, channels, spatial, batch, w_type, include_background, absent):
    x, y = _problem(seed, channels, spatial, 2)
    if absent:
        y[y == channels - 1] = 0  # an absent class: MONAI's infinite-weight rule
    monai = monai_losses.GeneralizedDiceLoss(
        softmax=True, to_onehot_y=True, batch=batch, w_type=w_type, include_background=include_background
    )
    ours = get_loss(
        "generalized_dice", backend="torch", batch=batch, weight_type=w_type, include_background=include_background
    )
    # MONAI computes the weights in float32 (ground_o.float()): agreement to float32 rounding
    _assert_same(monai, y[:, None], ours, y, x, rtol=1e-6, atol=1e-7)


@given(
    seed=st.integers(0, 10_000),
    channels=st.integers(2, 4),
    spatial=spatial_st,
    alpha=st.sampled_from([0.3, 0.5, 0.9]),
    beta=st.sampled_from([0.7, 0.5, 0.1]),
    batch=st.booleans(),
)
def test_tversky_matches_monai(seed, channels, spatial, alpha, beta, batch):
    x, y = _problem(seed, channels, spatial, 2)
    monai = monai_losses.TverskyLoss(softmax=True, to_onehot_y=True, alpha=alpha, beta=beta, batch=batch)
    ours = get_loss("tversky", backend="torch", alpha=alpha, beta=beta, batch=batch)
    _assert_same(monai, y[:, None], ours, y, x)


def test_preset_monai_is_monai_dice_defaults():
    x, y = _problem(3, 4, (6, 5, 4), 2)
    monai = monai_losses.DiceLoss(softmax=True, to_onehot_y=True)
    _assert_same(monai, y[:, None], get_loss("dice", backend="torch", preset="monai"), y, x)
    _assert_same(monai, y[:, None], get_loss("dice", backend="torch"), y, x)


def test_numpy_reference_matches_monai_too():
    x, y = _problem(5, 3, (5, 5), 2)
    monai = monai_losses.DiceCELoss(softmax=True, to_onehot_y=True)
    expected = float(monai(x, y[:, None]))
    got = float(get_loss("dice_ce", backend="numpy")(x.numpy(), y.numpy()))
    assert got == pytest.approx(expected, rel=1e-12)


@given(
    seed=st.integers(0, 10_000),
    channels=st.integers(1, 4),
    spatial=spatial_st,
    gamma=st.sampled_from([0.0, 0.5, 2.0]),
    alpha=st.sampled_from([None, 0.25]),
    include_background=st.booleans(),
    weighted=st.booleans(),
)
def test_sigmoid_focal_matches_monai(seed, channels, spatial, gamma, alpha, include_background, weighted):
    x, y = _problem(seed, max(channels, 2), spatial, 2)
    if channels == 1:
        x, y = x[:, :1], (y > 0).long()
        include_background = True
    n_kept = channels if include_background else channels - 1
    assume(n_kept >= 1)
    weights = [0.5 + c for c in range(channels)] if weighted and n_kept > 1 else None
    monai = monai_losses.FocalLoss(
        include_background=include_background,
        to_onehot_y=channels > 1,
        gamma=gamma,
        alpha=alpha,
        weight=None if weights is None else (weights if include_background else weights[1:]),
    )
    ours = get_loss(
        "focal",
        backend="torch",
        activation="sigmoid",
        gamma=gamma,
        alpha=alpha,
        include_background=include_background,
        class_weights=weights,
    )
    target = y[:, None] if channels > 1 else y[:, None].double()
    _assert_same(monai, target, ours, y, x, rtol=1e-6, atol=1e-7)  # MONAI's focal computes in float32


@given(
    seed=st.integers(0, 10_000),
    channels=st.integers(2, 4),
    spatial=spatial_st,
    gamma=st.sampled_from([0.0, 2.0]),
    alpha=st.sampled_from([None, 0.25]),
)
def test_softmax_focal_matches_monai(seed, channels, spatial, gamma, alpha):
    x, y = _problem(seed, channels, spatial, 2)
    monai = monai_losses.FocalLoss(to_onehot_y=True, gamma=gamma, alpha=alpha, use_softmax=True)
    ours = get_loss("focal", backend="torch", preset="monai_softmax", gamma=gamma, alpha=alpha)
    _assert_same(monai, y[:, None], ours, y, x, rtol=1e-6, atol=1e-7)


def test_focal_with_gamma_zero_is_cross_entropy():
    x, y = _problem(1, 3, (4, 4), 2)
    focal = get_loss("focal", backend="torch", gamma=0.0)
    ce = get_loss("cross_entropy", backend="torch")
    assert float(focal(x, y)) == pytest.approx(float(ce(x, y)), rel=1e-12)


@given(seed=st.integers(0, 10_000), channels=st.integers(2, 4), spatial=spatial_st)
def test_mixed_activation_compound_reproduces_monai_dice_focal(seed, channels, spatial):
    """MONAI DiceFocalLoss(softmax=True) = softmax Dice + *sigmoid* focal on the same logits."""
    from segloss_core import compound

    x, y = _problem(seed, channels, spatial, 2)
    monai = monai_losses.DiceFocalLoss(softmax=True, to_onehot_y=True)
    ours = compound(
        [("dice", 1.0, {"activation": "softmax"}), ("focal", 1.0, {"activation": "sigmoid"})], backend="torch"
    )
    _assert_same(monai, y[:, None], ours, y, x, rtol=1e-6, atol=1e-7)


PRESET_CASES = [
    # (loss, preset, MONAI loss as users call it, MONAI wants a one-hot-able (B, 1, ...) target)
    ("dice", "monai", lambda: monai_losses.DiceLoss(softmax=True, to_onehot_y=True)),
    ("dice_ce", "monai", lambda: monai_losses.DiceCELoss(softmax=True, to_onehot_y=True)),
    ("generalized_dice", "monai", lambda: monai_losses.GeneralizedDiceLoss(softmax=True, to_onehot_y=True)),
    ("tversky", "monai", lambda: monai_losses.TverskyLoss(softmax=True, to_onehot_y=True)),
    ("focal", "monai", lambda: monai_losses.FocalLoss(to_onehot_y=True)),
    ("focal", "monai_softmax", lambda: monai_losses.FocalLoss(to_onehot_y=True, use_softmax=True)),
    ("dice_focal", "monai", lambda: monai_losses.DiceFocalLoss(softmax=True, to_onehot_y=True)),
    ("dice_focal", "monai_sigmoid", lambda: monai_losses.DiceFocalLoss(sigmoid=True, to_onehot_y=True)),
    ("hausdorff_dt", "monai", lambda: monai_losses.HausdorffDTLoss(softmax=True, to_onehot_y=True)),
    ("log_hausdorff_dt", "monai", lambda: monai_losses.LogHausdorffDTLoss(softmax=True, to_onehot_y=True)),
]


@pytest.mark.parametrize(
    ("name", "preset", "monai_factory"), PRESET_CASES, ids=[f"{c[0]}-{c[1]}" for c in PRESET_CASES]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_monai_presets_are_monai_defaults(name, preset, monai_factory, seed):
    """Each 'monai' preset is the MONAI class with its defaults, called with the activation and to_onehot_y."""
    x, y = _problem(seed, 3, (5, 4, 3), 2)
    if seed == 1:
        y[0][y[0] == 2] = 0  # a class absent from one sample
    # parts MONAI computes in float32: GDL weights, the focal term, the distance fields
    float32_inside = name in ("generalized_dice", "focal", "dice_focal", "hausdorff_dt", "log_hausdorff_dt")
    tol = {"rtol": 1e-5, "atol": 1e-7} if float32_inside else {}
    _assert_same(monai_factory(), y[:, None], get_loss(name, backend="torch", preset=preset), y, x, **tol)

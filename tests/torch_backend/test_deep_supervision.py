"""DeepSupervisionLoss with distance losses: each level's spacing, call inputs, term weights, warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from segloss_core import get_loss
from segloss_core.schedules import RebalanceSchedule
from segloss_torch import DeepSupervisionLoss
from segloss_torch.deep_supervision import level_spacing, resize_target


def _blobs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(1, *shape) labels 0/1/2: two boxes, so every class has a boundary at every level."""
    labels = torch.zeros(1, *shape, dtype=torch.long)
    h, w = shape
    labels[0, h // 4 : h // 2 + 2, w // 5 : w // 2 + 1] = 1
    labels[0, h // 2 + 3 : h - 2, w // 2 + 2 : w - 3] = 2
    return labels


def _phi_kervadec(labels: np.ndarray, num_classes: int, spacing: tuple[float, ...]) -> np.ndarray:
    """LIVIAETS one_hot2dist by hand (float64): −(d_inside − 1) inside a class, d outside, 0 if absent."""
    out = np.zeros((num_classes, *labels.shape))
    for c in range(num_classes):
        pos = labels == c
        if pos.any():
            neg = ~pos
            out[c] = (
                distance_transform_edt(neg, sampling=spacing) * neg
                - (distance_transform_edt(pos, sampling=spacing) - 1) * pos
            )
    return out


def _boundary_by_hand(logits: torch.Tensor, labels: torch.Tensor, spacing: tuple[float, ...]) -> float:
    """Kervadec's boundary loss on the foreground classes: mean over (b, c ≥ 1, x) of softmax·φ."""
    p = torch.softmax(logits.double(), dim=1).numpy()
    phi = np.stack([_phi_kervadec(labels[b].numpy(), p.shape[1], spacing) for b in range(p.shape[0])])
    return float((p[:, 1:] * phi[:, 1:]).mean())


def _outputs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 24, 20, generator=g).double(), torch.randn(1, 3, 12, 10, generator=g).double()]


@pytest.mark.parametrize("spacing", [None, (0.8, 2.5)])
def test_each_level_is_computed_at_its_own_spacing(spacing):
    """The half-resolution term equals the float64 reference computed by hand at twice the spacing
    (and differs from the one at full-resolution spacing, the old behaviour)."""
    outs, y = _outputs(), _blobs((24, 20), 0)
    loss = get_loss("boundary", backend="torch", spacing=spacing)
    ds = DeepSupervisionLoss(loss, weights=(0.0, 1.0))  # the half-resolution term alone
    base = spacing or (1.0, 1.0)
    y_half = resize_target(y, outs[1])
    want = _boundary_by_hand(outs[1], y_half, (2 * base[0], 2 * base[1]))
    old = _boundary_by_hand(outs[1], y_half, base)
    got = float(ds(outs, y))
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(want - old) > 0.1 * abs(want)  # the spacing matters here
    full = DeepSupervisionLoss(loss, weights=(1.0, 0.0))(outs, y)
    assert float(full) == pytest.approx(_boundary_by_hand(outs[0], y, base), rel=1e-6)


def test_anisotropic_factors_scale_each_axis_and_compounds_scale_only_their_distance_term():
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 3, 24, 20, generator=g).double(), torch.randn(2, 3, 12, 20, generator=g).double()]
    y = torch.cat([_blobs((24, 20), 0), _blobs((24, 20), 1).flip(-1)])
    compound = get_loss("generalized_dice_boundary", backend="torch", spacing=(0.5, 1.5))
    ds = DeepSupervisionLoss(compound, weights=(0.0, 1.0))
    y_half = resize_target(y, outs[1])
    direct = get_loss("generalized_dice_boundary", backend="torch", spacing=(1.0, 1.5))
    assert float(ds(outs, y)) == pytest.approx(float(direct(outs[1], y_half)), rel=1e-12)
    assert level_spacing(None, (2.0, 1.0)) == (2.0, 1.0)
    assert level_spacing(0.5, (2.0, 1.5)) == (1.0, 0.75)


def test_a_distance_map_is_downsampled_with_the_target():
    """distance_map= at full resolution: each level gets it resized nearest-exact like the target (the
    values of the voxels whose labels the level took), or a list of maps is used as given."""
    from segloss_torch import signed_distance_map

    outs, y = _outputs(1), _blobs((24, 20), 2)
    loss = get_loss("boundary", backend="torch", spacing=(0.8, 2.5))
    phi = signed_distance_map(y, 3, (0.8, 2.5), convention="signed").double()
    ds = DeepSupervisionLoss(loss, weights=(1.0, 1.0))
    phi_half = resize_target(phi, outs[1])
    np.testing.assert_array_equal(phi_half.numpy(), phi[:, :, 1::2, 1::2].numpy())  # nearest-exact: voxel 2i + 1
    y_half = resize_target(y, outs[1])
    assert torch.equal(phi_half[:, 1:] <= 0, F.one_hot(y_half, 3).movedim(-1, 1)[:, 1:].bool())  # sign agrees
    want = loss(outs[0], y, distance_map=phi) + loss(outs[1], y_half, distance_map=phi_half)
    assert float(ds(outs, y, distance_map=phi)) == pytest.approx(float(want), rel=1e-12)
    assert float(ds(outs, y, distance_map=[phi, phi_half])) == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(ValueError, match="1 entries of distance_map for 2 outputs"):
        ds(outs, y, distance_map=[phi])


def test_set_weights_reaches_every_level_and_rebalance_schedule_applies():
    outs, y = _outputs(2), _blobs((24, 20), 0)
    compound = get_loss("generalized_dice_boundary", backend="torch", spacing=(0.8, 2.5))
    ds = DeepSupervisionLoss(compound, weights=(0.5, 0.5))
    ds(outs, y)  # builds the half-resolution level
    schedule = RebalanceSchedule(start=0.01, step=0.01, cap=0.05)
    assert schedule.apply(ds, 3) == (1.0, 0.04)
    assert compound.term_weights == [1.0, 0.04]
    y_half = resize_target(y, outs[1])
    half = get_loss("generalized_dice_boundary", backend="torch", spacing=(1.6, 5.0))
    half.set_weights(generalized_dice=1.0, boundary=0.04)
    want = 0.5 * compound(outs[0], y) + 0.5 * half(outs[1], y_half)
    assert float(ds(outs, y)) == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(ValueError, match="has 0 terms named 'dice'"):
        ds.set_weights(dice=1.0)
    with pytest.raises(TypeError, match="has no term weights"):
        DeepSupervisionLoss(torch.nn.MSELoss()).set_weights(boundary=1.0)


def test_gradients_flow_to_every_weighted_level():
    outs = [o.clone().requires_grad_(True) for o in _outputs(4)]
    ds = DeepSupervisionLoss(get_loss("boundary", backend="torch", spacing=(0.8, 2.5)), weights=(0.7, 0.3))
    ds(outs, _blobs((24, 20), 0)).backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outs)


def test_nnunet_weights_with_two_outputs_warn_that_the_second_gets_weight_zero():
    outs, y = _outputs(5), _blobs((24, 20), 0)
    ds = DeepSupervisionLoss(get_loss("dice", backend="torch"), weights="nnunet")
    with pytest.warns(UserWarning, match=r"with 2 outputs gives weights \(1, 0\).*second output gets weight 0"):
        value = ds(outs, y)
    assert float(value) == pytest.approx(float(get_loss("dice", backend="torch")(outs[0], y)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds(outs, y)  # once per loss object
        DeepSupervisionLoss(get_loss("dice", backend="torch"), weights="nnunet")([*outs, outs[1][..., ::2, ::2]], y)
        DeepSupervisionLoss(get_loss("dice", backend="torch"), weights="exp")(outs, y)

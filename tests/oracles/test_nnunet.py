"""Differential tests against nnU-Net v2's own loss classes (optional: skipped unless nnunetv2 imports).

CI installs ``nnunetv2==2.8.1 --no-deps``: its loss modules need only torch, so nothing else
(and no other torch) is pulled in.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nnunetv2.training.loss.dice")
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss, DC_and_topk_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import TopKLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from segloss_core import get_loss

RTOL = 1e-6  # nnU-Net sums in float32 (sum(..., dtype=torch.float32)) even for float64 inputs


def _problem(seed, channels=4, spatial=(6, 5, 4), batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, channels, (batch, 1, *spatial), generator=g)
    return x, y


def _dc_and_ce(ignore_label=None, batch_dice=False, smooth=1e-5):
    """DC_and_CE_loss as nnUNetTrainer._build_loss builds it: MemoryEfficientSoftDiceLoss, no background."""
    return DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": smooth, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=ignore_label,
        dice_class=MemoryEfficientSoftDiceLoss,
    )


def _compare(theirs, ours, x, y_theirs, y_ours, rtol=RTOL):
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    va, vb = theirs(xa, y_theirs), ours(xb, y_ours)
    va.backward()
    vb.backward()
    assert float(vb) == pytest.approx(float(va), rel=rtol, abs=1e-7)
    torch.testing.assert_close(xb.grad, xa.grad.to(xb.grad.dtype), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_memory_efficient_soft_dice(batch_dice, seed):
    x, y = _problem(seed)
    theirs = MemoryEfficientSoftDiceLoss(
        softmax_helper_dim1, batch_dice=batch_dice, do_bg=False, smooth=1e-5, ddp=False
    )
    ours = get_loss("dice", backend="torch", preset="nnunet", batch=batch_dice)
    _compare(theirs, ours, x, y, y[:, 0])


@pytest.mark.parametrize("ignore", [None, 255])
def test_dc_and_ce(ignore):
    x, y = _problem(4)
    if ignore is not None:
        y[:, :, :2] = ignore
    theirs = _dc_and_ce(ignore_label=ignore)
    ours = get_loss("dice_ce", backend="torch", preset="nnunet", ignore_index=ignore)
    _compare(theirs, ours, x, y, y[:, 0])


def test_dc_and_ce_all_ignored():
    x, y = _problem(5)
    y[:] = 255
    theirs = _dc_and_ce(ignore_label=255)
    ours = get_loss("dice_ce", backend="torch", preset="nnunet", ignore_index=255)
    assert float(ours(x, y[:, 0])) == pytest.approx(float(theirs(x, y)))  # CE skipped, Dice = −1


@pytest.mark.parametrize("k", [10.0, 37.5])
def test_topk(k):
    x, y = _problem(6)
    theirs = TopKLoss(k=k)
    ours = get_loss("topk_ce", backend="torch", preset="nnunet", k=k)
    _compare(theirs, ours, x, y, y[:, 0], rtol=1e-12)


def test_dc_and_topk():
    x, y = _problem(7)
    theirs = DC_and_topk_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {"k": 10})
    # DC_and_topk_loss uses SoftDiceLoss (not the memory-efficient one): the same formula
    ours = get_loss("dice_topk", backend="torch", preset="nnunet")
    _compare(theirs, ours, x, y, y[:, 0])


@pytest.mark.parametrize("batch_dice", [False, True])
def test_dc_and_ce_nosmooth(batch_dice):
    """nnUNetTrainerDiceCELoss_noSmooth: DC_and_CE_loss with MemoryEfficientSoftDiceLoss(smooth=0)."""
    x, y = _problem(8)
    theirs = _dc_and_ce(batch_dice=batch_dice, smooth=0)
    ours = get_loss("dice_ce", backend="torch", preset="nnunet_nosmooth", batch=batch_dice)
    _compare(theirs, ours, x, y, y[:, 0])


# ---------------------------------------------------------------------------------------------------------
# region-based training (BraTS/KiTS): DC_and_BCE_loss as nnUNetTrainer._build_loss builds it with regions
# ---------------------------------------------------------------------------------------------------------
BRATS = ((1, 2, 3), (2, 3), (3,))
IGNORE_LABEL = 4  # nnU-Net: the ignore label is the largest label + 1


def _region_problem(seed, ignore, spatial=(6, 5, 4), batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, len(BRATS), *spatial, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (batch, *spatial), generator=g)
    y[0][y[0] == 3] = 1  # region 2 (enhancing tumour) empty in sample 0
    if ignore is not None:
        y[:, :2] = ignore
    return x, y


def _nnunet_region_target(y, ignore):
    """The target nnU-Net's loss sees: one channel per region (ConvertSegmentationToRegionsTransform, channel r =
    isin(seg, region r)), the ignore label's channel last when there is one (nnUNetTrainer.get_*_transforms)."""
    channels = [torch.isin(y, torch.tensor(region)) for region in BRATS]
    if ignore is not None:
        channels.append(y == ignore)
    return torch.stack(channels, dim=1)


def _dc_and_bce(batch_dice, ignore):
    return DC_and_BCE_loss(
        {},
        {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
        use_ignore_label=ignore is not None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )


@pytest.mark.parametrize("impl", ["native", "auto"])
@pytest.mark.parametrize("ignore", [None, IGNORE_LABEL])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_dc_and_bce_regions(batch_dice, ignore, impl):
    x, y = _region_problem(11, ignore)
    ours = get_loss(
        "dice_ce",
        backend="torch",
        preset="nnunet_regions",
        regions=BRATS,
        batch=batch_dice,
        ignore_index=ignore,
        impl=impl,
    )
    _compare(_dc_and_bce(batch_dice, ignore), ours, x, _nnunet_region_target(y, ignore), y)


@pytest.mark.parametrize("ignore", [None, IGNORE_LABEL])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_dc_and_bce_regions_reference(batch_dice, ignore):
    """The float64 NumPy reference reproduces nnU-Net's value and gradient too."""
    x, y = _region_problem(12, ignore)
    theirs = _dc_and_bce(batch_dice, ignore)
    xa = x.clone().requires_grad_(True)
    value = theirs(xa, _nnunet_region_target(y, ignore))
    value.backward()
    ours = get_loss(
        "dice_ce", backend="numpy", preset="nnunet_regions", regions=BRATS, batch=batch_dice, ignore_index=ignore
    )
    ref_value, ref_grad = ours.value_and_grad(x.numpy(), y.numpy())
    assert float(ref_value) == pytest.approx(float(value), rel=RTOL, abs=1e-7)
    torch.testing.assert_close(torch.from_numpy(ref_grad), xa.grad, rtol=1e-5, atol=1e-7)


def test_dc_and_bce_regions_all_ignored():
    """Every voxel ignored: nnU-Net's BCE is 0 / max(0, 1e-8) = 0 and its Dice −(1e-5 / 1e-5) = −1 per region."""
    x, y = _region_problem(13, IGNORE_LABEL)
    y[:] = IGNORE_LABEL
    theirs = _dc_and_bce(False, IGNORE_LABEL)
    ours = get_loss("dice_ce", backend="torch", preset="nnunet_regions", regions=BRATS, ignore_index=IGNORE_LABEL)
    _compare(theirs, ours, x, _nnunet_region_target(y, IGNORE_LABEL), y)
    assert float(ours(x, y)) == pytest.approx(-1.0)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_memory_efficient_soft_dice_regions(batch_dice):
    """The Dice term alone: MemoryEfficientSoftDiceLoss(apply_nonlin=sigmoid, do_bg=True) on the region target."""
    x, y = _region_problem(14, None)
    theirs = MemoryEfficientSoftDiceLoss(torch.sigmoid, batch_dice=batch_dice, do_bg=True, smooth=1e-5, ddp=False)
    ours = get_loss("dice", backend="torch", preset="nnunet_regions", regions=BRATS, batch=batch_dice)
    _compare(theirs, ours, x, _nnunet_region_target(y, None), y)

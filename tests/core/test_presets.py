"""Each preset against a literal transcription of its library's code (value and gradient).

The transcriptions below follow the quoted source lines (file and version in each
docstring; the preset's ``source`` says the same). MONAI is tested directly in
test_monai.py and nnU-Net directly in test_nnunet.py when it is installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segloss_core import get_loss


def _problem(seed=0, channels=3, spatial=(5, 4, 3), batch=2, absent=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, channels, (batch, *spatial), generator=g)
    if absent:
        y[0][y[0] == channels - 1] = 0  # the last class absent from sample 0 (and maybe the batch)
    return x, y


def _onehot(y, channels):
    return F.one_hot(y, channels).movedim(-1, 1).double()


def _check(preset, reference, x, y, rtol=1e-12, loss="dice", **params):
    ours = get_loss(loss, backend="torch", preset=preset, **params)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    va, vb = ours(xa, y), reference(xb, y)
    va.backward()
    vb.backward()
    assert float(va) == pytest.approx(float(vb), rel=rtol, abs=1e-14)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)


def smp_dice(x, y, smooth=0.0, eps=1e-7, ignore_index=None):
    """segmentation_models_pytorch v0.4.0/v0.5.0, losses/dice.py DiceLoss(mode='multiclass').forward and
    losses/_functional.py soft_tversky_score(alpha=beta=0.5): dims=(0, 2), L1 intersection,
    clamp_min(eps) on the whole denominator, absent classes zeroed (mask = y_true.sum(dims) > 0), mean."""
    bs, num_classes = x.shape[:2]
    y_pred = x.log_softmax(dim=1).exp().view(bs, num_classes, -1)
    y_true = y.view(bs, -1)
    if ignore_index is not None:
        mask = y_true != ignore_index
        y_pred = y_pred * mask.unsqueeze(1)
        y_true = F.one_hot((y_true * mask).to(torch.long), num_classes).permute(0, 2, 1) * mask.unsqueeze(1)
    else:
        y_true = F.one_hot(y_true, num_classes).permute(0, 2, 1)
    y_true = y_true.type_as(y_pred)
    dims = (0, 2)
    output_sum = torch.sum(y_pred, dim=dims)
    target_sum = torch.sum(y_true, dim=dims)
    difference = torch.linalg.vector_norm(y_pred - y_true, ord=1, dim=dims)
    intersection = (output_sum + target_sum - difference) / 2
    fp = output_sum - intersection
    fn = target_sum - intersection
    scores = (intersection + smooth) / (intersection + 0.5 * fp + 0.5 * fn + smooth).clamp_min(eps)
    loss = 1.0 - scores
    loss *= (y_true.sum(dims) > 0).to(loss.dtype)
    return loss.mean()


def test_smp():
    x, y = _problem()
    _check("smp", smp_dice, x, y)


def test_smp_with_ignore_index():
    x, y = _problem(seed=3)
    y[:, 0] = 255
    _check("smp", lambda a, b: smp_dice(a, b, ignore_index=255), x, y, ignore_index=255)


def nnunet_memory_efficient_dice(x, y, batch_dice=False, smooth=1e-5):
    """nnU-Net v2.8.1 nnunetv2/training/loss/dice.py MemoryEfficientSoftDiceLoss(apply_nonlin=softmax,
    do_bg=False, smooth=1e-5).forward: dc = (2 I + s) / clamp_min(G + P + s, 1e-8); return −dc.mean()."""
    x = torch.softmax(x, 1)
    axes = tuple(range(2, x.ndim))
    y_onehot = _onehot(y, x.shape[1])[:, 1:]
    x = x[:, 1:]
    intersect, sum_pred, sum_gt = (x * y_onehot).sum(axes), x.sum(axes), y_onehot.sum(axes)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dc = (2 * intersect + smooth) / (sum_gt + sum_pred + smooth).clamp_min(1e-8)
    return -dc.mean()


@pytest.mark.parametrize("batch", [False, True])
def test_nnunet_transcribed(batch):
    x, y = _problem(seed=1)
    _check("nnunet", lambda a, b: nnunet_memory_efficient_dice(a, b, batch), x, y, batch=batch)
    _check("nnunet_nosmooth", lambda a, b: nnunet_memory_efficient_dice(a, b, batch, 0.0), x, y, batch=batch)


def flattened_dice(x, y, sign):
    """Keras recipe (jocicmarko/ultrasound-nerve-segmentation train.py, keras#3611) and ivadomed
    losses.py DiceLoss: everything flattened, (2 I + 1)/(P + G + 1), loss −dice; sigmoid output."""
    p = torch.sigmoid(x).reshape(-1)
    t = y.double().reshape(-1)
    return sign * (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)


@pytest.mark.parametrize("preset", ["keras", "ivadomed"])
def test_keras_and_ivadomed(preset):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 6, 5), generator=g)
    _check(preset, lambda a, b: flattened_dice(a, b, -1.0), x, y)


def vnet_soft_dice(x, y):
    """V-Net eq. (1) on the foreground softmax channel: 1 − mean_b 2Σ p1 g / (Σ p1² + Σ g² + 1e-5)."""
    p1 = torch.softmax(x, 1)[:, 1].flatten(1)
    g = (y == 1).double().flatten(1)
    return 1 - (2 * (p1 * g).sum(1) / ((p1 * p1).sum(1) + (g * g).sum(1) + 1e-5)).mean()


def test_vnet():
    x, y = _problem(seed=4, channels=2, absent=False)
    _check("vnet", vnet_soft_dice, x, y)


def isensee2017_soft_dice(x, y):
    """MIC-DKFZ/BraTS2017 soft_dice_per_img_in_batch: per image and foreground class
    2I/(P + G + 1e-6), loss −mean."""
    p = torch.softmax(x, 1).flatten(2)[:, 1:]
    g = _onehot(y, x.shape[1]).flatten(2)[:, 1:]
    return -(2 * (p * g).sum(2) / (p.sum(2) + g.sum(2) + 1e-6)).mean()


def test_isensee2017():
    x, y = _problem(seed=5, channels=4)
    _check("isensee2017", isensee2017_soft_dice, x, y)


def diceloss_cpp(x, y, ignore_channel=-1):
    """nslay/diceloss_cpp DiceLoss() (smooth 0, p 1, mean) for C >= 2: per (b, c) 1 − 2I/(P + G), 0 where
    P + G = 0, the ignored channel left at 0 but still counted: mean over all C, then over B."""
    p = torch.softmax(x, 1).flatten(2)
    g = _onehot(y, x.shape[1]).flatten(2)
    num, den = 2 * (p * g).sum(2), p.sum(2) + g.sum(2)
    loss = torch.where(den == 0, torch.zeros_like(den), 1 - num / torch.where(den == 0, 1.0, den))
    if ignore_channel >= 0:
        loss = loss.clone()
        loss[:, ignore_channel] = 0
    return loss.mean(1).mean()


def test_diceloss_cpp():
    x, y = _problem(seed=6)
    _check("diceloss_cpp", diceloss_cpp, x, y)
    _check("diceloss_cpp", lambda a, b: diceloss_cpp(a, b, ignore_channel=0), x, y, include_background=False)


def boundary_loss_dice(x, y):
    """LIVIAETS/boundary-loss losses.py DiceLoss(idc=all): 1 − (2I + 1e-10)/(P + G + 1e-10), mean over B × idc."""
    p = torch.softmax(x, 1).flatten(2)
    g = _onehot(y, x.shape[1]).flatten(2)
    return (1 - (2 * (p * g).sum(2) + 1e-10) / (p.sum(2) + g.sum(2) + 1e-10)).mean()


def test_boundary_loss():
    x, y = _problem(seed=7)
    _check("boundary_loss", boundary_loss_dice, x, y)


def smp_jaccard(x, y, eps=1e-7):
    """segmentation_models_pytorch v0.5.0 losses/jaccard.py JaccardLoss(mode='multiclass') with
    _functional.py soft_jaccard_score = soft_tversky_score(alpha=beta=1): dims=(0, 2), L1 intersection,
    I/clamp_min(I + FP + FN, eps), absent classes zeroed (mask = y_true.sum(dims) > 0), mean."""
    bs, num_classes = x.shape[:2]
    y_pred = x.log_softmax(dim=1).exp().reshape(bs, num_classes, -1)
    y_true = F.one_hot(y.reshape(bs, -1), num_classes).permute(0, 2, 1).type_as(y_pred)
    dims = (0, 2)
    output_sum, target_sum = y_pred.sum(dims), y_true.sum(dims)
    intersection = (output_sum + target_sum - torch.linalg.vector_norm(y_pred - y_true, ord=1, dim=dims)) / 2
    fp, fn = output_sum - intersection, target_sum - intersection
    loss = 1.0 - intersection / (intersection + fp + fn).clamp_min(eps)
    return (loss * (y_true.sum(dims) > 0).to(loss.dtype)).mean()


def test_jaccard_smp():
    x, y = _problem(seed=8)
    _check("smp", smp_jaccard, x, y, loss="jaccard")


def abraham_focal_tversky(x, y):
    """nabsabraham/focal-tversky-unet losses.py: tversky() over K.flatten of everything, smooth 1,
    alpha = 0.7 on false negatives, (1 − alpha) on false positives; focal_tversky = (1 − TI)^0.75."""
    p = torch.sigmoid(x).reshape(-1)
    t = y.double().reshape(-1)
    true_pos = (t * p).sum()
    false_neg = (t * (1 - p)).sum()
    false_pos = ((1 - t) * p).sum()
    alpha = 0.7
    tversky = (true_pos + 1) / (true_pos + alpha * false_neg + (1 - alpha) * false_pos + 1)
    return (1 - tversky) ** 0.75


def test_focal_tversky_abraham2019():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 1, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 6, 5), generator=g)
    _check("abraham2019", abraham_focal_tversky, x, y, loss="focal_tversky")


def salehi_tversky(x, y, alpha=0.3, beta=0.7, smooth=1e-5):
    """Salehi et al. 2017 eq. (3) per sample and class: TI = Σpg/(Σpg + alpha·Σp(1 − g) + beta·Σ(1 − p)g), alpha
    on false positives (0.3) and beta on false negatives (0.7), with MONAI TverskyLoss's smoothing 1e-5 and
    mean of 1 − TI over (sample, class) — the segloss defaults the preset keeps."""
    p = torch.softmax(x, 1).flatten(2)
    g = _onehot(y, x.shape[1]).flatten(2)
    tp = (p * g).sum(2)
    fp = (p * (1 - g)).sum(2)
    fn = ((1 - p) * g).sum(2)
    return (1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def test_tversky_salehi2017_weights_false_negatives_more():
    x, y = _problem(seed=10)
    _check("salehi2017", salehi_tversky, x, y, loss="tversky")
    # the asymmetry matters: swapping alpha and beta changes the value
    swapped = get_loss("tversky", backend="torch", alpha=0.7, beta=0.3)(x, y)
    assert abs(float(swapped) - float(salehi_tversky(x, y))) > 1e-3


@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_torch(ignore_index, label_smoothing, weighted):
    """torch.nn.CrossEntropyLoss (the 'torch' preset): weighted mean over valid voxels, PyTorch's label smoothing."""
    x, y = _problem(seed=11)
    if ignore_index is not None:
        y[0, :2] = ignore_index
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64) if weighted else None
    reference = torch.nn.CrossEntropyLoss(
        weight=weight, ignore_index=-100 if ignore_index is None else ignore_index, label_smoothing=label_smoothing
    )
    params = {"ignore_index": ignore_index, "label_smoothing": label_smoothing}
    if weighted:
        params["class_weights"] = weight.tolist()
    _check("torch", reference, x, y, loss="cross_entropy", **params)


@pytest.mark.parametrize("pos_weight", [None, [2.0, 0.5]])
def test_bce_torch(pos_weight):
    """torch.nn.BCEWithLogitsLoss (the 'torch' preset) on (B, C, *spatial) multi-label targets."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 2, x.shape, generator=g).double()
    pw = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float64)[:, None, None]
    reference = torch.nn.BCEWithLogitsLoss(pos_weight=pw)
    _check("torch", reference, x, t, loss="bce", pos_weight=pos_weight)


def test_every_dice_preset_has_a_source_and_a_test():
    from segloss_core import describe

    tested = {
        "monai",
        "nnunet",
        "nnunet_nosmooth",
        "nnunet_regions",
        "smp",
        "keras",
        "ivadomed",
        "vnet",
        "isensee2017",
        "diceloss_cpp",
        "boundary_loss",
    }
    presets = {p.name: p for p in describe("dice").presets}
    assert set(presets) == tested
    assert all(p.source for p in presets.values())


# Where each built-in preset is checked against its source (a transcription here, or the library itself).
PRESET_TESTS = {
    **{
        ("dice", name): "tests/core/test_presets.py"
        for name in ("nnunet", "nnunet_nosmooth", "smp", "keras", "ivadomed")
    },
    **{
        ("dice", name): "tests/core/test_presets.py"
        for name in ("vnet", "isensee2017", "diceloss_cpp", "boundary_loss")
    },
    ("dice", "monai"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("dice_ce", "monai"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("generalized_dice", "monai"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("tversky", "monai"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("focal", "monai"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("focal", "monai_softmax"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("dice_focal", "monai"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("dice_focal", "monai_sigmoid"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("hausdorff_dt", "monai"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("log_hausdorff_dt", "monai"): "tests/oracles/test_monai.py::test_monai_presets_are_monai_defaults",
    ("dice_ce", "nnunet"): "tests/oracles/test_nnunet.py::test_dc_and_ce",
    ("dice_ce", "nnunet_nosmooth"): "tests/oracles/test_nnunet.py::test_dc_and_ce_nosmooth",
    ("dice_ce", "nnunet_regions"): "tests/oracles/test_nnunet.py::test_dc_and_bce_regions",
    ("dice", "nnunet_regions"): "tests/oracles/test_nnunet.py::test_memory_efficient_soft_dice_regions",
    ("topk_ce", "nnunet"): "tests/oracles/test_nnunet.py::test_topk",
    ("dice_topk", "nnunet"): "tests/oracles/test_nnunet.py::test_dc_and_topk",
    ("jaccard", "smp"): "tests/core/test_presets.py::test_jaccard_smp",
    ("tversky", "salehi2017"): "tests/core/test_presets.py::test_tversky_salehi2017_weights_false_negatives_more",
    ("focal_tversky", "abraham2019"): "tests/core/test_presets.py::test_focal_tversky_abraham2019",
    ("cross_entropy", "torch"): "tests/core/test_presets.py::test_cross_entropy_torch",
    ("bce", "torch"): "tests/core/test_presets.py::test_bce_torch",
    ("bce", "smp"): "tests/oracles/test_peer_parity.py::test_bce_smp_preset_matches_soft_bce",
    ("cross_entropy", "smp"): (
        "tests/oracles/test_peer_parity.py::test_cross_entropy_smp_preset_matches_soft_cross_entropy"
    ),
    ("focal", "smp"): "tests/oracles/test_peer_parity.py::test_focal_smp_preset_matches_smp",
    ("lovasz_softmax", "berman2018"): "tests/torch_backend/test_voxelwise.py::test_lovasz_matches_berman",
    ("boundary", "kervadec2019"): "tests/torch_backend/test_distance_losses.py::test_boundary_matches_liviaets",
    (
        "generalized_dice_boundary",
        "kervadec2019",
    ): "tests/torch_backend/test_distance_losses.py::test_kervadec2019_recipe",
}


def test_every_builtin_preset_is_checked_against_its_source():
    from pathlib import Path

    from segloss_core import describe, list_losses
    from segloss_core.losses import BUILTIN_SPECS

    builtin = {spec.name for spec in BUILTIN_SPECS}
    presets = {(name, p.name) for name in list_losses() if name in builtin for p in describe(name).presets}
    assert presets == set(PRESET_TESTS)
    root = Path(__file__).resolve().parents[2]
    for where in set(PRESET_TESTS.values()):
        path, _, test = where.partition("::")
        source = (root / path).read_text()
        assert not test or f"def {test}(" in source, where

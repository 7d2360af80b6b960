"""Top-k CE, Lovász-softmax and deep supervision: literal transcriptions, gradcheck, edge cases."""

from __future__ import annotations

import pytest
import torch

from segloss_core import deep_supervision_weights, get_loss
from segloss_torch import DeepSupervisionLoss


def _problem(seed=0, channels=3, spatial=(6, 5), batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=g, dtype=torch.float64)
    y = torch.randint(0, channels, (batch, *spatial), generator=g)
    return x, y


def berman_lovasz_softmax(probas, labels, per_image=False, ignore=None):
    """bermanmaxim/LovaszSoftmax pytorch/lovasz_losses.py, transcribed: classes='present', loops as the original."""

    def lovasz_grad(gt_sorted):
        gts = gt_sorted.sum()
        intersection = gts - gt_sorted.cumsum(0)
        union = gts + (1 - gt_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        return jaccard

    def flat(probas, labels):
        c = probas.shape[1]
        probas = probas.movedim(1, -1).reshape(-1, c)
        labels = labels.reshape(-1)
        if ignore is None:
            return probas, labels
        valid = labels != ignore
        return probas[valid], labels[valid]

    def flat_loss(probas, labels):
        losses = []
        for c in range(probas.shape[1]):
            fg = (labels == c).double()
            if fg.sum() == 0:
                continue
            errors = (fg - probas[:, c]).abs()
            errors_sorted, perm = torch.sort(errors, 0, descending=True)
            losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
        return torch.stack(losses).mean() if losses else probas.sum() * 0

    if per_image:
        return torch.stack([flat_loss(*flat(p[None], lab[None])) for p, lab in zip(probas, labels, strict=True)]).mean()
    return flat_loss(*flat(probas, labels))


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("ignore", [None, 255])
def test_lovasz_matches_berman(per_image, ignore):
    x, y = _problem(1, spatial=(7, 6, 3))
    if ignore is not None:
        y[:, 0] = ignore
    ours = get_loss("lovasz_softmax", backend="torch", per_image=per_image, ignore_index=ignore)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    va = ours(xa, y)
    vb = berman_lovasz_softmax(torch.softmax(xb, 1), y, per_image=per_image, ignore=ignore)
    va.backward()
    vb.backward()
    assert float(va) == pytest.approx(float(vb), rel=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["topk_ce", "lovasz_softmax", "dice_topk"])
def test_gradcheck(name):
    x, y = _problem(2, spatial=(4, 3))
    loss = get_loss(name, backend="torch")
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x.requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_topk_pools():
    x, y = _problem(3)
    y[0] = 255
    valid = get_loss("topk_ce", backend="torch", ignore_index=255, k=50.0)
    everything = get_loss("topk_ce", backend="torch", ignore_index=255, k=50.0, pool="all")
    ce = torch.nn.functional.cross_entropy(x, y, ignore_index=255, reduction="none")[1].reshape(-1)
    assert float(valid(x, y)) == pytest.approx(float(ce.topk(15).values.mean()))
    assert float(everything(x, y)) == pytest.approx(float(ce.topk(30).values.mean()))  # 30 ignored zeros pooled
    x2, y2 = _problem(6)
    assert float(get_loss("topk_ce", backend="torch", k=100.0)(x2, y2)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(x2, y2))
    )


def test_topk_keeps_at_least_one_voxel():
    x, y = _problem(4, spatial=(2, 2), batch=1)
    value = get_loss("topk_ce", backend="torch", k=1.0)(x, y)
    assert float(value) == pytest.approx(float(torch.nn.functional.cross_entropy(x, y, reduction="none").max()))


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == (1.0,)
    w = deep_supervision_weights(4, "nnunet")
    assert w == pytest.approx((1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0))
    assert deep_supervision_weights(6, "exp") == (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0625)
    assert deep_supervision_weights(3, "two") == (1.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        deep_supervision_weights(3, "linear")
    with pytest.raises(ValueError, match="2 entries for 3 outputs"):
        deep_supervision_weights(3, [1.0, 2.0])


def test_deep_supervision_wrapper_resizes_targets_nearest_exact():
    g = torch.Generator().manual_seed(5)
    outs = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2)]
    y = torch.randint(0, 3, (2, 8, 8), generator=g)
    loss = get_loss("dice_ce", backend="torch", preset="nnunet")
    ds = DeepSupervisionLoss(loss, weights="nnunet")
    w = deep_supervision_weights(3)
    y4 = torch.nn.functional.interpolate(y[:, None].float(), size=(4, 4), mode="nearest-exact")[:, 0].long()
    expected = w[0] * loss(outs[0], y) + w[1] * loss(outs[1], y4)
    assert float(ds(outs, y)) == pytest.approx(float(expected))
    assert float(ds(outs, [y, y4, y4[:, ::2, ::2]])) == pytest.approx(float(expected))
    with pytest.raises(TypeError, match="list of tensors"):
        ds(outs[0], y)

"""The lean backward of the fused CPU kernels: an upstream gradient that reaches only the lean statistics.

When ∂L/∂stat is 0 for kPredSq and kAbsDiff (``lean_gradient`` in ``csrc/kernels/region_stats.cuh``:
dice, jaccard, tversky, generalized dice, CE, BCE, boundary, Hausdorff-DT and their compounds),
``region_stats_backward`` leaves those terms out, computes only the field terms whose upstream is not 0
(``field_gradient_bits``), skips a class whose upstream is 0 on every statistic with a gradient
(``class_without_gradient``: its field is not read) and, for softmax, recomputes d/dp and d/dlog p in
its second pass. These tests check that path against a float64 autograd reference written from the
per-voxel definitions (``docs/architecture.md``, "Statistics, then a formula"), against the generic
path (linearity of the backward in the upstream gradient), by float64 gradcheck, and for every
statistics loss in float16/bfloat16 against the float64 native path.
"""

from __future__ import annotations

import pytest
import torch

from segloss_core import get_loss
from segloss_core.statistics import FUSED_FIELD_SLOTS, FUSED_NUM_SLOTS, FUSED_SLOTS

SLOTS = {**FUSED_SLOTS, **FUSED_FIELD_SLOTS}  # every named slot of the kernels' output

pytestmark = pytest.mark.usefixtures("fused_kernels")  # built at run time, never at collection

ACTIVATIONS = {"softmax": 0, "sigmoid": 1, "none": 2}
LEAN_SLOTS = ("intersection", "pred_sum", "target_sum", "ce_pos", "ce_neg", "count")
FIELD_SLOTS = ("field_pred_sum", "field_sq_err_sum")  # in the lean set, each with its field (φ, F)
OTHER_SLOTS = ("pred_sq_sum", "abs_diff_sum")  # with a gradient, outside the lean set
SLOT_SETS = {"lean": LEAN_SLOTS, "fields": LEAN_SLOTS + FIELD_SLOTS, "every": LEAN_SLOTS + FIELD_SLOTS + OTHER_SLOTS}
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 1e-6, torch.float64: 1e-13}


def _inputs(activation: str, targets: str, dtype: torch.dtype, voxels: int = 131, seed: int = 3):
    """(logits, labels, soft target, mask) of (2, 3, voxels): 131 voxels leave a ragged tile (the
    fields of a full tile are read in place, those of a ragged one from the tile)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 3, voxels, generator=g, dtype=torch.float64) * 2
    if activation == "none":
        z = torch.softmax(z, 1).clamp(0.02, 0.98)  # probabilities away from 0 and 1 (the 1/p terms)
    labels = torch.randint(0, 3, (2, voxels), generator=g)
    target = None
    if targets == "soft":
        target = torch.softmax(torch.randn(2, 3, voxels, generator=g, dtype=torch.float64), 1).to(dtype)
        labels = None
    mask = torch.rand(2, voxels, generator=g, dtype=torch.float64)
    return z.to(dtype), labels, target, mask


def _upstream(slots: tuple[str, ...], activation: str, seed: int = 5) -> torch.Tensor:
    """∂L/∂stat (2, 3, FUSED_NUM_SLOTS) in float64: random on ``slots``, 0 elsewhere (ce_neg: 0 under
    softmax, whose kernels do not compute it)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(2, 3, FUSED_NUM_SLOTS, dtype=torch.float64)
    for name in slots:
        if name == "ce_neg" and activation == "softmax":
            continue
        u[:, :, SLOTS[name]] = torch.randn(2, 3, generator=g, dtype=torch.float64)
    return u


def _fields(voxels: int = 131, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """φ (signed, as a distance map) and F (non-negative, as d_p^α + d_g^α) of (2, 3, voxels), float64."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(2, 3, voxels, generator=g, dtype=torch.float64) * 4
    return phi, phi.abs() + torch.rand(2, 3, voxels, generator=g, dtype=torch.float64)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _op_gradient(z, labels, target, mask, activation: str, upstream: torch.Tensor, fields=(None, None)) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    z = z.detach().clone().requires_grad_(True)
    phi, weight = (None if f is None else f.to(_accumulation(z.dtype)) for f in fields)
    stats = torch.ops.segloss.region_stats(z, labels, target, mask, act, 0, False, act != 0, False, None, phi, weight)
    (grad,) = torch.autograd.grad((stats * upstream.to(stats.dtype)).sum(), z)
    return grad


def _reference_gradient(z, labels, target, mask, activation: str, upstream: torch.Tensor, fields=(None, None)):
    """∂(Σ upstream · stat)/∂z in float64, by autograd through the statistics' per-voxel terms (a field
    that is not given is 0)."""
    z = z.detach().double().requires_grad_(True)
    if activation == "softmax":
        p, neg_log_p = torch.softmax(z, 1), -torch.log_softmax(z, 1)
        neg_log_1mp = torch.zeros_like(p)
    elif activation == "sigmoid":
        p = torch.sigmoid(z)
        neg_log_p, neg_log_1mp = torch.nn.functional.softplus(-z), torch.nn.functional.softplus(z)
    else:
        p, neg_log_p, neg_log_1mp = z, -torch.log(z), -torch.log1p(-z)
    g = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).double() if target is None else target.double()
    w = mask.double()[:, None]
    terms = {
        "intersection": w * p * g,
        "pred_sum": w * p,
        "target_sum": w * g,
        "pred_sq_sum": w * p * p,
        "abs_diff_sum": w * (p - g).abs(),
        "ce_pos": w * g * neg_log_p,
        "ce_neg": w * (1 - g) * neg_log_1mp,
        "count": w.expand_as(p),
    }
    phi, weight = (torch.zeros_like(p) if f is None else f.to(_accumulation(z.dtype)).double() for f in fields)
    terms["field_pred_sum"] = w * p * phi
    terms["field_sq_err_sum"] = w * (p - g) ** 2 * weight
    loss = sum((upstream[:, :, SLOTS[name]][..., None] * term).sum() for name, term in terms.items())
    (grad,) = torch.autograd.grad(loss, z)
    return grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("slots", list(SLOT_SETS))
@pytest.mark.parametrize("targets", ["labels", "soft"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_backward_matches_float64_autograd(activation, targets, slots, dtype):
    """The gradient in the logits' dtype, accumulated in float32 (float64 for float64): equal to the
    float64 reference on the same (rounded) inputs within one rounding of the dtype (the fields given
    with every slot set: their slots' upstream is 0 with "lean")."""
    z, labels, target, mask = _inputs(activation, targets, dtype)
    upstream = _upstream(SLOT_SETS[slots], activation)
    fields = _fields()
    grad = _op_gradient(z, labels, target, mask, activation, upstream, fields)
    reference = _reference_gradient(z, labels, target, mask, activation, upstream, fields)
    assert grad.dtype == dtype
    eps = EPS[dtype]
    accumulate = 1e-6 if dtype != torch.float64 else 1e-13  # float32 accumulation of the statistics
    torch.testing.assert_close(
        grad.double(), reference, rtol=eps + accumulate, atol=(eps + accumulate) * reference.abs().max().item()
    )


@pytest.mark.parametrize("targets", ["labels", "soft"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_lean_path_is_the_generic_path(activation, targets):
    """The backward is linear in the upstream gradient: the lean path's gradient of the lean slots plus
    the generic path's gradient of the others is the generic path's gradient of their sum (float64)."""
    z, labels, target, mask = _inputs(activation, targets, torch.float64)
    fields = _fields()
    for lean_slots in (LEAN_SLOTS, LEAN_SLOTS + FIELD_SLOTS, FIELD_SLOTS[:1], FIELD_SLOTS[1:]):
        lean = _upstream(lean_slots, activation)
        other = _upstream(OTHER_SLOTS, activation, seed=9)
        both = _op_gradient(z, labels, target, mask, activation, lean + other, fields)
        parts = _op_gradient(z, labels, target, mask, activation, lean, fields) + _op_gradient(
            z, labels, target, mask, activation, other, fields
        )
        torch.testing.assert_close(parts, both, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("slots", ["lean", "fields"])
@pytest.mark.parametrize("targets", ["labels", "soft"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_a_class_without_gradient_reads_no_field(activation, targets, slots):
    """A class whose upstream is 0 on every statistic with a gradient (the background of a boundary
    loss without it; its count may have one) is skipped: the gradient equals the float64 reference,
    and a non-finite field of that class does not reach it (float64)."""
    z, labels, target, mask = _inputs(activation, targets, torch.float64)
    upstream = _upstream(SLOT_SETS[slots], activation)
    upstream[:, 0] = 0.0
    upstream[:, 0, SLOTS["count"]] = 1.5
    phi, weight = _fields()
    reference = _reference_gradient(z, labels, target, mask, activation, upstream, (phi, weight))
    phi[:, 0], weight[:, 0] = float("nan"), float("inf")
    grad = _op_gradient(z, labels, target, mask, activation, upstream, (phi, weight))
    torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("variant", ["labels", "ignore", "soft"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_gradcheck_lean_backward(activation, variant):
    """float64 gradcheck of the op's lean slots, the fields' with them (gradcheck's upstream is then 0
    on every other slot)."""
    z, labels, target, mask = _inputs(activation, "soft" if variant == "soft" else "labels", torch.float64, voxels=13)
    act = ACTIVATIONS[activation]
    has_ignore = variant == "ignore"
    if has_ignore:
        labels = labels.clone()
        labels[:, :3] = 255
    index = torch.tensor([SLOTS[name] for name in LEAN_SLOTS + FIELD_SLOTS])
    phi, weight = _fields(voxels=13)

    def lean_stats(t):
        stats = torch.ops.segloss.region_stats(
            t, labels, target, mask, act, 255, has_ignore, act != 0, False, None, phi, weight
        )
        return stats.index_select(2, index)

    assert torch.autograd.gradcheck(lean_stats, (z.requires_grad_(True),), eps=1e-6, atol=1e-6)


LOSSES = ["dice", "jaccard", "tversky", "generalized_dice", "cross_entropy", "bce", "dice_ce"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSSES)
def test_low_precision_losses_match_float64(name, dtype):
    """Every statistics loss on float16/bfloat16 logits: value and gradient (in the logits' dtype) equal
    the float64 native path on the same rounded logits, within the dtype's rounding."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 4, 9, 8, 7, generator=g) * 3).to(dtype)
    y = torch.randint(0, 4, (2, 9, 8, 7), generator=g)
    params = {"activation": "sigmoid"} if name == "bce" else {}
    if name == "bce":
        y = torch.randint(0, 2, (2, 4, 9, 8, 7), generator=g).to(torch.float64)
    results = []
    for impl, logits, target in (("fused", x, y.to(dtype) if y.is_floating_point() else y), ("native", x.double(), y)):
        loss = get_loss(name, backend="torch", impl=impl, **params)
        z = logits.detach().clone().requires_grad_(True)
        value = loss(z, target)
        value.backward()
        results.append((value.detach().double(), z.grad))
    (value, grad), (value64, grad64) = results
    assert grad.dtype == dtype
    eps = EPS[dtype]
    torch.testing.assert_close(value, value64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=eps, atol=eps * grad64.abs().max().item())

"""Voxelwise losses: top-k cross-entropy and Lovász-softmax.

They need per-voxel selection or sorting, not just sums. Each has one definition in array-API
code (:func:`topk_ce_value`, :func:`lovasz_softmax_value`) on the per-voxel values p, log p, g
and the voxel weights w: the float64 reference runs it on the tape of
``segloss_core.reference.autodiff`` (its VJP then goes through the activation, as for every
statistic), the torch backend under autograd. Only the top-k selection is the caller's
(``largest``), so torch keeps its ``topk`` and the reference a stable sort (ties: first voxel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..arrays import device, get_namespace
from ..reference.autodiff import TapeNamespace, Var, gradients
from ..reference.statistics import activation_backward, voxel_terms
from ..spec import LossSpec, Param, Params, Preset
from ..statistics import Voxel, xlogy
from ..validation import PreparedInputs
from . import common
from .formula import constant_vector, included_classes, safe_ratio

SOFTMAX_OR_PROBABILITIES = replace(common.ACTIVATION, choices=("softmax", "none"))
MEAN_ONLY = replace(common.REDUCTION, choices=("mean",), doc="mean over (present) classes and images")
MEAN_OR_SUM = replace(common.REDUCTION, choices=("mean", "sum"), doc="mean or sum of the selected voxels' CE")


def topk_count(pool_size: int, k_percent: float) -> int:
    """Number of voxels kept: ⌊pool · k / 100⌋, at least 1 (nnU-Net's int() could give 0)."""
    return max(1, math.floor(pool_size * k_percent / 100.0))


def voxel_mask_required(prepared: PreparedInputs, loss: str) -> None:
    if prepared.mask is not None and int(prepared.mask.shape[1]) != 1:
        raise ValueError(f"loss {loss!r} takes a per-voxel mask (B, 1, *spatial), not a per-class one")


Largest = Callable[[Any, int], Any]
"""``largest(x, k)``: indices of the k largest entries of the 1-D array x (any order)."""


def topk_ce_value(xp: Any, v: Voxel, w: Any, params: Params, largest: Largest) -> Any:
    """Top-k CE from v.p, v.log_p, v.g (B, C, N) and the voxel weights w (B, 1, N).

    ce_x = −Σ_c cw_c g_c log p_c · w_x; pool = every voxel (``pool="all"``) or those with w > 0;
    loss = mean (or sum) of the k = max(1, ⌊|pool|·k/100⌋) largest ce_x; 0 for an empty pool.
    """
    g = v.g
    if params.class_weights is not None:
        g = g * xp.reshape(constant_vector(xp, v.g, params.class_weights), (1, -1, 1))
    weight = w[:, 0, :]
    ce = -xp.sum(xlogy(xp, g, v.log_p), axis=1)  # (B, N)
    ce = xp.where(weight == 0, xp.zeros_like(ce), ce * weight)
    pool = xp.reshape(ce, (-1,))
    if params.pool == "valid":
        pool = pool[xp.reshape(weight, (-1,)) > 0]
    size = int(pool.shape[0])
    if size == 0:
        return xp.sum(ce) * 0.0
    k = topk_count(size, params.k)
    total = xp.sum(xp.take(pool, largest(pool, k), axis=0))
    return total / k if params.reduction == "mean" else total


def lovasz_softmax_value(xp: Any, v: Voxel, w: Any, params: Params) -> Any:
    """Lovász-softmax from v.p, v.g (B, C, N) and the voxel weights w (B, 1, N) (mask values act as 0/1).

    Per class and image (or the batch pooled): errors e = |g − p| of the valid voxels sorted
    decreasingly, loss_c = ⟨e_sorted, ΔJ(g_sorted)⟩ (Berman et al. alg. 1); invalid voxels get
    e = 0 and no truth and count in no union, so they change nothing. Mean over the counted
    classes (present ones with ``present_only``), weighted by ``class_weights`` (Σ w_c·L_c / Σ w_c
    over the counted classes), then over images.
    """
    channels = int(v.p.shape[1])
    columns = xp.asarray(included_classes(params, channels), device=device(v.g))
    p, g = xp.take(v.p, columns, axis=1), xp.take(v.g, columns, axis=1)
    batch, classes, voxels = (int(n) for n in p.shape)
    errors = xp.abs(g - p)  # (B, K, N)
    keep = xp.broadcast_to(xp.expand_dims(w[:, 0, :] > 0, axis=1), tuple(errors.shape))
    truth = g
    if not params.per_image:  # one pooled "image": (1, K, B·N)
        errors, truth, keep = (
            xp.reshape(xp.permute_dims(x, (1, 0, 2)), (1, classes, batch * voxels)) for x in (errors, truth, keep)
        )
    errors = xp.where(keep, errors, xp.zeros_like(errors))
    truth = xp.where(keep, truth, xp.zeros_like(truth))
    order = xp.argsort(errors, axis=-1, descending=True, stable=True)
    sorted_errors = xp.take_along_axis(errors, order, axis=-1)
    sorted_truth = xp.take_along_axis(truth, order, axis=-1)
    valid_sorted = xp.astype(xp.take_along_axis(keep, order, axis=-1), sorted_truth.dtype)
    total = xp.sum(sorted_truth, axis=-1, keepdims=True)
    intersection = total - xp.cumulative_sum(sorted_truth, axis=-1)
    union = total + xp.cumulative_sum((1.0 - sorted_truth) * valid_sorted, axis=-1)
    jaccard = 1.0 - safe_ratio(xp, intersection, union, 0.0)
    gradient = xp.concat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], axis=-1)
    per_class = xp.sum(sorted_errors * gradient, axis=-1)  # (images, K)
    counted = xp.any(keep, axis=-1)
    if params.present_only:
        counted = xp.logical_and(counted, total[..., 0] > 0)
    weight = xp.astype(counted, per_class.dtype)
    if params.class_weights is not None:
        chosen = [params.class_weights[c] for c in included_classes(params, channels)]
        weight = weight * xp.reshape(constant_vector(xp, per_class, chosen), (1, -1))
    numerator = xp.sum(xp.where(counted, per_class * weight, xp.zeros_like(per_class)), axis=-1)
    per_image = safe_ratio(xp, numerator, xp.sum(weight, axis=-1), 0.0)
    return xp.sum(per_image) / int(per_image.shape[0])


def _largest_stable(x: Any, k: int) -> Any:
    """The reference's selection: a stable sort, so among equal values the first voxels win."""
    raw = x.value if isinstance(x, Var) else x
    xp = get_namespace(raw)
    return xp.argsort(raw, descending=True, stable=True)[:k]


def _tape_reference(loss: str, value: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """The float64 reference of a voxelwise definition: its value and exact gradient (the tape
    differentiates it w.r.t. p and log p, then the activation's VJP gives d/d pred)."""

    def reference(
        prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any], *, with_grad: bool = True
    ) -> tuple[Any, Any]:
        voxel_mask_required(prepared, loss)
        t = voxel_terms(prepared)
        tape = TapeNamespace(get_namespace(t.p))
        p, log_p = tape.variable(t.p), tape.variable(t.log_p)
        w = xp_broadcast_weights(t)
        out = value(tape, Voxel(p=p, g=t.g, log_p=log_p), w, params)
        raw = out.value if isinstance(out, Var) else out
        if not with_grad:
            return raw, None
        d_p, d_logp = gradients(out, [p, log_p]) if isinstance(out, Var) else (t.p * 0.0, t.p * 0.0)
        return raw, activation_backward(t, d_p, d_logp, None, tuple(prepared.pred.shape))

    return reference


def xp_broadcast_weights(t: Any) -> Any:
    """The reference's voxel weights as (B, 1, N) (a per-voxel mask or none: checked before)."""
    xp = get_namespace(t.w)
    return xp.broadcast_to(t.w, (t.p.shape[0], 1, t.p.shape[2]))


def topk_reference(
    prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any], *, with_grad: bool = True
) -> tuple[Any, Any]:
    """Top-k CE on the tape (float64): :func:`topk_ce_value` with a stable selection."""
    value = _tape_reference("topk_ce", lambda xp, v, w, prm: topk_ce_value(xp, v, w, prm, _largest_stable))
    return value(prepared, params, inputs, with_grad=with_grad)


def lovasz_reference(
    prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any], *, with_grad: bool = True
) -> tuple[Any, Any]:
    """Lovász-softmax on the tape (float64): :func:`lovasz_softmax_value`."""
    return _tape_reference("lovasz_softmax", lovasz_softmax_value)(prepared, params, inputs, with_grad=with_grad)


TOPK_CE = LossSpec(
    name="topk_ce",
    family="cross_entropy",
    summary="Top-k cross-entropy (nnU-Net TopKLoss): mean CE of the k % hardest voxels of the batch",
    params=(
        SOFTMAX_OR_PROBABILITIES,
        common.IGNORE_INDEX,
        common.CLASS_WEIGHTS,
        Param(
            "k",
            "float",
            10.0,
            "percentage of voxels kept (the hardest ones)",
            low=0.0,
            low_open=True,
            high=100.0,
            examples=(50.0,),
        ),
        Param(
            "pool",
            "choice",
            "valid",
            "voxels the top k % are taken from: valid (not ignored, mask > 0) or all (nnU-Net: ignored voxels stay "
            "in the pool with CE 0)",
            choices=("valid", "all"),
        ),
        MEAN_OR_SUM,
    ),
    formula="ce_x = −Σ_c w_c g_c log p_c (times the voxel weight); keep the k = max(1, ⌊pool·k/100⌋) largest ce_x "
    "over the whole batch; loss = their mean (or sum).",
    references=(
        "Wu, Shen, van den Hengel. Bridging category-level and instance-level semantic image segmentation. 2016",
        "nnU-Net nnunetv2/training/loss/robust_ce_loss.py TopKLoss",
    ),
    presets=(
        Preset(
            "nnunet",
            {"k": 10.0, "pool": "all"},
            "nnU-Net TopKLoss(k=10): top 10 % of all voxels",
            "MIC-DKFZ/nnUNet nnunetv2/training/loss/robust_ce_loss.py, v2.8.1",
        ),
    ),
    reference=topk_reference,
    min_spatial_dims=0,
)


LOVASZ_SOFTMAX = LossSpec(
    name="lovasz_softmax",
    family="region",
    summary="Lovász-softmax (Berman et al. 2018): convex surrogate of the Jaccard loss, per class",
    params=(
        SOFTMAX_OR_PROBABILITIES,
        common.INCLUDE_BACKGROUND,
        common.CLASSES,
        common.IGNORE_INDEX,
        replace(
            common.CLASS_WEIGHTS,
            doc="one non-negative weight per channel: the classes' Lovász terms are averaged as Σ w_c·L_c / Σ w_c "
            "over the counted classes (kornia's lovasz_softmax_loss weight instead averages w_c·L_c over all C)",
        ),
        Param("per_image", "bool", False, "one Lovász loss per image, then the mean (default: the batch pooled)"),
        Param("present_only", "bool", True, "average over classes present in the target only (Berman's 'present')"),
        MEAN_ONLY,
    ),
    formula="per class c: errors e = |g_c − p_c| over valid voxels, sorted decreasingly; loss_c = ⟨e_sorted, "
    "Δ J(g_sorted)⟩ with J_i = 1 − (G − Σ_{j≤i} g_j)/(G + Σ_{j≤i}(1 − g_j)); mean over (present) classes, "
    "Σ w_c·loss_c / Σ w_c with class_weights; mask values act as 0/1.",
    references=(
        "Berman, Rannen Triki, Blaschko. The Lovász-Softmax loss. CVPR 2018. arXiv:1705.08790",
        "bermanmaxim/LovaszSoftmax pytorch/lovasz_losses.py",
    ),
    presets=(
        Preset(
            "berman2018",
            {},
            "lovasz_softmax(probas, labels, classes='present', per_image=False)",
            "bermanmaxim/LovaszSoftmax pytorch/lovasz_losses.py",
        ),
    ),
    reference=lovasz_reference,
    check=common.check_class_selection,
)


SPECS = (TOPK_CE, LOVASZ_SOFTMAX)

"""Voxelwise losses: top-k cross-entropy and Lovász-softmax.

They need per-voxel selection or sorting, not just sums, so each backend brings its own
implementation; the spec carries the float64 NumPy reference (value and gradient), written
with plain loops where that is clearer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ..reference.statistics import voxel_terms
from ..spec import LossSpec, Param, Params, Preset
from ..validation import PreparedInputs
from . import common
from .formula import included_classes

SOFTMAX_OR_PROBABILITIES = replace(common.ACTIVATION, choices=("softmax", "none"))
MEAN_ONLY = replace(common.REDUCTION, choices=("mean",), doc="mean over (present) classes and images")
MEAN_OR_SUM = replace(common.REDUCTION, choices=("mean", "sum"), doc="mean or sum of the selected voxels' CE")


def topk_count(pool_size: int, k_percent: float) -> int:
    """Number of voxels kept: ⌊pool · k / 100⌋, at least 1 (nnU-Net's int() could give 0)."""
    return max(1, math.floor(pool_size * k_percent / 100.0))


def _grad_of_ce(p: np.ndarray, g: np.ndarray, cw: np.ndarray, activation: str) -> np.ndarray:
    """d/d(pred) of −Σ_c cw_c g_c log p_c: softmax p Σ_c cw_c g_c − cw ⊙ g; probabilities −cw g / p."""
    weighted = cw[None, :, None] * g
    if activation == "softmax":
        return p * weighted.sum(axis=1, keepdims=True) - weighted
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weighted == 0, 0.0, -weighted / p)


def voxel_mask_required(prepared: PreparedInputs, loss: str) -> None:
    if prepared.mask is not None and int(prepared.mask.shape[1]) != 1:
        raise ValueError(f"loss {loss!r} takes a per-voxel mask (B, 1, *spatial), not a per-class one")


def topk_reference(
    prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any], *, with_grad: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    voxel_mask_required(prepared, "topk_ce")
    t = voxel_terms(prepared)
    batch, channels, n = t.p.shape
    cw = np.ones(channels) if params.class_weights is None else np.asarray(params.class_weights, dtype=np.float64)
    # per-voxel CE, times the voxel weight (labels: −cw_y log p_y; soft: −Σ cw_c g_c log p_c)
    weight = np.broadcast_to(t.w, (batch, 1, n))[:, 0]
    with np.errstate(invalid="ignore"):
        ce = -(cw[None, :, None] * np.where(t.g == 0, 0.0, t.g * t.log_p)).sum(axis=1)
    ce = np.where(weight == 0, 0.0, ce * weight)
    flat = ce.reshape(-1)
    pool = np.arange(flat.size) if params.pool == "all" else np.flatnonzero(weight.reshape(-1) > 0)
    if pool.size == 0:
        return np.asarray(0.0), np.zeros_like(t.z).reshape(prepared.pred.shape) if with_grad else None
    k = topk_count(pool.size, params.k)
    order = pool[np.argsort(-flat[pool], kind="stable")][:k]
    share = 1.0 / k if params.reduction == "mean" else 1.0
    value = np.asarray(flat[order].sum() * share)
    if not with_grad:
        return value, None
    selected = np.zeros(flat.size)
    selected[order] = share
    scale = (selected.reshape(batch, n) * weight)[:, None, :]
    grad = scale * _grad_of_ce(t.p, t.g, cw, prepared.activation)
    return value, grad.reshape(prepared.pred.shape)


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
)


def lovasz_gradient(sorted_truth: np.ndarray) -> np.ndarray:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al. alg. 1)."""
    total = sorted_truth.sum()
    intersection = total - np.cumsum(sorted_truth)
    union = total + np.cumsum(1.0 - sorted_truth)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_reference(
    prepared: PreparedInputs, params: Params, inputs: Mapping[str, Any], *, with_grad: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    voxel_mask_required(prepared, "lovasz_softmax")
    t = voxel_terms(prepared)
    batch, channels, n = t.p.shape
    valid = np.broadcast_to(t.w, (batch, 1, n))[:, 0] > 0  # (B, N); mask values act as 0/1
    columns = included_classes(params, channels)
    groups = [[b] for b in range(batch)] if params.per_image else [list(range(batch))]
    d_p = np.zeros_like(t.p)
    losses = []
    for group in groups:
        class_losses = []
        class_grads = []
        for c in columns:
            truth = np.concatenate([t.g[b, c][valid[b]] for b in group])
            prob = np.concatenate([t.p[b, c][valid[b]] for b in group])
            if truth.size == 0 or (params.present_only and truth.sum() == 0):
                continue
            errors = np.abs(truth - prob)
            order = np.argsort(-errors, kind="stable")
            grad_sorted = lovasz_gradient(truth[order])
            class_losses.append(float(errors[order] @ grad_sorted))
            grad_errors = np.empty_like(errors)
            grad_errors[order] = grad_sorted
            class_grads.append((c, grad_errors * np.sign(prob - truth)))
        if not class_losses:
            losses.append(0.0)
            continue
        losses.append(float(np.mean(class_losses)))
        scale = 1.0 / len(class_losses) / len(groups)
        for c, g_c in class_grads:
            start = 0
            for b in group:
                count = int(valid[b].sum())
                d_p[b, c][valid[b]] += scale * g_c[start : start + count]
                start += count
    value = np.asarray(float(np.mean(losses)))
    if not with_grad:
        return value, None
    if prepared.activation == "softmax":
        grad = t.p * (d_p - (t.p * d_p).sum(axis=1, keepdims=True))
    else:
        grad = d_p
    return value, grad.reshape(prepared.pred.shape)


LOVASZ_SOFTMAX = LossSpec(
    name="lovasz_softmax",
    family="region",
    summary="Lovász-softmax (Berman et al. 2018): convex surrogate of the Jaccard loss, per class",
    params=(
        SOFTMAX_OR_PROBABILITIES,
        common.INCLUDE_BACKGROUND,
        common.CLASSES,
        common.IGNORE_INDEX,
        Param("per_image", "bool", False, "one Lovász loss per image, then the mean (default: the batch pooled)"),
        Param("present_only", "bool", True, "average over classes present in the target only (Berman's 'present')"),
        MEAN_ONLY,
    ),
    formula="per class c: errors e = |g_c − p_c| over valid voxels, sorted decreasingly; loss_c = ⟨e_sorted, "
    "Δ J(g_sorted)⟩ with J_i = 1 − (G − Σ_{j≤i} g_j)/(G + Σ_{j≤i}(1 − g_j)); mean over (present) classes; mask "
    "values act as 0/1.",
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
    check=lambda params: _check_lovasz(params),
)


def _check_lovasz(params: Params) -> None:
    if params.classes is not None and not params.include_background:
        raise ValueError("loss 'lovasz_softmax': give either classes= or include_background=False, not both")


SPECS = (TOPK_CE, LOVASZ_SOFTMAX)

"""Cross-entropy family from statistics: cross_entropy (softmax CE), bce (sigmoid BCE).

Both are means over voxels, so they are formulas of per-(sample, class) sums:

* categorical (softmax): ``CE = Σ_{b,c} w_c·Σ_x v_x g_c (−log p_c) / Σ_{b,c} w_c·Σ_x v_x g_c``
  — PyTorch's ``cross_entropy(weight=w, ignore_index=...)`` mean for label targets, where
  the normaliser is Σ_x w_{y_x}; with label smoothing ε the numerator becomes
  (1 − ε)·that + ε/C·Σ_{b,c} w_c Σ_x v_x (−log p_c), as PyTorch.
* binary (sigmoid; or probabilities with C = 1):
  ``BCE = Σ_{b,c} w_c·(pos_weight_c·Σ v g (−log p) + Σ v (1 − g)(−log(1 − p))) / Σ_{b,c} Σ_x v``
  — PyTorch's ``binary_cross_entropy_with_logits`` mean over all valid elements.

``v`` is the voxel weight (ignore_index, mask). For soft targets without class weights the
normaliser is the number of valid voxels, as PyTorch; with class weights and soft targets
it is Σ w_c·g_c (PyTorch would divide by the voxel count). All voxels ignored: 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..spec import LossSpec, Param, Params, Preset
from ..statistics import focal_statistic
from . import common
from .formula import constant_vector, included_classes, reduce_voxel_mean, select_columns

Array = Any

LABEL_SMOOTHING = Param(
    "label_smoothing",
    "float",
    0.0,
    "softmax only: target (1 − ε)·one_hot + ε/C (PyTorch label_smoothing)",
    low=0.0,
    high=1.0,
    examples=(0.1,),
)
POS_WEIGHT = Param(
    "pos_weight",
    "float_seq",
    None,
    "binary only: one weight per channel for the positive term (PyTorch BCEWithLogits pos_weight)",
    optional=True,
    low=0.0,
)


def is_binary(params: Params, num_classes: int) -> bool:
    """Per-channel binary CE: bce, sigmoid activation, or probabilities with one channel."""
    return params.loss == "bce" or params.activation == "sigmoid" or (params.activation == "none" and num_classes == 1)


def _statistics(params: Params) -> frozenset[str]:
    if params.activation == "softmax":
        names = {"ce_pos", "target_sum"}
        if params.label_smoothing > 0:
            names.add("neg_log_pred_sum")
        return frozenset(names)
    # sigmoid, or probabilities ("none"): binary when C == 1, decided at call time
    return frozenset({"ce_pos", "ce_neg", "target_sum", "count"})


def _per_class(xp: Any, like: Array, values: tuple[float, ...] | None) -> Array | None:
    if values is None:
        return None
    return xp.reshape(constant_vector(xp, like, values), (1, -1))


def cross_entropy_from_statistics(xp: Any, stats: Mapping[str, Array], params: Params) -> Array:
    ce_pos = stats["ce_pos"]
    num_classes = int(ce_pos.shape[1])
    weights = _per_class(xp, ce_pos, params.class_weights)
    if is_binary(params, num_classes):
        pos_weight = _per_class(xp, ce_pos, params.get("pos_weight"))
        element = (ce_pos if pos_weight is None else ce_pos * pos_weight) + stats["ce_neg"]
        if weights is not None:
            element = element * weights
        numerator = xp.sum(element, axis=1)
        normaliser = xp.sum(stats["count"], axis=1)
    else:
        numerator = ce_pos if weights is None else ce_pos * weights
        normaliser = stats["target_sum"] if weights is None else stats["target_sum"] * weights
        numerator = xp.sum(numerator, axis=1)
        normaliser = xp.sum(normaliser, axis=1)
        smoothing = params.get("label_smoothing", 0.0)
        if smoothing > 0:
            smooth = stats["neg_log_pred_sum"] if weights is None else stats["neg_log_pred_sum"] * weights
            numerator = (1.0 - smoothing) * numerator + (smoothing / num_classes) * xp.sum(smooth, axis=1)
    return reduce_voxel_mean(xp, numerator, normaliser, params.reduction)


def _check(params: Params) -> None:
    if params.label_smoothing > 0 and params.activation != "softmax":
        raise ValueError(
            f"loss {params.loss!r}: label_smoothing is defined for activation='softmax' "
            f"(got activation={params.activation!r})"
        )
    if params.get("pos_weight") is not None and params.activation == "softmax":
        raise ValueError(f"loss {params.loss!r}: pos_weight is for binary (sigmoid) cross-entropy")


_CE_PARAMS = (
    common.ACTIVATION,
    common.IGNORE_INDEX,
    common.CLASS_WEIGHTS,
    LABEL_SMOOTHING,
    POS_WEIGHT,
    replace(
        common.REDUCTION,
        doc="mean over valid voxels (weighted), sum, or none: one mean per sample, shape (B,)",
    ),
)

CROSS_ENTROPY = LossSpec(
    name="cross_entropy",
    family="cross_entropy",
    summary="Cross-entropy on logits: softmax CE (or per-channel BCE with activation='sigmoid')",
    params=_CE_PARAMS,
    formula="softmax: Σ w_c Σ_x v g_c (−log p_c) / Σ w_c Σ_x v g_c, label smoothing as PyTorch; "
    "sigmoid: Σ w_c (pos_weight_c Σ v g (−log p) + Σ v (1−g)(−log(1−p))) / Σ v over all elements",
    references=("PyTorch torch.nn.CrossEntropyLoss / BCEWithLogitsLoss", "nnU-Net RobustCrossEntropyLoss"),
    presets=(
        Preset(
            "torch",
            {},
            "torch.nn.CrossEntropyLoss() on (B, C, *spatial) logits and label maps",
            "pytorch/pytorch torch/nn/modules/loss.py",
        ),
    ),
    required_statistics=_statistics,
    from_statistics=cross_entropy_from_statistics,
    check=_check,
    min_spatial_dims=0,
)

BCE = replace(
    CROSS_ENTROPY,
    name="bce",
    summary="Binary cross-entropy on logits, one independent channel each (multi-label; C = 1 is binary)",
    params=(replace(common.ACTIVATION, default="sigmoid", choices=("sigmoid", "none")), *_CE_PARAMS[1:]),
    presets=(
        Preset(
            "torch",
            {},
            "torch.nn.BCEWithLogitsLoss() on (B, C, *spatial) logits",
            "pytorch/pytorch torch/nn/modules/loss.py",
        ),
    ),
)

# ---------------------------------------------------------------------------------------
# focal
# ---------------------------------------------------------------------------------------
FOCAL_GAMMA = Param("gamma", "float", 2.0, "focusing exponent γ (0 gives cross-entropy)", low=0.0, examples=(0.0, 0.5))
FOCAL_ALPHA = Param(
    "alpha",
    "float",
    None,
    "balance factor: sigmoid — α for positives, 1 − α for negatives; softmax — 1 − α for channel 0 and α for the "
    "others (MONAI)",
    optional=True,
    low=0.0,
    high=1.0,
    examples=(0.25,),
)
CHANNEL_MEAN = Param(
    "channel_mean",
    "bool",
    False,
    "softmax only: also divide by the number of included channels (MONAI's softmax focal averages over B·C·N "
    "elements); sigmoid always averages over elements (voxels × channels)",
)


def _focal_statistics(params: Params) -> frozenset[str]:
    names = {focal_statistic("focal_pos", params.gamma), "count"}
    if params.activation != "softmax":
        names.add(focal_statistic("focal_neg", params.gamma))
    return frozenset(names)


def focal_from_statistics(xp: Any, stats: Mapping[str, Array], params: Params) -> Array:
    pos = stats[focal_statistic("focal_pos", params.gamma)]
    num_classes = int(pos.shape[1])
    columns = included_classes(params, num_classes)
    weights = params.class_weights
    binary = params.activation != "softmax"
    alpha = params.alpha
    if binary:
        neg = stats[focal_statistic("focal_neg", params.gamma)]
        element = pos + neg if alpha is None else alpha * pos + (1.0 - alpha) * neg
    else:
        element = pos
        if alpha is not None:
            factors = [1.0 - alpha] + [alpha] * (num_classes - 1)
            element = element * xp.reshape(constant_vector(xp, pos, factors), (1, -1))
    if weights is not None:
        element = element * xp.reshape(constant_vector(xp, pos, weights), (1, -1))
    element = select_columns(xp, element, columns)
    numerator = xp.sum(element, axis=1)
    count = stats["count"]
    if binary or params.channel_mean:
        normaliser = xp.sum(select_columns(xp, count, columns), axis=1)
    else:
        normaliser = count[:, 0]
    return reduce_voxel_mean(xp, numerator, normaliser, params.reduction)


FOCAL = LossSpec(
    name="focal",
    family="cross_entropy",
    summary="Focal loss (Lin et al. 2017): cross-entropy down-weighting easy voxels by (1 − p_t)^γ",
    params=(
        common.ACTIVATION,
        common.INCLUDE_BACKGROUND,
        common.CLASSES,
        common.IGNORE_INDEX,
        FOCAL_GAMMA,
        FOCAL_ALPHA,
        common.CLASS_WEIGHTS,
        CHANNEL_MEAN,
        replace(common.REDUCTION, doc="mean over voxels (elements for sigmoid), sum, or none: per-sample means (B,)"),
    ),
    formula="softmax: Σ_c a_c Σ_x v g_c (1 − p_c)^γ (−log p_c) / Σ_x v [× K if channel_mean]; "
    "sigmoid: Σ_c a_c Σ_x v [α g (1 − p)^γ (−log p) + (1 − α)(1 − g) p^γ (−log(1 − p))] / (Σ_x v · K); "
    "a_c = class weight (× MONAI's softmax alpha factor); K included channels. γ = 0 gives cross_entropy / bce.",
    references=(
        "Lin, Goyal, Girshick, He, Dollár. Focal loss for dense object detection. ICCV 2017. arXiv:1708.02002",
        "MONAI FocalLoss (sigmoid default; use_softmax)",
    ),
    presets=(
        Preset(
            "monai",
            {"activation": "sigmoid"},
            "MONAI FocalLoss() defaults: sigmoid focal, γ = 2, no α, mean over B·C·N (one-hot target)",
            "Project-MONAI/MONAI monai/losses/focal_loss.py, v1.5.0",
        ),
        Preset(
            "monai_softmax",
            {"channel_mean": True},
            "MONAI FocalLoss(use_softmax=True): softmax focal averaged over B·C·N",
            "Project-MONAI/MONAI monai/losses/focal_loss.py, v1.5.0",
        ),
    ),
    required_statistics=_focal_statistics,
    from_statistics=focal_from_statistics,
    check=common.check_class_selection,
    min_spatial_dims=0,
)

SPECS = (CROSS_ENTROPY, BCE, FOCAL)

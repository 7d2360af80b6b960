"""Cross-entropy family from statistics: cross_entropy (softmax CE), bce (sigmoid BCE), focal.

All are means over voxels, so they are formulas of per-(sample, class) sums:

* categorical (softmax): ``CE = Σ_{b,c} w_c·Σ_x v_x g_c (−log p_c) / Σ_{b,c} w_c·Σ_x v_x g_c``
  — PyTorch's ``cross_entropy(weight=w, ignore_index=...)`` mean for label targets, where
  the normaliser is Σ_x w_{y_x}; with label smoothing ε the numerator becomes
  (1 − ε)·that + ε/C·Σ_{b,c} w_c Σ_x v_x (−log p_c), as PyTorch.
* binary (sigmoid; or probabilities with C = 1):
  ``BCE = Σ_{b,c} w_c·(pos_weight_c·Σ v t (−log p) + Σ v (1 − t)(−log(1 − p))) / Σ_{b,c} Σ_x v``
  — PyTorch's ``binary_cross_entropy_with_logits`` mean over all valid elements; t = g, or with
  label smoothing ε t = (1 − ε)·g + ε/2 (segmentation_models_pytorch SoftBCEWithLogitsLoss's
  smooth_factor s is ε = 2s: its target (1 − s)·g + s·(1 − g)).

``v`` is the voxel weight (ignore_index, mask). For soft targets without class weights the
normaliser is the number of valid voxels, as PyTorch; with class weights and soft targets
it is Σ w_c·g_c (PyTorch would divide by the voxel count). All voxels ignored: 0. With
``ignored_in_mean`` the normaliser counts every voxel, ignored ones included (SMP).

Reductions: ``mean`` as above, ``sum`` the numerator, ``per_sample`` one mean per sample (B,),
``none`` the elements themselves, as the peers return them: softmax CE (B, *spatial) (PyTorch
``CrossEntropyLoss(reduction="none")``), binary CE (B, C, *spatial) (``BCEWithLogitsLoss``),
focal (B, K, *spatial) for sigmoid or ``channel_mean`` (MONAI ``FocalLoss``), else (B, *spatial).
The element map is not a function of the statistics: the executor computes it from the per-voxel
terms of the same statistics (:class:`~segloss_core.spec.ElementMap`), with the same linear
combination that makes the numerator; ignored voxels hold 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..spec import ElementMap, LossSpec, Param, Params, Preset
from ..statistics import focal_statistic
from . import common
from .formula import constant_vector, included_classes, reduce_voxel_mean, safe_ratio, select_columns
from .region import CLASS_WEIGHT_NORMALIZATION

Array = Any

LABEL_SMOOTHING = Param(
    "label_smoothing",
    "float",
    0.0,
    "target (1 − ε)·g + ε/K: K = C for softmax (PyTorch label_smoothing), K = 2 for each binary channel "
    "(SMP SoftBCEWithLogitsLoss smooth_factor s is ε = 2s)",
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
IGNORED_IN_MEAN = Param(
    "ignored_in_mean",
    "bool",
    False,
    "reduction='mean' divides by every voxel (N per sample and channel), ignore_index voxels and the mask "
    "included, as segmentation_models_pytorch's SoftCrossEntropyLoss / SoftBCEWithLogitsLoss do",
)
BINARY_MEAN = Param(
    "binary_mean",
    "choice",
    "elements",
    "binary (sigmoid) reduction='mean' divides by: elements (voxels × channels, PyTorch BCEWithLogitsLoss), voxels "
    "(each voxel once, its channels' terms added: nnU-Net's DC_and_BCE_loss with an ignore label) or nnunet "
    "(elements without ignore_index, voxels with it, exactly as DC_and_BCE_loss)",
    choices=("elements", "voxels", "nnunet"),
)
VOXELWISE_REDUCTION = replace(
    common.REDUCTION,
    choices=("mean", "sum", "none", "per_sample"),
    doc="mean over valid voxels (weighted), sum, per_sample: one mean per sample (B,), or none: the elements "
    "(softmax CE (B, *spatial), binary (B, C, *spatial), as PyTorch)",
)


def is_binary(params: Params, num_classes: int) -> bool:
    """Per-channel binary CE: bce, sigmoid activation, or probabilities with one channel."""
    return params.loss == "bce" or params.activation == "sigmoid" or (params.activation == "none" and num_classes == 1)


def _numerator_statistics(params: Params) -> set[str]:
    """The statistics whose combination is the numerator (and the element map)."""
    smoothing = params.label_smoothing > 0
    if params.activation == "softmax":
        return {"ce_pos", "neg_log_pred_sum"} if smoothing else {"ce_pos"}
    # sigmoid, or probabilities ("none"): binary when C == 1, decided at call time
    names = {"ce_pos", "ce_neg"}
    if smoothing:
        names |= {"neg_log_pred_sum", "neg_log_1mp_sum"}
    return names


def _statistics(params: Params) -> frozenset[str]:
    names = _numerator_statistics(params) | {"target_sum"}
    if params.activation != "softmax":
        names.add("count")
    if params.ignored_in_mean:
        names.add("voxels")
    return frozenset(names)


def per_class(xp: Any, like: Array, values: tuple[float, ...] | None) -> Array | None:
    """A per-class constant shaped (1, C, 1, …) to broadcast against ``like`` (B, C, …)."""
    if values is None:
        return None
    return xp.reshape(constant_vector(xp, like, values), (1, -1, *([1] * (len(like.shape) - 2))))


def _scaled(x: Array, factor: Array | None) -> Array:
    return x if factor is None else x * factor


def ce_summands(xp: Any, s: Mapping[str, Array], params: Params) -> Array:
    """The per-class summands of the CE numerator, (B, C) from the statistics or (B, C, N) from
    their per-voxel terms: Σ over axis 1 (and the voxels) is the numerator."""
    ce_pos = s["ce_pos"]
    num_classes = int(ce_pos.shape[1])
    weights = per_class(xp, ce_pos, params.class_weights)
    eps = params.label_smoothing
    if is_binary(params, num_classes):
        pos, neg = ce_pos, s["ce_neg"]
        if eps > 0:  # t = (1 − ε)·g + ε/2
            pos = (1.0 - eps) * pos + (eps / 2.0) * s["neg_log_pred_sum"]
            neg = (1.0 - eps) * neg + (eps / 2.0) * s["neg_log_1mp_sum"]
        return _scaled(_scaled(pos, per_class(xp, ce_pos, params.get("pos_weight"))) + neg, weights)
    summand = _scaled(ce_pos, weights)
    if eps > 0:
        summand = (1.0 - eps) * summand + (eps / num_classes) * _scaled(s["neg_log_pred_sum"], weights)
    return summand


def cross_entropy_from_statistics(xp: Any, stats: Mapping[str, Array], params: Params) -> Array:
    numerator = xp.sum(ce_summands(xp, stats, params), axis=1)
    num_classes = int(stats["ce_pos"].shape[1])
    binary = is_binary(params, num_classes)
    if params.ignored_in_mean:
        voxels = stats["voxels"]
        normaliser = _binary_normaliser(xp, voxels, params) if binary else voxels[:, 0]
    elif binary:
        normaliser = _binary_normaliser(xp, stats["count"], params)
    else:
        target_sum = stats["target_sum"]
        normaliser = xp.sum(_scaled(target_sum, per_class(xp, target_sum, params.class_weights)), axis=1)
    return reduce_voxel_mean(xp, numerator, normaliser, params.reduction)


def _binary_normaliser(xp: Any, counts: Array, params: Params) -> Array:
    """Per sample: Σ_c counts (every element) or, per ``binary_mean``, the voxels once (Σ_c counts / C,
    which is each channel's count where the voxel weights are the same for every channel)."""
    mode = params.get("binary_mean", "elements")
    if mode == "nnunet":
        mode = "elements" if params.ignore_index is None else "voxels"
    total = xp.sum(counts, axis=1)
    return total if mode == "elements" else total / float(counts.shape[1])


def cross_entropy_elements(xp: Any, elements: Mapping[str, Array], params: Params) -> Array:
    """reduction='none': (B, C, N) per-element binary CE, or (B, N) per-voxel softmax CE."""
    summands = ce_summands(xp, elements, params)
    return summands if is_binary(params, int(summands.shape[1])) else xp.sum(summands, axis=1)


def _check(params: Params) -> None:
    if params.get("pos_weight") is not None and params.activation == "softmax":
        raise ValueError(f"loss {params.loss!r}: pos_weight is for binary (sigmoid) cross-entropy")
    if params.get("binary_mean", "elements") != "elements" and params.activation == "softmax":
        raise ValueError(f"loss {params.loss!r}: binary_mean is for binary (sigmoid) cross-entropy")


_CE_PARAMS = (
    common.ACTIVATION,
    common.IGNORE_INDEX,
    common.CLASS_WEIGHTS,
    LABEL_SMOOTHING,
    POS_WEIGHT,
    IGNORED_IN_MEAN,
    BINARY_MEAN,
    VOXELWISE_REDUCTION,
    common.REGIONS,
)

CROSS_ENTROPY = LossSpec(
    name="cross_entropy",
    family="cross_entropy",
    summary="Cross-entropy on logits: softmax CE (or per-channel BCE with activation='sigmoid')",
    params=_CE_PARAMS,
    formula="softmax: Σ w_c Σ_x v g_c (−log p_c) / Σ w_c Σ_x v g_c, label smoothing as PyTorch; "
    "sigmoid: Σ w_c (pos_weight_c Σ v t (−log p) + Σ v (1−t)(−log(1−p))) / Σ v over all elements, "
    "t = (1 − ε)·g + ε/2; ignored_in_mean: divided by every voxel instead",
    references=(
        "PyTorch torch.nn.CrossEntropyLoss / BCEWithLogitsLoss",
        "nnU-Net RobustCrossEntropyLoss",
        "segmentation_models_pytorch SoftCrossEntropyLoss / SoftBCEWithLogitsLoss",
    ),
    presets=(
        Preset(
            "torch",
            {},
            "torch.nn.CrossEntropyLoss() on (B, C, *spatial) logits and label maps",
            "pytorch/pytorch torch/nn/modules/loss.py",
        ),
        Preset(
            "smp",
            {"ignored_in_mean": True},
            "segmentation_models_pytorch SoftCrossEntropyLoss(smooth_factor=ε, ignore_index=i): label-smoothed "
            "NLL whose mean counts the ignored voxels (as 0) in the denominator; pass label_smoothing=ε",
            "qubvel-org/segmentation_models.pytorch segmentation_models_pytorch/losses/soft_ce.py + _functional.py "
            "label_smoothed_nll_loss, main 0.5.1.dev0 (5006616)",
        ),
    ),
    required_statistics=_statistics,
    from_statistics=cross_entropy_from_statistics,
    element_map=ElementMap(lambda params: frozenset(_numerator_statistics(params)), cross_entropy_elements),
    min_spatial_dims=0,
    check=_check,
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
        Preset(
            "smp",
            {"ignored_in_mean": True},
            "segmentation_models_pytorch SoftBCEWithLogitsLoss(smooth_factor=s, ignore_index=i, pos_weight=w): "
            "its target (1 − s)·g + s·(1 − g) is label_smoothing = 2s; ignored elements count (as 0) in the mean",
            "qubvel-org/segmentation_models.pytorch segmentation_models_pytorch/losses/soft_bce.py, "
            "main 0.5.1.dev0 (5006616)",
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


SUM_OF_MEANS = Param(
    "sum_of_means",
    "bool",
    False,
    "reduction='sum' adds the per-(sample, channel) means over the voxels instead of every element (MONAI "
    "FocalLoss(reduction='sum') averages the spatial axes first)",
)


def _focal_element_statistics(params: Params) -> frozenset[str]:
    names = {focal_statistic("focal_pos", params.gamma)}
    if params.activation != "softmax":
        names.add(focal_statistic("focal_neg", params.gamma))
    return frozenset(names)


def _focal_statistics(params: Params) -> frozenset[str]:
    return _focal_element_statistics(params) | {"count"}


FOCAL_CLASS_WEIGHT_NORMALIZATION = replace(
    CLASS_WEIGHT_NORMALIZATION,
    choices=("count", "weight_sum"),
    doc="with class_weights: count divides Σ_c w_c·L_c by the number of included channels (MONAI weight), "
    "weight_sum by Σ_c w_c of the included channels (SMP FocalLoss class_weights: Σ w·L / Σ w)",
)


def _weight_scale(params: Params, columns: list[int]) -> float:
    """class_weight_normalization='weight_sum': Σ_c w_c·L_c / Σ_c w_c is the count normaliser
    times the mean weight of the included channels."""
    weights = params.class_weights
    if weights is None or params.class_weight_normalization != "weight_sum":
        return 1.0
    chosen = [weights[c] for c in columns]
    return sum(chosen) / len(chosen)


def focal_summands(xp: Any, s: Mapping[str, Array], params: Params) -> Array:
    """The per-channel summands of the focal numerator over the included channels K: (B, K) from the
    statistics or (B, K, N) from their per-voxel terms."""
    pos = s[focal_statistic("focal_pos", params.gamma)]
    num_classes = int(pos.shape[1])
    alpha = params.alpha
    if params.activation != "softmax":
        neg = s[focal_statistic("focal_neg", params.gamma)]
        pos = _scaled(pos, per_class(xp, pos, params.get("pos_weight")))
        summand = pos + neg if alpha is None else alpha * pos + (1.0 - alpha) * neg
    else:
        summand = pos
        if alpha is not None:
            summand = summand * per_class(xp, pos, (1.0 - alpha,) + (alpha,) * (num_classes - 1))
    summand = _scaled(summand, per_class(xp, pos, params.class_weights))
    return select_columns(xp, summand, included_classes(params, num_classes))


def _per_channel_elements(params: Params) -> bool:
    return params.activation != "softmax" or params.channel_mean


def focal_from_statistics(xp: Any, stats: Mapping[str, Array], params: Params) -> Array:
    summands = focal_summands(xp, stats, params)
    columns = included_classes(params, int(stats["count"].shape[1]))
    count = select_columns(xp, stats["count"], columns)
    scale = _weight_scale(params, columns)
    if params.reduction == "sum" and params.sum_of_means:  # MONAI: Σ_{b,c} of spatial means
        return xp.sum(safe_ratio(xp, summands, count * scale if scale != 1.0 else count, 0.0))
    normaliser = xp.sum(count, axis=1) if _per_channel_elements(params) else count[:, 0]
    if scale != 1.0:
        normaliser = normaliser * scale
    return reduce_voxel_mean(xp, xp.sum(summands, axis=1), normaliser, params.reduction)


def focal_elements(xp: Any, elements: Mapping[str, Array], params: Params) -> Array:
    """reduction='none': (B, K, N) for sigmoid or channel_mean (MONAI's map), else (B, N)."""
    summands = focal_summands(xp, elements, params)
    return summands if _per_channel_elements(params) else xp.sum(summands, axis=1)


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
        FOCAL_CLASS_WEIGHT_NORMALIZATION,
        replace(POS_WEIGHT, doc="sigmoid only: one weight per channel for the positive term (as bce's pos_weight)"),
        CHANNEL_MEAN,
        SUM_OF_MEANS,
        replace(
            VOXELWISE_REDUCTION,
            doc="mean over voxels (elements for sigmoid), sum, per_sample: one mean per sample (B,), or none: the "
            "elements ((B, K, *spatial) for sigmoid or channel_mean, as MONAI; else (B, *spatial))",
        ),
        common.REGIONS,
    ),
    formula="softmax: Σ_c a_c Σ_x v g_c (1 − p_c)^γ (−log p_c) / Σ_x v [× K if channel_mean]; "
    "sigmoid: Σ_c a_c Σ_x v [α pw_c g (1 − p)^γ (−log p) + (1 − α)(1 − g) p^γ (−log(1 − p))] / (Σ_x v · K); "
    "a_c = class weight (× MONAI's softmax alpha factor), pw_c = pos_weight; K included channels (Σ_c w_c with "
    "class_weight_normalization='weight_sum'). γ = 0 gives cross_entropy / bce.",
    references=(
        "Lin, Goyal, Girshick, He, Dollár. Focal loss for dense object detection. ICCV 2017. arXiv:1708.02002",
        "MONAI FocalLoss (sigmoid default; use_softmax)",
    ),
    presets=(
        Preset(
            "monai",
            {"activation": "sigmoid", "sum_of_means": True},
            "MONAI FocalLoss() defaults: sigmoid focal, γ = 2, no α, mean over B·C·N (one-hot target); "
            "reduction='sum' sums the (B, C) spatial means and 'none' returns the (B, C, *spatial) map, as MONAI",
            "Project-MONAI/MONAI monai/losses/focal_loss.py, v1.5.0",
        ),
        Preset(
            "smp",
            {"activation": "sigmoid", "class_weight_normalization": "weight_sum"},
            "segmentation_models_pytorch FocalLoss(mode='multiclass' or 'multilabel') defaults: one-vs-rest sigmoid "
            "focal, γ = 2, no α, mean over the valid voxels per class, then Σ w_c·L_c / Σ w_c (class_weights) or "
            "the mean over classes",
            "qubvel-org/segmentation_models.pytorch segmentation_models_pytorch/losses/focal.py + _functional.py, "
            "main 0.5.1.dev0 (5006616); 0.5.0 sums over classes",
        ),
        Preset(
            "monai_softmax",
            {"channel_mean": True, "sum_of_means": True},
            "MONAI FocalLoss(use_softmax=True): softmax focal averaged over B·C·N",
            "Project-MONAI/MONAI monai/losses/focal_loss.py, v1.5.0",
        ),
    ),
    required_statistics=_focal_statistics,
    from_statistics=focal_from_statistics,
    element_map=ElementMap(_focal_element_statistics, focal_elements),
    min_spatial_dims=0,
    check=lambda params: _check_focal(params),
)


def _check_focal(params: Params) -> None:
    common.check_class_selection(params)
    if params.get("pos_weight") is not None and params.activation == "softmax":
        raise ValueError(f"loss {params.loss!r}: pos_weight is for the sigmoid focal loss (activation='sigmoid')")


SPECS = (CROSS_ENTROPY, BCE, FOCAL)

"""Distance-based losses: boundary (surface) loss and the Hausdorff distance-transform losses.

Both are means of per-voxel terms weighted by a distance field F that does not depend on the
network's parameters, so they are formulas of the field statistics Σ w·p·F and Σ w·(p − g)²·F:

* ``boundary`` (Kervadec et al. 2019): ``mean over (b, c ∈ classes, x) of p_c(x)·φ_c(x)`` with φ
  the signed distance map of the target (``segloss_core.distance_maps``); pass φ precomputed
  (``distance_map=``, e.g. from ``segloss distmap``) or let the loss compute it on the same
  device. Its minimum is negative and image-specific (issue LIVIAETS/boundary-loss#17): it is
  meant to be added to a region loss with a weight that grows (:mod:`segloss_core.schedules`).
* ``hausdorff_dt`` (Karimi & Salcudean 2019, as MONAI's HausdorffDTLoss):
  ``mean over (b, c) of mean over x of (p − g)²·(d_p^α + d_g^α)`` with d the unsigned distance to
  the boundary (inside and outside) of the target and of the thresholded prediction (p > 0.5);
  unlike MONAI it honours the voxel ``spacing``. ``log_hausdorff_dt`` is log(1 + that).

Only the classes a formula reads get maps (the others are maps without a boundary, which the
kernels fill with 0 without a transform: with the background excluded, 3 transforms of 4 at C = 4;
:func:`_target_maps`). The Hausdorff-DT field starts as d_g^α; then the prediction's masks of the
classes read go through one transform call (one call of all classes schedules the transform's
threads better than a call per class: a third less time under load, the same peak memory, which
lies elsewhere in the step) and their d_p^α are added into F (in place where the library allows).
With softmax and threshold ≥ 0.5 the masks need no softmax copy (:func:`_prediction_mask`), and
they are mutually exclusive: where the backend's kernels offer it (the torch CPU op), the
thresholded prediction is one label map of one byte a voxel that goes through the label-map
transform like the target, its maps already in F's layout (:func:`_prediction_labels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .. import distance_maps
from ..arrays import get_namespace, is_cupy, is_numpy, is_torch
from ..regions import region_masks
from ..spec import LossSpec, Param, Params, Preset
from ..statistics import field_statistic
from . import common
from .formula import full, included_classes, reduce_voxel_mean, safe_ratio, select_columns

Array = Any

SPACING = Param(
    "spacing",
    "float_seq",
    None,
    "physical voxel size per spatial axis for the distance maps (None: 1 everywhere)",
    optional=True,
    low=0.0,
    low_open=True,
)
CONVENTION = Param(
    "convention",
    "choice",
    "boundary_loss",
    "sign convention of φ: boundary_loss (−(d−1) inside, +d outside, LIVIAETS), signed (−d, +d) or "
    "signed_inside_positive (+d, −d)",
    choices=distance_maps.CONVENTIONS,
)
NORMALIZE = Param(
    "normalize",
    "choice",
    "none",
    "scale φ: none, max (by its largest |value| per sample and class) or extent (by the image diagonal)",
    choices=("none", "max", "extent"),
)
ALPHA = Param(
    "alpha", "float", 2.0, "exponent α of the distances (Karimi & Salcudean; MONAI alpha)", low=0.0, examples=(1.0,)
)
THRESHOLD = Param(
    "threshold", "float", 0.5, "the prediction's mask is p > threshold (MONAI: 0.5)", low=0.0, high=1.0, examples=(0.3,)
)
BACKGROUND_OFF = replace(common.INCLUDE_BACKGROUND, default=False)

BOUNDARY_PHI = "boundary_phi"
HAUSDORFF_FIELD = "hausdorff_weight"


def _spatial_ndim(prepared: Any) -> int:
    return len(prepared.spatial_shape)


def _spacing(params: Params, prepared: Any) -> tuple[float, ...]:
    return distance_maps.check_spacing(params.get("spacing"), _spatial_ndim(prepared))


def _detached(x: Array) -> Array:
    return x.detach() if hasattr(x, "detach") else x


def _target_masks(prepared: Any) -> Array | None:
    """Binary target masks (B, C, *S) when the target is not a plain label map of C classes (regions:
    each region's mask, ``label ∈ regions[r]``)."""
    xp = get_namespace(prepared.pred)
    if prepared.regions is not None:
        return region_masks(xp, prepared.labels, prepared.regions)
    if prepared.labels is not None:
        if prepared.num_classes == 1 and prepared.activation != "softmax":
            return xp.expand_dims(prepared.labels == 1, axis=1)
        return None
    return _detached(prepared.target) > 0.5


def _prediction_mask(prepared: Any, threshold: float) -> Any:
    """``mask(c)``: the thresholded prediction ``p_c > threshold`` of channel c, (B, 1, *S) bool, without
    gradient.

    Softmax with threshold ≥ 0.5: only a voxel's largest probability can exceed it (p_c ≤ 1/2 for
    every other class, since its exp(z_c − max) ≤ 1 shares the sum with the argmax's 1), and that
    probability is exactly 1/Σ exp(z − max) (the argmax's exp(0) = 1). So
    ``p_c > t ⟺ z_c = max z and 1/Σ exp(z − max) > t``: one reduction, no per-class probability
    and no softmax copy kept (where two logits tie for the largest, Σ ≥ 2: no class, as the
    per-class form gives). Below 0.5 the masks come from the probabilities class by class."""
    xp = get_namespace(prepared.pred)
    z = _detached(prepared.pred)
    if prepared.activation == "softmax":
        largest = xp.max(z, axis=1, keepdims=True)
        if threshold >= 0.5:
            above = 1.0 / xp.sum(xp.exp(z - largest), axis=1, keepdims=True) > threshold  # exp(z − max) freed
            return lambda c: (z[:, c : c + 1] == largest) & above
        e = xp.exp(z - largest)
        total = xp.sum(e, axis=1, keepdims=True)
        return lambda c: e[:, c : c + 1] / total > threshold
    if prepared.activation == "sigmoid":
        return lambda c: 1.0 / (1.0 + xp.exp(-z[:, c : c + 1])) > threshold
    return lambda c: z[:, c : c + 1] > threshold


def _target_maps(prepared: Any, classes: list[int], spacing: tuple[float, ...], kind: str) -> Array:
    """The target's maps (B, C, *S) of ``kind`` (a signed convention or an unsigned region) for the
    channels ``classes``; the others are 0 (a map without a boundary, filled without a transform).

    For a label map, class c is ``labels == c`` (none for c = ignore_index: ignored voxels belong to
    no class). Where at most one class is left out and it is the ignored one, or nothing is ignored
    (the default: the background), the label-map transform computes them directly, the left-out
    class as the ignored one (its voxels then belong to no class, as they do in ``labels == c`` of
    every other class); otherwise the maps come from the masks."""
    xp = _namespace(prepared)
    channels = int(prepared.pred.shape[1])
    masks = _target_masks(prepared)
    if masks is None:
        labels, ignore = prepared.labels, prepared.ignore_index
        left_out = sorted(set(range(channels)) - set(classes))
        if len(left_out) <= 1 and (ignore is None or not left_out or ignore == left_out[0]):
            ignored = left_out[0] if left_out else ignore
            if kind in distance_maps.CONVENTIONS:
                return distance_maps.signed_distance_map(
                    labels, prepared.num_classes, spacing, convention=kind, ignore_index=ignored
                )
            return distance_maps.distance_map(labels, prepared.num_classes, spacing, region=kind, ignore_index=ignored)
        keep = [c for c in classes if ignore is None or c != ignore]
        empty = xp.zeros_like(labels, dtype=xp.bool)
        masks = xp.stack([labels == c if c in keep else empty for c in range(channels)], axis=1)
    elif len(classes) < channels:
        empty = xp.zeros_like(masks[:, :1])
        masks = xp.concat([masks[:, c : c + 1] if c in classes else empty for c in range(channels)], axis=1)
    return distance_maps.mask_distance_map(masks, spacing, kind=kind)


def _power(xp: Any, d: Array, alpha: float, in_place: bool) -> Array:
    """d**α for distances d ≥ 0 (d itself for α = 1; d·d for α = 2, into d where ``in_place``: the
    array is the caller's own and its library allows it)."""
    if alpha == 1.0:
        return d
    if alpha == 2.0 and in_place:
        d *= d
        return d
    return d * d if alpha == 2.0 else d**alpha


def _boundary_fields(prepared: Any, params: Params, inputs: Mapping[str, Array]) -> dict[str, Array]:
    given = inputs.get("distance_map")
    shape = tuple(int(s) for s in prepared.pred.shape)
    if given is not None:
        if tuple(int(s) for s in given.shape) != shape:
            raise ValueError(f"distance_map must have the shape of pred {shape}, got {tuple(given.shape)}")
        return {BOUNDARY_PHI: _detached(given)}
    spacing = _spacing(params, prepared)
    classes = included_classes(params, int(prepared.pred.shape[1]))
    # the maps of the classes the formula reads; the others (the background by default) are 0, no transform
    phi = _target_maps(prepared, classes, spacing, params.convention)
    if params.normalize != "none":
        phi = distance_maps.normalise(_namespace(prepared), phi, params.normalize, spacing, prepared.spatial_shape)
    return {BOUNDARY_PHI: phi}


def _namespace(prepared: Any) -> Any:
    return get_namespace(prepared.pred)


def _prediction_labels(prepared: Any, threshold: float, classes: list[int]) -> tuple[Array, int | None] | None:
    """The thresholded prediction of a softmax with threshold ≥ 0.5 as one label map (B, *S) and
    the class to leave out (its ignore_index), or None where the masks are needed instead.

    There the masks ``p_c > t`` are mutually exclusive (:func:`_prediction_mask`): the label map is
    the class of the largest logit where 1/Σ exp(z − max) > t and C (no class) elsewhere, so the
    label-map transform gives every class's d_p with no per-class mask and no concatenation (class
    c's map is that of ``labels == c``, i.e. of ``p_c > t``). It comes from the backend's kernel
    where one exists (:func:`segloss_core.distance_maps.softmax_prediction_labels`: one read of the
    logits); at most one class may be left out (as the ignored one, whose voxels then belong to no
    class: its map is 0 without a transform, like the target's)."""
    channels = int(prepared.pred.shape[1])
    left_out = sorted(set(range(channels)) - set(classes))
    if prepared.activation != "softmax" or threshold < 0.5 or len(left_out) > 1:
        return None
    labels = distance_maps.softmax_prediction_labels(_detached(prepared.pred), threshold)
    return None if labels is None else (labels, left_out[0] if left_out else None)


def _add_power(xp: Any, field: Array, d: Array, alpha: float, mutable: bool) -> Array:
    """field + d**α (into ``field`` where ``mutable``: d is the caller's own, squared in place for
    α = 2, then added; not an addcmul, whose fused multiply-add would round differently)."""
    d = _power(xp, d, alpha, mutable)
    if d.dtype != field.dtype:
        d = xp.astype(d, field.dtype)
    if mutable:
        field += d
        return field
    return field + d


def _hausdorff_fields(prepared: Any, params: Params, inputs: Mapping[str, Array]) -> dict[str, Array]:
    xp = _namespace(prepared)
    spacing = _spacing(params, prepared)
    alpha = params.alpha
    classes = included_classes(params, int(prepared.pred.shape[1]))
    mutable = is_numpy(xp) or is_cupy(xp) or is_torch(xp)
    # the prediction as one label map where the thresholded masks are exclusive (before the
    # target's maps exist: the softmax it takes is freed before them)
    predicted = _prediction_labels(prepared, params.threshold, classes)
    # the target's maps of the classes the formula reads (the others 0, not transformed)
    weight = _target_maps(prepared, classes, spacing, "boundary")
    if predicted is not None:
        # d_p of every class read, in the field's layout (the left-out class: 0), added into F
        codes, left_out = predicted
        d_pred = distance_maps.distance_map(
            codes, int(prepared.pred.shape[1]), spacing, region="boundary", ignore_index=left_out
        )
        weight = _power(xp, weight, alpha, mutable)
        return {HAUSDORFF_FIELD: _add_power(xp, weight, d_pred, alpha, mutable)}
    weight = _power(xp, weight, alpha, mutable)
    # then the thresholded prediction's maps of the same classes, in one transform call, added into F
    mask = _prediction_mask(prepared, params.threshold)
    d_pred = distance_maps.mask_distance_map(xp.concat([mask(c) for c in classes], axis=1), spacing)
    d_pred = _power(xp, d_pred, alpha, mutable)
    if d_pred.dtype != weight.dtype:
        d_pred = xp.astype(d_pred, weight.dtype)
    if mutable:
        for i, c in enumerate(classes):
            weight[:, c : c + 1] += d_pred[:, i : i + 1]
        return {HAUSDORFF_FIELD: weight}
    slot = {c: i for i, c in enumerate(classes)}  # immutable arrays (JAX): one concatenation
    columns = [
        weight[:, c : c + 1] + d_pred[:, slot[c] : slot[c] + 1] if c in slot else weight[:, c : c + 1]
        for c in range(int(weight.shape[1]))
    ]
    return {HAUSDORFF_FIELD: xp.concat(columns, axis=1)}


def _boundary_statistics(params: Params) -> frozenset[str]:
    return frozenset({field_statistic("field_pred_sum", BOUNDARY_PHI), "count"})


def _boundary_formula(xp: Any, stats: Mapping[str, Array], params: Params) -> Array:
    total = stats[field_statistic("field_pred_sum", BOUNDARY_PHI)]
    columns = included_classes(params, int(total.shape[1]))
    numerator = xp.sum(select_columns(xp, total, columns), axis=1)
    normaliser = stats["count"][:, 0] * float(len(columns))
    return reduce_voxel_mean(xp, numerator, normaliser, params.reduction)


def _hausdorff_statistics(params: Params) -> frozenset[str]:
    return frozenset({field_statistic("field_sq_err_sum", HAUSDORFF_FIELD), "count"})


def _hausdorff_formula(log: bool):
    def formula(xp: Any, stats: Mapping[str, Array], params: Params) -> Array:
        total = stats[field_statistic("field_sq_err_sum", HAUSDORFF_FIELD)]
        count = stats["count"]
        if params.batch:
            total, count = xp.sum(total, axis=0, keepdims=True), xp.sum(count, axis=0, keepdims=True)
        columns = included_classes(params, int(total.shape[1]))
        per_class = safe_ratio(xp, select_columns(xp, total, columns), select_columns(xp, count, columns), 0.0)
        if params.reduction == "none":
            value = per_class[0] if params.batch else per_class
        elif params.reduction == "sum":
            value = xp.sum(per_class)
        else:
            value = xp.sum(per_class) / float(per_class.shape[0] * per_class.shape[1])
        return xp.log(value + full(xp, value, 1.0)) if log else value

    return formula


_REF_KERVADEC = (
    "Kervadec, Bouchtiba, Desrosiers, Granger, Dolz, Ben Ayed. Boundary loss for highly unbalanced segmentation. "
    "MIDL 2019 / Medical Image Analysis 67 (2021)"
)
_REF_KARIMI = (
    "Karimi, Salcudean. Reducing the Hausdorff distance in medical image segmentation with convolutional neural "
    "networks. IEEE TMI 39 (2019)"
)

BOUNDARY = LossSpec(
    name="boundary",
    family="distance",
    summary="Boundary (surface) loss: mean of p·φ, φ the signed distance map of the target",
    params=(
        common.ACTIVATION,
        BACKGROUND_OFF,
        common.CLASSES,
        common.IGNORE_INDEX,
        SPACING,
        CONVENTION,
        NORMALIZE,
        replace(common.REDUCTION, doc="mean over (sample, class, voxel), sum, or none: per-sample means (B,)"),
        common.REGIONS,
    ),
    formula="L = Σ_{b, c∈classes, x} w·p_c·φ_c / (Σ_{b,x} w · |classes|); φ = signed distance map of the target "
    "(convention, spacing, normalize), or the call-time distance_map=; classes without a boundary have φ = 0.",
    references=(_REF_KERVADEC, "LIVIAETS/boundary-loss losses.py SurfaceLoss, utils.py one_hot2dist"),
    presets=(
        Preset(
            "kervadec2019",
            {"include_background": False, "convention": "boundary_loss"},
            "SurfaceLoss(idc=[1, …]) on one_hot2dist maps: foreground classes, −(d−1) inside, +d outside",
            "LIVIAETS/boundary-loss losses.py + utils.py (171c32d)",
        ),
    ),
    required_statistics=_boundary_statistics,
    from_statistics=_boundary_formula,
    fields=_boundary_fields,
    check=common.check_class_selection,
    call_inputs=("mask", "distance_map"),
    tolerance_floor=1e-6,  # backends may compute φ in float32 (exact to float32 rounding)
)

_HD_PARAMS = (
    common.ACTIVATION,
    BACKGROUND_OFF,
    common.CLASSES,
    common.IGNORE_INDEX,
    common.BATCH,
    ALPHA,
    THRESHOLD,
    SPACING,
    common.REDUCTION,
    common.REGIONS,
)

HAUSDORFF_DT = LossSpec(
    name="hausdorff_dt",
    family="distance",
    summary="Hausdorff distance-transform loss (Karimi & Salcudean; MONAI HausdorffDTLoss, plus spacing)",
    params=_HD_PARAMS,
    formula="per (b, c): mean over voxels of w·(p − g)²·(d_p^α + d_g^α), d = distance to the other side of the "
    "boundary of the target (g) and of the prediction's mask p > threshold (no gradient through d), in physical "
    "units; mean over samples × classes (per class over the batch if batch).",
    references=(_REF_KARIMI, "MONAI HausdorffDTLoss"),
    presets=(
        Preset(
            "monai",
            {},
            "MONAI HausdorffDTLoss(softmax=True, to_onehot_y=True) defaults (alpha 2, no background)",
            "Project-MONAI/MONAI monai/losses/hausdorff_loss.py, v1.5.0",
        ),
    ),
    required_statistics=_hausdorff_statistics,
    from_statistics=_hausdorff_formula(log=False),
    fields=_hausdorff_fields,
    check=common.check_class_selection,
    tolerance_floor=1e-6,
)

LOG_HAUSDORFF_DT = replace(
    HAUSDORFF_DT,
    name="log_hausdorff_dt",
    summary="log(1 + Hausdorff distance-transform loss) (MONAI LogHausdorffDTLoss)",
    formula="log(1 + hausdorff_dt), applied after the reduction",
    presets=(
        Preset(
            "monai",
            {},
            "MONAI LogHausdorffDTLoss(softmax=True, to_onehot_y=True) defaults",
            "Project-MONAI/MONAI monai/losses/hausdorff_loss.py, v1.5.0",
        ),
    ),
    from_statistics=_hausdorff_formula(log=True),
)

SPECS = (BOUNDARY, HAUSDORFF_DT, LOG_HAUSDORFF_DT)
